"""The fused losses' CUDA and Triton backends: the Triton kernels run on CPU tensors under TRITON_INTERPRET=1 (set in
tests/conftest.py) on tiny shapes, as the interpreter is slow; the CUDA launchers can only be checked for refusing CPU
tensors on a machine without a GPU (their values are tested by the `gpu`-marked cases on a CUDA machine)."""

import pytest
import torch
from op_helpers import needs_cuda_build

import fastlt


def _counts(num_classes):
    return (100.0 * torch.exp(-torch.arange(num_classes) / num_classes * 6)).floor().clamp_min(1)


def _inputs(shape, dtype=torch.float32, scale=10.0, device="cpu"):
    E, B, C = shape
    logits = (torch.randn(E, B, C) * scale).to(dtype=dtype, device=device).requires_grad_(True)
    return logits, torch.randint(0, C, (B,), device=device), _counts(C).to(device)


def _tables(num_classes, weights):
    return torch.rand(num_classes), (torch.rand(num_classes) + 0.5 if weights else None), torch.rand(num_classes) + 0.5


@needs_cuda_build
def test_ride_loss_cuda_launcher_refuses_cpu_tensors():
    logits, target, _ = _inputs((2, 3, 10))
    margins, weights, temperatures = _tables(10, weights=True)
    with pytest.raises(RuntimeError, match="must be a CUDA tensor"):
        fastlt._C.cuda_launchers.ride_loss(logits.detach(), target, margins, weights, temperatures, -0.45, True)
