"""Issue 21 (c): does RIDE with the class-parallel fused head (docs/methods.md 8.6) train to the accuracy of the
single-process fused head? Trains mnist_lt_ride_fused_head once in one process and once on 2 gloo ranks under
torchrun with `method.head_parallel: class`, for each seed, and prints test overall / many / medium / few per seed
and mean +- std per arm (RESULTS.md "Class-parallel fused head").

    python tools/head_parallel_accuracy.py                      # seeds 0 1 2, the recipe's 30 epochs
    python tools/head_parallel_accuracy.py --seeds 0 --epochs 2  # a quick look

Both arms train with the same global batch (the recipe's 64; 32 rows per rank on 2 ranks). Each process runs one
intra-op thread. A seed whose run folder already has results.json is read, not retrained.
"""

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys

RECIPE = "mnist_lt_ride_fused_head"
COLUMNS = ("overall", "many", "medium", "few")
ARMS = {"one process": 1, "2 ranks, head_parallel: class": 2}


def _launcher(world_size: int) -> list:
    if world_size == 1:
        return [sys.executable]
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(world_size), "--master_addr",
            "127.0.0.1", "--master_port", str(port)]


def _epoch_overrides(epochs) -> list:
    """The recipe's schedule and DRW start (warmup 2, x0.1 and DRW at 80%, x0.1 at 90%) scaled to `epochs`."""
    if epochs is None:
        return []
    late = [max(1, int(0.8 * epochs)), max(1, int(0.9 * epochs))]
    return [f"train.epochs={epochs}", f"train.schedule.milestones={late}",
            f"train.schedule.warmup_epochs={min(2, epochs)}", f"method.drw_epoch={late[0]}"]


def train(world_size: int, seed: int, out: str, epochs) -> dict:
    """Test scores of one run (trained unless `out` holds its results.json)."""
    results = os.path.join(out, "results.json")
    if not os.path.exists(results):
        parallel = ["method.head_parallel=class"] if world_size > 1 else []
        command = [*_launcher(world_size), "-m", "fastlt.cli", "train", "--config", RECIPE, f"seed={seed}",
                   f"out={out}", *_epoch_overrides(epochs), *parallel, "--no-progress"]
        finished = subprocess.run(command, env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True, text=True)
        if finished.returncode != 0:
            sys.exit(f"{' '.join(command)} failed:\n{finished.stderr[-3000:]}")
    with open(results) as handle:
        scores = json.load(handle)
    return {column: float(scores[column]) for column in COLUMNS}


def mean_std(values) -> str:
    spread = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.1f} ± {spread:.1f}"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, default=None, help="default: the recipe's (30)")
    parser.add_argument("--out", default="runs/head_parallel_accuracy")
    args = parser.parse_args(argv)
    lines = ["| arm | seed | " + " | ".join(COLUMNS) + " |", "|---|---:|" + "---:|" * len(COLUMNS)]
    for arm, world_size in ARMS.items():
        per_seed = []
        for seed in args.seeds:
            scores = train(world_size, seed, os.path.join(args.out, f"ranks{world_size}_seed{seed}"), args.epochs)
            per_seed.append(scores)
            lines.append(f"| {arm} | {seed} | " + " | ".join(f"{scores[c]:.1f}" for c in COLUMNS) + " |")
            print(lines[-1], flush=True)
        lines.append(f"| {arm} | mean ± std | "
                     + " | ".join(mean_std([scores[c] for scores in per_seed]) for c in COLUMNS) + " |")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
