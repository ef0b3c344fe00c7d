"""`method.head_parallel: class` (docs/methods.md 8.6): `fastlt train` under torchrun trains RIDE with the
class-parallel fused head, and its checkpoint (the whole weight) resumes with one process and with 3 ranks."""

import json
import os
import shutil
import socket
import subprocess
import sys

import pytest
import torch

from fastlt.errors import ConfigError
from fastlt.methods.stage1 import method_options, rebuild_options

DIGITS = ["data.name=digits_lt", "data.n_max=150", "data.ratio=10", "data.num_workers=0", "data.loader=torch",
          "train.schedule.milestones=[1,2]", "train.schedule.warmup_epochs=1", "method.head_parallel=class",
          "--no-progress"]


@pytest.mark.parametrize("section, message", [
    ({"fused_head": True, "head_parallel": "classes"},
     "method.head_parallel must be one of none, class, got 'classes'"),
    ({"head_parallel": "class"}, "method.head_parallel: class needs method.fused_head: true"),
    ({"fused_head": True, "head_parallel": "class", "teacher": "runs/ride"},
     "method.head_parallel: class does not support a distillation teacher"),
])
def test_a_bad_head_parallel_is_a_one_line_error_naming_the_key(section, message):
    with pytest.raises(ConfigError, match=message) as error:
        method_options({"name": "ride", **section})
    assert "\n" not in str(error.value)


def test_head_parallel_is_a_declared_ride_option_that_a_rebuilt_model_leaves_off():
    assert method_options({"name": "ride"}).head_parallel == "none"
    trained = {"name": "ride", "fused_head": True, "head_parallel": "class"}
    assert method_options(trained).head_parallel == "class"
    assert rebuild_options(trained).head_parallel == "none"  # a teacher or an evaluation runs in one process


def _train(world_size, run, *overrides):
    launcher = [sys.executable]
    if world_size > 1:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        launcher += ["-m", "torch.distributed.run", "--nproc_per_node", str(world_size), "--master_addr", "127.0.0.1",
                     "--master_port", str(port)]
    command = [*launcher, "-m", "fastlt.cli", "train", "--config", "mnist_lt_ride_fused_head", *DIGITS, f"out={run}",
               *overrides]
    finished = subprocess.run(command, env=dict(os.environ, OMP_NUM_THREADS="1"), timeout=300, capture_output=True,
                              text=True)
    assert finished.returncode == 0, finished.stderr[-3000:]
    with open(os.path.join(run, "metrics.jsonl")) as handle:
        return [json.loads(line) for line in handle]


@pytest.mark.slow
def test_a_two_rank_run_resumes_on_one_and_on_three_ranks(tmp_path):
    saved = tmp_path / "two_ranks"
    assert [record["epoch"] for record in _train(2, saved, "train.epochs=1")] == [0]
    weight = torch.load(saved / "last.pt", weights_only=True)["model"]["fused_head.weight"]
    assert tuple(weight.shape[:2]) == (3, 10)  # the whole head (E = 3, C = 10), not rank 0's shard
    for world_size in (1, 3):
        resumed = tmp_path / f"resumed_on_{world_size}"
        shutil.copytree(saved, resumed)
        records = _train(world_size, resumed, "train.epochs=2", "resume=true")
        assert [record["epoch"] for record in records] == [0, 1]  # epoch 0 from the 2-rank run, epoch 1 trained here
        assert os.path.exists(resumed / "results.json")
