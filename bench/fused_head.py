"""`fastlt bench fused-head`: RIDE's cosine classifiers + loss at large class counts, fused
(:func:`fastlt.ops.linear_ride_loss`, no [E, B, C] logits) vs (a) eager NormedLinear heads + the eager RIDE loss
reference, (b) the same heads + fastlt's fused ``ride_loss``, (c) ``torch.compile`` of (a).

E = 3 experts, B = 256, D = 512, fp32 on the CPU, DRW on. Per row: fwd+bwd time (median ms) and the peak memory
allocated beyond the inputs, the weight and their gradients (torch profiler allocator events, as ``bench losses``),
then the largest C that fits in 8 GiB, from a linear fit of the total bytes (inputs, weight, gradients, peak extra)
over the measured class counts. Figures: BENCHMARKS.md "Fused head". Regenerate: `fastlt bench fused-head`.
`--world-size W`: the class-parallel head on W processes against the replicated head under DDP
(bench/fused_head_parallel.py).

After the RIDE rows, at the same sizes, the two compositions over the same fused head (docs/methods.md 8.5):
:func:`fastlt.ops.linear_prior_shifted_ce` (E = 3 cosine heads, taus 0, 1, 2 as BalPoE's) vs the heads + fastlt's
fused ``prior_shifted_ce``, and :func:`fastlt.ops.linear_reslt_loss` (K = 3 branches through one shared linear
classifier, beta = 0.995, groups at 35 % and 70 % of the labels) vs the branch logits + fastlt's fused
``reslt_loss``.
"""

import torch

import fastlt
from fastlt.bench.losses import long_tailed_counts, peak_extra_bytes
from fastlt.bench.timing import measure, progress
from fastlt.ops.linear_ride_loss import expert_logits

EXPERTS, BATCH, DIM = 3, 256, 512
CLASS_COUNTS = (10_000, 100_000, 300_000)
QUICK_CLASS_COUNTS = (2_000, 10_000)
BUDGET_BYTES = 8 * 2**30
RESLT_BETA = 0.995  # CIFAR-100-LT r = 100 (docs/methods.md 4.4)


def problem(quick=False):
    sizes = QUICK_CLASS_COUNTS if quick else CLASS_COUNTS
    return (f"E={EXPERTS}, B={BATCH}, D={DIM}, fp32 CPU, C in {sizes}, fwd+bwd; memory: peak beyond inputs, weight "
            f"and gradients; max C: largest C within 8 GiB in all, from a linear fit over C; RIDE, then the "
            f"prior-shifted CE (E={EXPERTS} cosine heads) and ResLT (K={EXPERTS} branches, one linear classifier)")


def _implementations(features, weight, target, counts, quick):
    def heads(x, w):  # RIDE's NormedLinear x 30 for E experts ([E, C, D] weight rows)
        return expert_logits(x, w, normalize=True, scale=30.0)

    def eager(x, w):
        return fastlt.ops.ride_loss_reference(heads(x, w), target, counts, drw=True)

    def fused_loss(x, w):
        return fastlt.ops.ride_loss(heads(x, w), target, counts, drw=True)

    impls = {
        "fused linear_ride_loss": lambda: fastlt.ops.linear_ride_loss(features, weight, target, counts, drw=True),
        "(b) heads + fused ride_loss": lambda: fused_loss(features, weight),
        "(a) heads + eager reference": lambda: eager(features, weight),
    }
    if not quick:
        compiled = torch.compile(eager, dynamic=False)
        impls["(c) torch.compile of (a)"] = lambda: compiled(features, weight)
    return impls


def _prior_shifted_ce_implementations(features, weight, target, counts):
    """E cosine heads ([E, C, D] weight) + the prior-shifted CE: fused vs the heads + the fused loss op."""
    taus = torch.arange(EXPERTS, dtype=torch.float64)  # BalPoE's 0, 1, 2
    return {
        "fused linear_prior_shifted_ce": lambda: fastlt.ops.linear_prior_shifted_ce(features, weight, target, counts,
                                                                                    taus=taus),
        "(b) heads + fused prior_shifted_ce": lambda: fastlt.ops.prior_shifted_ce(
            expert_logits(features, weight, normalize=True, scale=30.0), target, counts, taus=taus),
    }


def _reslt_implementations(features, weight, target, counts):
    """K branches through one shared linear classifier ([C, D] weight) + ResLT's loss: fused vs the branch logits
    + the fused loss op."""
    num_classes = weight.shape[0]
    cutoffs = [num_classes * 35 * branch // 100 for branch in range(1, EXPERTS)]  # 35 % and 70 % for 3 branches
    groups = fastlt.ops.reslt_groups(counts, cutoffs=cutoffs, num_branches=EXPERTS)
    return {
        "fused linear_reslt_loss": lambda: fastlt.ops.linear_reslt_loss(features, weight, target, groups,
                                                                        beta=RESLT_BETA),
        "(b) branch logits + fused reslt_loss": lambda: fastlt.ops.reslt_loss(features @ weight.t(), target, groups,
                                                                              beta=RESLT_BETA),
    }


def _composition_rows_for(num_classes, history):
    target = torch.randint(0, num_classes, (BATCH,))
    counts = long_tailed_counts(num_classes)
    rows = []
    for weight_shape, implementations in (((EXPERTS, num_classes, DIM), _prior_shifted_ce_implementations),
                                          ((num_classes, DIM), _reslt_implementations)):
        features = torch.randn(EXPERTS, BATCH, DIM, requires_grad=True)
        weight = torch.randn(*weight_shape, requires_grad=True)
        block = _measure(num_classes, features, weight, implementations(features, weight, target, counts), history)
        _compare(block[0], block[1], "b")
        rows += block
    return rows


def _compare(fused, other, name):
    """The fused row's time and peak-memory ratios against the row ``other`` (labelled ``name``; none when it was
    not run)."""
    if fused["ms"] is None or other["ms"] is None:
        return
    fused[f"time_vs_{name}"] = fused["ms"] / other["ms"]
    fused[f"memory_{name}_over_fused"] = other["peak_extra_mb"] / max(fused["peak_extra_mb"], 1e-9)


def _rows_for(num_classes, quick, history):
    features = torch.randn(EXPERTS, BATCH, DIM, requires_grad=True)
    weight = torch.randn(EXPERTS, num_classes, DIM, requires_grad=True)
    target = torch.randint(0, num_classes, (BATCH,))
    counts = long_tailed_counts(num_classes)
    return _measure(num_classes, features, weight, _implementations(features, weight, target, counts, quick),
                    history)


def _predicted_bytes(points, num_classes):
    """Total bytes at ``num_classes`` from the (C, bytes) points measured so far (linear in C), or None."""
    if not points:
        return None
    (c0, bytes0), (c1, bytes1) = points[0], points[-1]
    per_class = (bytes1 - bytes0) / (c1 - c0) if c1 > c0 else bytes1 / c1
    return bytes1 + per_class * (num_classes - c1)


def _measure(num_classes, features, weight, implementations, history):
    """One row per implementation; ``history`` (impl -> measured (C, total bytes)) grows with each. An
    implementation predicted to need more than the 8 GiB budget at this C is not run (it would only show that it
    does not fit, or be killed for memory on a smaller machine): its row says so."""
    held = 2 * (features.numel() + weight.numel()) * 4  # inputs and their gradients
    rows = []
    for name, compute in implementations.items():
        predicted = _predicted_bytes(history.get(name, []), num_classes)
        if predicted is not None and predicted > BUDGET_BYTES:
            rows.append(dict(C=num_classes, impl=name, ms=None, peak_extra_mb=None, total_mb=None,
                             note=f"not run: needs ~{predicted / 2**30:.1f} GiB (fit) > 8 GiB"))
            continue

        def step():
            features.grad = weight.grad = None
            compute().backward()

        median_ms, _ = measure(step, warmup=1, repeats=1 if num_classes >= 100_000 else 3)
        features.grad = weight.grad = None
        extra = peak_extra_bytes(step, keep_bytes=(features.numel() + weight.numel()) * 4)
        features.grad = weight.grad = None
        rows.append(dict(C=num_classes, impl=name, ms=median_ms, peak_extra_mb=extra / 2**20,
                         total_mb=(held + extra) / 2**20))
        history.setdefault(name, []).append((num_classes, held + extra))
    return rows


def _largest_class_count(rows):
    """Per implementation: the largest C whose total bytes (linear in C, fitted over the measured C) fit in 8 GiB."""
    by_impl = {}
    for row in rows:
        if row["total_mb"] is not None:
            by_impl.setdefault(row["impl"], []).append((row["C"], row["total_mb"] * 2**20))
    for row in rows:
        points = sorted(by_impl[row["impl"]])
        (c0, bytes0), (c1, bytes1) = points[0], points[-1]
        per_class = (bytes1 - bytes0) / (c1 - c0) if c1 > c0 else bytes1 / c1
        fixed = bytes1 - per_class * c1
        row["bytes_per_class"] = per_class
        row["max_C_in_8GiB"] = int((BUDGET_BYTES - fixed) / per_class)
    return rows


def run(quick: bool = False, class_counts=None) -> list[dict]:
    """One row per (C, implementation): the RIDE rows at every C, then the prior-shifted CE and ResLT rows; each
    fused row's ``time_vs_b`` and memory ratios compare it with the materialised logits + fused loss op (b) (and
    RIDE's with the eager reference (a))."""
    torch.manual_seed(0)
    sizes = class_counts or (QUICK_CLASS_COUNTS if quick else CLASS_COUNTS)
    rows, history = [], {}
    with fastlt.ops.use_backend("auto"):
        for num_classes in progress(sizes, "fastlt bench fused-head"):
            block = _rows_for(num_classes, quick, history)
            _compare(block[0], block[1], "b")
            if block[0]["ms"] is not None and block[2]["ms"] is not None:
                block[0]["memory_a_over_fused"] = block[2]["peak_extra_mb"] / max(block[0]["peak_extra_mb"], 1e-9)
            rows += block
        for num_classes in progress(sizes, "fastlt bench fused-head: prior-shifted CE and ResLT"):
            rows += _composition_rows_for(num_classes, history)
    return _largest_class_count(rows) if len(sizes) > 1 else rows


if __name__ == "__main__":
    from fastlt.bench.timing import format_table

    print(format_table(run()))
