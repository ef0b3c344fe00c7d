"""The polynomial exp of the C++ CPU loss kernels (csrc/cpu/softmax_vectorized.h), seen through the kernels: a single
softmax row whose logits cover the exp's whole range, so every gradient entry p_c = exp(z_c - lse) is one vector exp
divided by the row sum. The header promises <= 3e-7 relative error down to -86.5 and a floor of ~2.7e-38 below."""

import pytest
import torch
from op_helpers import needs_cpp

import fastlt
from fastlt.ops import prior_shifted_ce, ride_loss


def _softmax_row_grad(logits):
    """d CE / d z of one row with the target at the maximum (class 0): exactly softmax(z) off the target."""
    z = logits.reshape(1, 1, -1).clone().requires_grad_(True)
    with fastlt.ops.use_backend("cpp"):
        prior_shifted_ce(z, torch.zeros(1, dtype=torch.long), torch.ones(z.shape[-1]), taus=[0.0]).backward()
    return z.grad.reshape(-1)


@needs_cpp
def test_exp_relative_error_across_its_range():
    # 0 first (the target and maximum), then 200,001 values evenly covering [-86.5, 0] (the exp reduces each to
    # r in [-ln2/2, ln2/2], so the spacing hits every part of the polynomial many times).
    logits = torch.cat([torch.zeros(1), torch.linspace(-86.5, 0.0, 200_001)])
    grad = _softmax_row_grad(logits)[1:].double()
    expected = torch.softmax(logits.double(), 0)[1:]
    normal = expected > 1e-36  # the smallest exps divided by the row sum (~2,300) fall below fp32's normal range
    assert normal.float().mean() > 0.85
    relative = ((grad - expected) / expected).abs()[normal]
    # 3e-7 for the exp, plus the rounding of the sum (2e5 terms) and of the division.
    assert relative.max().item() < 1e-6
    assert relative.median().item() < 1.5e-7


@needs_cpp
def test_exp_floor_and_nan():
    # Far below the range: a tiny positive probability (exp's floor), never a NaN or a negative value.
    grad = _softmax_row_grad(torch.tensor([0.0, -200.0, -1e30]))
    assert torch.all(grad[1:] >= 0) and torch.all(grad[1:] < 1e-37)
    # NaN in the logits propagates (documented), it is not skipped.
    grad = _softmax_row_grad(torch.tensor([0.0, float("nan"), -1.0]))
    assert torch.isnan(grad).all()


@needs_cpp
@pytest.mark.parametrize("diversity_factor", [0.0, -0.45])
def test_ride_loss_extreme_spread_matches_reference(diversity_factor):
    # Logits spread over 1e4 (far beyond the exp's floor) with the target at the bottom: finite, and equal to the
    # eager reference (torch.exp) evaluated in fp64 (the KL gradient subtracts near-equal probabilities, so an fp32
    # reference would carry errors of its own).
    torch.manual_seed(0)
    logits = (torch.rand(2, 4, 300) * 1e4 - 5e3).requires_grad_(True)
    target = logits[0].argmin(1)
    counts = torch.arange(300, 0, -1).double()
    with fastlt.ops.use_backend("cpp"):
        fused = ride_loss(logits, target, counts, drw=True, diversity_factor=diversity_factor)
    (fused_grad,) = torch.autograd.grad(fused, logits)
    logits64 = logits.detach().double().requires_grad_(True)
    reference = fastlt.ops.ride_loss_reference(logits64, target, counts, drw=True, diversity_factor=diversity_factor)
    (reference_grad,) = torch.autograd.grad(reference, logits64)
    assert torch.isfinite(fused) and torch.isfinite(fused_grad).all()
    torch.testing.assert_close(fused.double(), reference, rtol=1e-5, atol=1e-3)
    # Entries of order 0.1 that are differences of probabilities near 1: fp32 leaves ~1e-7 absolute error in each.
    torch.testing.assert_close(fused_grad.double(), reference_grad, rtol=1e-5, atol=2e-6)
