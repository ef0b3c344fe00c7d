"""`fastlt train` SIGKILLed at random moments, resumed with resume=true until it finishes: every sequence of kills
ends with the same metrics.jsonl, best.pt, last.pt and test results as an uninterrupted run.

Kills come two ways: FASTLT_CRASH_AT=N makes the run SIGKILL itself at its N-th crash point (inside a checkpoint
write, between the record, best and last files: fastlt.engine.crash_points), and the test SIGKILLs it after a
random delay (data loading, training steps, validation, test evaluation). Several kills hit one run folder before
it is allowed to finish. FASTLT_KILLS=<n> runs a longer variant (default 32 kills), FASTLT_KILL_SEED another draw.
"""

import collections
import json
import multiprocessing
import os
import random
import signal
import time

import pytest
import torch

RUN = ["--config", "mnist_lt_ce", "data.name=digits_lt", "data.n_max=60", "data.ratio=10", "data.num_workers=0",
       "data.loader=torch", "train.epochs=6", "train.schedule.milestones=[4,5]", "train.schedule.warmup_epochs=1",
       "resume=true", "--no-progress"]
KILLS = int(os.environ.get("FASTLT_KILLS", "32"))
KILLS_PER_SEQUENCE = 4
TIMING_KEYS = ("elapsed_s", "data_time_s", "compute_time_s")


@pytest.fixture(scope="module")
def forkserver():
    """A forkserver that imports (and warms up) kill_worker once; this process never imports it (it sets torch
    to one thread)."""
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(["kill_worker"])
    # the forkserver process finds kill_worker through PYTHONPATH (it does not inherit this process's sys.path)
    python_path = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [os.path.dirname(os.path.abspath(__file__)), python_path]))
    try:
        warm = context.Process(target=exec, args=("import sys; sys.exit(0 if 'kill_worker' in sys.modules else 3)",))
        warm.start()
        warm.join()
    finally:
        if python_path is None:
            del os.environ["PYTHONPATH"]
        else:
            os.environ["PYTHONPATH"] = python_path
    assert warm.exitcode == 0, "the forkserver did not preload kill_worker"
    return context


def launch(context, out, environment=None):
    code = "import kill_worker; kill_worker.train(argv, environment)"
    process = context.Process(target=exec, args=(code, {"argv": [*RUN, f"out={out}"],
                                                        "environment": environment or {}}))
    process.start()
    return process


def finish(process, timeout=120):
    process.join(timeout)
    if process.exitcode is None:
        process.kill()
        process.join()
        raise AssertionError(f"fastlt train hung for {timeout} s")
    return process.exitcode


def outcome(out):
    """What a finished run folder says: metrics without timings, test results, best/last weights and epochs."""
    with open(os.path.join(out, "metrics.jsonl")) as handle:
        metrics = [{key: value for key, value in json.loads(line).items() if key not in TIMING_KEYS}
                   for line in handle]
    with open(os.path.join(out, "results.json")) as handle:
        results = json.load(handle)
    checkpoints = {name: torch.load(os.path.join(out, name)) for name in ("best.pt", "last.pt")}
    return metrics, results, checkpoints


def assert_same(reference, resumed, where):
    metrics, results, checkpoints = resumed
    assert json.dumps(metrics) == json.dumps(reference[0]), where  # NaN-safe equality of the records
    assert json.dumps(results) == json.dumps(reference[1]), where
    for name, expected in reference[2].items():
        assert checkpoints[name]["epoch"] == expected["epoch"], (where, name)
        assert checkpoints[name]["extra"] == expected["extra"], (where, name)
        for key, value in expected["model"].items():
            assert torch.equal(checkpoints[name]["model"][key], value), (where, name, key)


def points_left(points, out):
    """About how many crash points a resume of `out` passes: those of the epochs last.pt does not hold."""
    last = os.path.join(out, "last.pt")
    if not os.path.exists(last):
        return len(points)
    progress = torch.load(last)["extra"]["progress"]
    done = progress["epoch"] + (1 if progress["epoch_complete"] else 0)
    epoch_ends = [index for index, name in enumerate(points) if name == "epoch end: last.pt written"]
    return max(1, len(points) - 1 - epoch_ends[done - 1]) if done else len(points)


def test_sigkill_at_random_moments_then_resume_matches_the_uninterrupted_run(tmp_path, forkserver):
    reference_dir, crash_log = str(tmp_path / "reference"), str(tmp_path / "crash_points.log")
    started = time.perf_counter()
    assert finish(launch(forkserver, reference_dir, {"FASTLT_CRASH_LOG": crash_log})) == 0
    reference_seconds = time.perf_counter() - started
    reference = outcome(reference_dir)
    with open(crash_log) as handle:
        points = handle.read().splitlines()
    assert len(points) >= 20 and "epoch end: last.pt written" in points

    rng = random.Random(int(os.environ.get("FASTLT_KILL_SEED", "0")))
    killed_at = []  # the crash point a run was killed at, or the last one it passed before a timed kill
    kinds = sorted(set(points))
    rng.shuffle(kinds)
    sequence = crash_kills = 0
    while len(killed_at) < KILLS:
        assert sequence < KILLS, f"too few runs were killed: {killed_at}"
        out, kills = str(tmp_path / f"run{sequence}"), 0
        for attempt in range(2 * KILLS_PER_SEQUENCE):
            log = str(tmp_path / f"run{sequence}_attempt{attempt}.log")
            if attempt % 2 == 0:  # a crash point of this (maybe resumed) run, which may finish before reaching it
                # the resumed run passes the points of the reference run's last epochs: aim at the next kind of
                # point in turn (inside a checkpoint write, between the record / best / last files, ...)
                kind = kinds[crash_kills % len(kinds)]
                tail = points[len(points) - points_left(points, out):]
                crash_at = rng.choice([i + 1 for i, name in enumerate(tail) if name == kind] or [len(tail)])
                crash_kills += 1
                code = finish(launch(forkserver, out, {"FASTLT_CRASH_AT": str(crash_at), "FASTLT_CRASH_LOG": log}))
                how = "at"
            else:  # after a random delay: mid-step, mid-validation, mid-test-evaluation, ...
                process = launch(forkserver, out, {"FASTLT_CRASH_LOG": log})
                process.join(rng.uniform(0.0, reference_seconds * points_left(points, out) / len(points)))
                process.kill()
                code, how = finish(process), "timed, after"
            assert code in (0, -signal.SIGKILL), (sequence, attempt, code)
            if code == 0:
                break
            reached = open(log).read().splitlines() if os.path.exists(log) else []
            killed_at.append(f"{how} '{reached[-1]}'" if reached else f"{how} start")
            kills += 1
            if kills == KILLS_PER_SEQUENCE:
                break
        assert finish(launch(forkserver, out)) == 0, sequence  # the last resume runs to the end
        assert_same(reference, outcome(out), f"sequence {sequence}: kills {killed_at}")
        assert not [name for name in os.listdir(out) if ".tmp-" in name or ".pending-" in name], sequence
        sequence += 1
    print(f"{len(killed_at)} kills in {sequence} sequences ({len(points)} crash points in a run):")
    print("\n".join(f"{count} x {where}" for where, count in collections.Counter(killed_at).most_common()))
    at_points = [where for where in killed_at if where.startswith("at ")]
    assert len(set(at_points)) >= min(len(kinds) - 2, len(at_points) // 2), killed_at  # most kinds of point
