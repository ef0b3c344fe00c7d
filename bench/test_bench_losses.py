"""pytest-benchmark timings of the fused losses (fwd+bwd) at the acceptance shape; `make bench` runs them."""

import pytest
import torch

import fastlt
from fastlt.bench.losses import long_tailed_counts

pytestmark = pytest.mark.skipif(not fastlt._extension.AVAILABLE, reason="extension not built")


@pytest.mark.parametrize("impl", ["fused", "eager"])
def test_ride_loss_fwd_bwd(benchmark, impl):
    E, B, C = 4, 512, 8142
    logits = (torch.randn(E, B, C) * 10).requires_grad_(True)
    target, counts = torch.randint(0, C, (B,)), long_tailed_counts(C)
    fn = fastlt.ops.ride_loss if impl == "fused" else fastlt.ops.ride_loss_reference

    def step():
        logits.grad = None
        fn(logits, target, counts, drw=True).backward()

    with fastlt.ops.use_backend("cpp"):
        benchmark.pedantic(step, rounds=3, warmup_rounds=1)
    assert torch.isfinite(logits.grad).all()


@pytest.mark.parametrize("impl", ["fused", "eager"])
def test_reslt_loss_fwd_bwd(benchmark, impl):
    K, B, C = 4, 512, 8142
    logits = (torch.randn(K, B, C) * 10).requires_grad_(True)
    target = torch.randint(0, C, (B,))
    groups = fastlt.ops.reslt_groups(long_tailed_counts(C), cutoffs=[C // 4, C // 2, 3 * C // 4], num_branches=K)
    fn = fastlt.ops.reslt_loss if impl == "fused" else fastlt.ops.reslt_loss_reference

    def step():
        logits.grad = None
        fn(logits, target, groups, beta=0.995).backward()

    with fastlt.ops.use_backend("cpp"):
        benchmark.pedantic(step, rounds=3, warmup_rounds=1)
    assert torch.isfinite(logits.grad).all()
