"""DDP through torchrun (gloo, 2 CPU processes) matches one process at the same global batch."""

import os
import socket
import subprocess
import sys

import ddp_worker
import torch

from fastlt.engine import init_distributed, wrap_model

REPOSITORY_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_single_process_context_needs_no_process_group(monkeypatch):
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    context = init_distributed(device="cpu")
    assert (context.rank, context.world_size, context.is_main, context.is_distributed) == (0, 1, True, False)
    model = torch.nn.Linear(2, 2)
    assert wrap_model(model, context) is model


def test_two_process_gloo_ddp_matches_one_process(tmp_path):
    output = tmp_path / "ddp.pt"
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
               "--master_port", str(free_port()), ddp_worker.__file__, str(output)]
    environment = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": REPOSITORY_ROOT}
    finished = subprocess.run(command, capture_output=True, text=True, timeout=120, env=environment)
    assert finished.returncode == 0, finished.stderr[-3000:]
    result = torch.load(output)
    model, images, targets = ddp_worker.make_model_and_data()
    expected = ddp_worker.train(model, images, targets).state_dict()
    for name, value in expected.items():
        torch.testing.assert_close(result["state"][name], value, rtol=1e-5, atol=1e-6)
    assert torch.equal(result["gathered"], torch.tensor([[0.0, 0.0], [1.0, 1.0], [1.0, 1.0]]))
    assert result["held"] == 0  # every all_gather returned after gloo let go of its buffers
