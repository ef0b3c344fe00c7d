"""`fastlt train / eval / stage2` end to end on Digits-LT (1,797 8x8 images), a couple of epochs each."""

import json
import os

import pytest

from fastlt.cli import main

DIGITS = ["data.name=digits_lt", "data.n_max=150", "data.ratio=10", "data.num_workers=0", "data.loader=torch",
          "train.epochs=2", "train.schedule.milestones=[1,2]", "train.schedule.warmup_epochs=1"]


pytestmark = pytest.mark.usefixtures("one_intra_op_thread")


def read(path):
    with open(path) as handle:
        return json.load(handle)


def test_train_tau_recipe_then_stage2_and_eval(tmp_path, capsys):
    run = str(tmp_path / "ce")
    main(["train", "--config", "mnist_lt_tau", *DIGITS, f"out={run}", "--no-progress"])
    for name in ("config.yaml", "metrics.jsonl", "best.pt", "results.json", "per_class_accuracy.png"):
        assert os.path.exists(os.path.join(run, name)), name
    stage1 = read(os.path.join(run, "results.json"))
    assert {"overall", "many", "medium", "few", "per_class"} <= set(stage1)
    chosen = read(os.path.join(run, "stage2_tau", "stage2.json"))
    assert chosen["selected_on"] == "val" and len(chosen["sweep"]) == 21

    for method in ("crt", "lws"):
        main(["stage2", method, run, "stage2.epochs=1", "stage2.batch_size=32", "--no-progress"])
        assert os.path.exists(os.path.join(run, f"stage2_{method}", "model.pt"))
    main(["stage2", "ncm", "--run", run, "--no-progress"])
    assert os.path.exists(os.path.join(run, "stage2_ncm", "model.pt"))
    capsys.readouterr()
    main(["eval", "--run", os.path.join(run, "stage2_lws")])
    assert "| overall | many | medium | few |" in capsys.readouterr().out
    main(["eval", "--run", run])
    assert f"{stage1['overall']:.1f}" in capsys.readouterr().out  # eval reproduces the training run's test figure


def test_train_ride_with_router(tmp_path, capsys):
    run = str(tmp_path / "ride")
    main(["train", "--config", "mnist_lt_ride_router", *DIGITS, "method.drw_epoch=1", "stage2.epochs=1",
          f"out={run}", "--no-progress"])
    chosen = read(os.path.join(run, "stage2_router", "stage2.json"))
    assert abs(sum(chosen["share_per_num_experts"].values()) - 1) < 1e-9
    assert chosen["mflops_routed"] <= chosen["mflops_all_experts"]
    assert "samples per number of experts" in capsys.readouterr().out
    main(["eval", "--run", os.path.join(run, "stage2_router")])


def test_train_teacher_then_distil_from_it(tmp_path):
    teacher, student = str(tmp_path / "teacher"), str(tmp_path / "student")
    main(["train", "--config", "mnist_lt_ride_teacher", *DIGITS, "train.epochs=1", f"out={teacher}", "--no-progress"])
    main(["train", "--config", "mnist_lt_ride_distill", *DIGITS, "train.epochs=1", f"method.teacher={teacher}",
          f"out={student}", "--no-progress"])
    with open(os.path.join(student, "metrics.jsonl")) as handle:
        record = json.loads(handle.readline())
    assert record["train_loss"] > 0 and record["train_loss"] == record["train_loss"]
    assert 0 <= read(os.path.join(student, "results.json"))["overall"] <= 100
    main(["eval", "--run", student])  # evaluating the student needs no teacher


def one_line_error(capsys, argv):
    """Runs the CLI expecting a user error: exit code 2 and one line on stderr, no traceback."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as exited:
        main(argv)
    assert exited.value.code == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and "Traceback" not in error, error
    return error


def test_bad_recipe_name_is_a_clear_error(capsys):
    assert "no_such_recipe" in one_line_error(capsys, ["train", "--config", "no_such_recipe"])
    assert "did you mean mnist_lt_ride?" in one_line_error(capsys, ["train", "--config", "mnist_lt_rid"])
    with pytest.raises(FileNotFoundError, match="no_such_recipe"):  # --debug raises with the traceback
        main(["train", "--config", "no_such_recipe", "--debug"])


@pytest.mark.parametrize("override, expected", [
    ("train.epochz=3", "unknown config key 'train.epochz': did you mean train.epochs?"),
    ("method.drw_epoc=3", "known keys: name (method.drw_epoch is an option of ldam_drw, ride)"),  # ce has none
    ("epochss=3", "unknown config key 'epochss': did you mean train.epochs?"),
    ("train.schedule.gamma=abc", "train.schedule.gamma must be a number, got 'abc'"),
    ("model.name=bogus", "model.name: unknown model 'bogus'; expected one of "),
    ("model.widthh=3", "unknown config key 'model.widthh': known keys: in_channels, name"),
    ("method.max_margin=abc", "known keys: name (method.max_margin is an option of ldam_drw, ride)"),
    ("train.epochs=abc", "train.epochs must be an integer >= 1, got 'abc'"),
    ("train.epochs=-2", "train.epochs must be an integer >= 1, got -2"),
    ("train.epochs=[1,", "the value is not valid YAML"),
])
def test_bad_overrides_are_one_line_errors(capsys, override, expected):
    error = one_line_error(capsys, ["train", "--config", "mnist_lt_ce", override, "--no-progress"])
    assert expected in error and error.startswith("fastlt train: error:")


@pytest.mark.parametrize("override, expected", [
    ("method.max_margin=abc", "method.max_margin must be a number >= 0, got 'abc' "),
    ("method.max_margn=1", "unknown config key 'method.max_margn': did you mean method.max_margin?"),
    ("model.num_expert=4", "did you mean model.num_experts?"),
])
def test_bad_method_and_model_options_are_one_line_errors(capsys, override, expected):
    error = one_line_error(capsys, ["train", "--config", "mnist_lt_ride", override, "--no-progress"])
    assert expected in error


def test_missing_data_run_folder_and_checkpoint_are_one_line_errors(tmp_path, capsys):
    error = one_line_error(capsys, ["train", "--config", "cifar100_lt_r100_ce", f"data.root={tmp_path / 'nope'}"])
    assert "data.root" in error and "nope" in error and "set data.root=" in error
    error = one_line_error(capsys, ["eval", "--run", str(tmp_path / "no_run")])
    assert f"run folder {tmp_path / 'no_run'} does not exist" in error
    error = one_line_error(capsys, ["stage2", "tau", str(tmp_path / "no_run"), "stage2.tau=1"])
    assert "no_run does not exist" in error
    run = str(tmp_path / "ce")
    # overrides after --no-progress are overrides too
    main(["train", "--config", "mnist_lt_ce", "--no-progress", *DIGITS, "train.epochs=1", f"out={run}"])
    assert read(os.path.join(run, "results.json"))["overall"] >= 0
    error = one_line_error(capsys, ["stage2", "tau", run, "stage2.taw=1"])
    assert "did you mean stage2.tau?" in error
    missing = os.path.join(run, "missing.pt")
    assert f"checkpoint {missing} not found" in one_line_error(capsys, ["eval", "--run", run, "--checkpoint", missing])
    best = os.path.join(run, "best.pt")
    with open(best, "r+b") as handle:
        handle.truncate(os.path.getsize(best) // 2)
    error = one_line_error(capsys, ["eval", "--run", run])
    assert f"checkpoint {best} cannot be read" in error
    error = one_line_error(capsys, ["train", "--config", "mnist_lt_ce", *DIGITS, "train.epochs=1", f"out={run}",
                                    "resume=true", "--no-progress"])
    assert f"checkpoint {os.path.join(run, 'last.pt')} cannot be read" not in error  # last.pt is intact
    assert f"checkpoint {best} cannot be read" in error  # the run is complete: it evaluates the truncated best.pt


@pytest.mark.slow
def test_train_under_torchrun_splits_the_global_batch(tmp_path):
    import subprocess
    import sys

    run = str(tmp_path / "ddp")
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m", "fastlt.cli", "train",
               "--config", "mnist_lt_ce", *DIGITS, "train.epochs=1", f"out={run}", "--no-progress"]
    environment = dict(os.environ, OMP_NUM_THREADS="1")
    finished = subprocess.run(command, env=environment, timeout=300, capture_output=True, text=True)
    assert finished.returncode == 0, finished.stderr[-3000:]
    with open(os.path.join(run, "metrics.jsonl")) as handle:
        record = json.loads(handle.readline())
    # Digits-LT train has 609 images: 305 per rank, per-rank batch 64 / 2 = 32 -> 10 steps (a 1-rank run takes 10)
    assert record["steps"] == 10
    assert os.path.exists(os.path.join(run, "results.json"))
