"""Run by test_kill_resume.py in forkserver children: `fastlt train` in-process. The forkserver imports this module
once, which also trains one tiny run: every child then starts warm (torch, sklearn's digits, matplotlib's fonts,
tqdm's lock already loaded) and a killed-and-resumed run costs about a second instead of ~10."""

import os
import tempfile

import torch

from fastlt.cli import main
from fastlt.engine import crash_points

# one intra-op thread before any torch op: the forkserver then starts no OpenMP pool its children could inherit
torch.set_num_threads(1)
WARM_UP = ["--config", "mnist_lt_ce", "data.name=digits_lt", "data.n_max=20", "data.ratio=10", "data.num_workers=0",
           "data.loader=torch", "train.epochs=1", "--no-progress"]


def train(argv, environment):
    """`fastlt train *argv` with `environment` added to os.environ (FASTLT_CRASH_AT / FASTLT_CRASH_LOG)."""
    os.environ.update(environment)
    crash_points._reached = 0  # count from this run's first point, not the warm-up's
    main(["train", *argv])


with tempfile.TemporaryDirectory() as _folder:
    train([*WARM_UP, f"out={_folder}"], {})
