"""`fastlt bench losses`: the fused losses (C++ CPU kernel) vs the eager reference vs torch.compile(reference).

fwd+bwd time (median ms, same run, so the ratios compare like with like) and peak memory allocated beyond the
returned gradient, as a % of the gradient's size (from the torch profiler's allocator events, which include the
kernels' own scratch). Figures: BENCHMARKS.md "Fused losses". Regenerate: `.venv/bin/python -m bench.losses`.
"""

import torch

import fastlt
from fastlt.bench.timing import format_table, measure

RIDE_SHAPES = [(3, 128, 100), (3, 256, 1000), (4, 512, 8142)]  # (E, B, C)


def long_tailed_counts(num_classes, imbalance=100.0):
    """Exponential profile from 1000 samples down to 1000 / imbalance (CIFAR-LT style)."""
    exponents = torch.arange(num_classes, dtype=torch.float64) / max(num_classes - 1, 1)
    return (1000.0 * imbalance**-exponents).floor().clamp_min(1)


def peak_extra_bytes(step, keep_bytes):
    """Peak bytes allocated while ``step()`` runs, beyond ``keep_bytes`` (what it legitimately returns)."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events() if e.name() == "[memory]")
    total = peak = 0
    for _, nbytes in events:
        total += nbytes
        peak = max(peak, total)
    return peak - keep_bytes


def _ride_rows(shape, quick):
    E, B, C = shape
    counts = long_tailed_counts(C)
    logits = (torch.randn(E, B, C) * 10).requires_grad_(True)
    target = torch.randint(0, C, (B,))
    grad_bytes = logits.numel() * logits.element_size()

    def loss_fn(fn):
        return lambda: fn(logits, target, counts, drw=True)

    impls = {"fused": fastlt.ops.ride_loss, "eager": fastlt.ops.ride_loss_reference}
    if not quick:
        impls["compile"] = torch.compile(fastlt.ops.ride_loss_reference, dynamic=False)
    rows = []
    for name, fn in impls.items():
        compute = loss_fn(fn)

        def step():
            logits.grad = None
            compute().backward()

        median_ms, _ = measure(step, warmup=2, repeats=3 if quick else 10)
        logits.grad = None
        extra = peak_extra_bytes(step, grad_bytes)
        rows.append(dict(op="ride_loss", shape=f"{E}x{B}x{C}", dtype="fp32", mode="fwd+bwd", impl=name, ms=median_ms,
                         peak_extra_mb=extra / 2**20, peak_extra_pct_of_grad=100 * extra / grad_bytes))
    fused_ms = rows[0]["ms"]
    for row in rows:
        row["fused_speedup"] = row["ms"] / fused_ms
    return rows


def run(quick: bool = False) -> list[dict]:
    """One row per (loss, shape, implementation); ``quick`` skips torch.compile and the largest shape."""
    if not fastlt._extension.AVAILABLE:
        raise RuntimeError("fastlt bench losses: the compiled extension is not built")
    torch.manual_seed(0)
    shapes = RIDE_SHAPES[:-1] if quick else RIDE_SHAPES
    rows = []
    with fastlt.ops.use_backend("cpp"):
        for shape in shapes:
            rows += _ride_rows(shape, quick)
    return rows


if __name__ == "__main__":
    print(format_table(run()))
