"""examples/ddp_torchrun.py under `torchrun --nproc_per_node 2` (gloo, CPU): each rank trains on its own shard of
the same class-balanced draw, and DDP keeps the two ranks' weights identical."""

import os
import socket
import subprocess
import sys

import numpy as np
import torch
from example_loader import EXAMPLES, REPOSITORY_ROOT

from fastlt.data import DigitsLT, LongTailSampler


def free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_two_rank_torchrun(tmp_path):
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
               "--master_port", str(free_port()), os.path.join(EXAMPLES, "ddp_torchrun.py"), "--epochs", "3",
               "--drw-epoch", "2", "--steps-per-epoch", "3", "--report-dir", str(tmp_path)]
    environment = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": REPOSITORY_ROOT}
    finished = subprocess.run(command, capture_output=True, text=True, timeout=180, env=environment)
    assert finished.returncode == 0, finished.stderr[-3000:]
    assert "epoch 2:" in finished.stdout and "(DRW on)" in finished.stdout
    reports = [torch.load(tmp_path / f"rank{rank}.pt", weights_only=False) for rank in range(2)]

    targets = DigitsLT(split="train").targets
    whole_draw = LongTailSampler(targets, strategy="class_balanced", seed=0, rank=0, world_size=1)
    for epoch in range(3):
        global_order = whole_draw.indices(epoch)
        shards = [report["indices"][epoch] for report in reports]
        assert len(shards[0]) == len(shards[1]) == -(-len(targets) // 2)
        np.testing.assert_array_equal(shards[0], global_order[0::2])
        np.testing.assert_array_equal(shards[1][: len(global_order) // 2], global_order[1::2])
    assert not np.array_equal(reports[0]["indices"][0], reports[0]["indices"][1])

    assert all(len(report["losses"]) == 9 and np.isfinite(report["losses"]).all() for report in reports)
    assert reports[0]["losses"] != reports[1]["losses"]  # different shards, so different local losses
    for name, value in reports[0]["state"].items():
        torch.testing.assert_close(reports[1]["state"][name], value, rtol=0, atol=0, msg=name)
