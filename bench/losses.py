"""`fastlt bench losses`: the fused losses ride_loss, reslt_loss and prior_shifted_ce (C++ CPU kernels) vs the eager
reference vs torch.compile(reference).

fwd+bwd time (median ms, same run, so the ratios compare like with like) and peak memory allocated beyond the
returned gradient, as a % of the gradient's size (from the torch profiler's allocator events, which include the
kernels' own scratch). Figures: BENCHMARKS.md "Fused losses". Regenerate: `.venv/bin/python -m fastlt.bench.losses`.
"""

import torch

import fastlt
from fastlt.bench.ops import default_backend
from fastlt.bench.timing import format_table, measure, progress

LOSS_SHAPES = [(3, 128, 100), (3, 256, 1000), (4, 512, 8142)]  # (E or K, B, C)
INTERPRETER_SHAPES = [(3, 16, 100)]  # Triton's interpreter on CPU tensors


def shapes(quick=False, backend="auto", device="cpu"):
    backend = default_backend(device) if backend == "auto" else backend
    if backend == "triton" and torch.device(device).type == "cpu":
        return INTERPRETER_SHAPES
    return LOSS_SHAPES[:-1] if quick else LOSS_SHAPES


def problem(quick=False, backend="auto", device="cpu"):
    backend = default_backend(device) if backend == "auto" else backend
    return (f"fp32 logits on {device}, fused = the {backend} backend; "
            f"(E or K, B, C) in {shapes(quick, backend, device)}, fwd+bwd, {3 if quick else 10} timed repeats")


def long_tailed_counts(num_classes, imbalance=100.0):
    """Exponential profile from 1000 samples down to 1000 / imbalance (CIFAR-LT style)."""
    exponents = torch.arange(num_classes, dtype=torch.float64) / max(num_classes - 1, 1)
    return (1000.0 * imbalance**-exponents).floor().clamp_min(1)


def peak_extra_bytes(step, keep_bytes, device="cpu"):
    """Peak bytes allocated while ``step()`` runs, beyond ``keep_bytes`` (what it legitimately returns)."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        step()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - before - keep_bytes
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events() if e.name() == "[memory]")
    total = peak = 0
    for _, nbytes in events:
        total += nbytes
        peak = max(peak, total)
    return peak - keep_bytes


def _timed_rows(op, shape, logits, impls, quick):
    """fwd+bwd median time and peak extra memory of each ``impls[name]()`` (a loss of ``logits``)."""
    grad_bytes = logits.numel() * logits.element_size()
    rows = []
    for name, compute in impls.items():

        def step():
            logits.grad = None
            compute().backward()

        median_ms, _ = measure(step, warmup=2, repeats=3 if quick else 10)
        logits.grad = None
        extra = peak_extra_bytes(step, grad_bytes, logits.device)
        rows.append(dict(op=op, shape="x".join(map(str, shape)), dtype="fp32", mode="fwd+bwd", impl=name, ms=median_ms,
                         peak_extra_mb=extra / 2**20, peak_extra_pct_of_grad=100 * extra / grad_bytes))
    fused_ms = rows[0]["ms"]
    for row in rows:
        row["fused_speedup"] = row["ms"] / fused_ms
    return rows


def _fused_eager_compiled(fused, reference, args, kwargs, quick):
    """The three implementations of one loss as closures over the same inputs (torch.compile unless quick)."""
    impls = {"fused": lambda: fused(*args, **kwargs), "eager": lambda: reference(*args, **kwargs)}
    if not quick:
        compiled = torch.compile(reference, dynamic=False)
        impls["compile"] = lambda: compiled(*args, **kwargs)
    return impls


def _ride_rows(shape, quick, device):
    E, B, C = shape
    logits = (torch.randn(E, B, C, device=device) * 10).requires_grad_(True)
    args = (logits, torch.randint(0, C, (B,), device=device), long_tailed_counts(C).to(device))
    impls = _fused_eager_compiled(fastlt.ops.ride_loss, fastlt.ops.ride_loss_reference, args, dict(drw=True), quick)
    return _timed_rows("ride_loss", shape, logits, impls, quick)


def _reslt_rows(shape, quick, device):
    K, B, C = shape
    logits = (torch.randn(K, B, C, device=device) * 10).requires_grad_(True)
    # Nested groups at even label cut-offs (the shot rule gives at most 3 branches).
    groups = fastlt.ops.reslt_groups(long_tailed_counts(C), cutoffs=[C * k // K for k in range(1, K)],
                                     num_branches=K).to(device)
    args = (logits, torch.randint(0, C, (B,), device=device), groups)
    impls = _fused_eager_compiled(fastlt.ops.reslt_loss, fastlt.ops.reslt_loss_reference, args, dict(beta=0.995),
                                  quick)
    return _timed_rows("reslt_loss", shape, logits, impls, quick)


def _prior_shifted_rows(shape, quick, device):
    E, B, C = shape
    logits = (torch.randn(E, B, C, device=device) * 10).requires_grad_(True)
    taus = [float(k) for k in range(E)]  # tau = 0 (plain CE), 1 (Balanced Softmax), 2, ...: the SADE/BalPoE family
    args = (logits, torch.randint(0, C, (B,), device=device), long_tailed_counts(C).to(device))
    impls = _fused_eager_compiled(fastlt.ops.prior_shifted_ce, fastlt.ops.prior_shifted_ce_reference, args,
                                  dict(taus=taus), quick)
    return _timed_rows("prior_shifted_ce", shape, logits, impls, quick)


def run(quick: bool = False, backend: str = "auto", device: str = "cpu") -> list[dict]:
    """One row per (loss, shape, implementation); ``quick`` skips torch.compile and the largest shape."""
    backend = default_backend(device) if backend == "auto" else backend
    torch.manual_seed(0)
    cases = [(loss_rows, shape) for loss_rows in (_ride_rows, _reslt_rows, _prior_shifted_rows)
             for shape in shapes(quick, backend, device)]
    rows = []
    with fastlt.ops.use_backend(backend):
        for loss_rows, shape in progress(cases, "fastlt bench losses"):
            rows += loss_rows(shape, quick, device)
    for row in rows:
        if row["impl"] == "fused":
            row["impl"] = f"fused ({backend})"
    return rows


if __name__ == "__main__":
    print(format_table(run()))
