"""`fastlt bench ops`: each fused op (C++ CPU kernel by default) vs the eager reference vs torch.compile(reference).

``--backend`` picks the fused implementation (cpp, triton, reference: every install can run it; Triton on CPU
tensors runs in its interpreter, so it gets small shapes) and ``--device`` the tensors' device (cpu, cuda).

Reports median and best ms, achieved GB/s (minimum bytes read + written / best time) and that as a % of the copy
bandwidth measured in the same run (also from its best time: on a shared machine the best of N repeats is the run
least disturbed by other work, for the kernel and the copy alike). Figures: BENCHMARKS.md.
Regenerate: `.venv/bin/fastlt bench ops`.
"""

import os

import torch

import fastlt
from fastlt.bench.timing import copy_bandwidth_gbs, measure, progress

AGGREGATE_SHAPES = [(3, 256, 1000), (4, 512, 8142)]  # (E, B, C)
NORMALIZE_SHAPES = [(1000, 512), (8142, 2048)]  # (C, D)
SWEEP_SHAPE = dict(num_taus=21, rows=20_000, classes=1000, dim=512)
# (N, C, H, W) channels_last: the RIDE ResNet-32 layers at batch 128 (the experts' 3/4 width: 24 and 48 channels)
BATCH_NORM_SHAPES = [(128, 16, 32, 32), (128, 24, 16, 16), (128, 48, 8, 8)]
# Triton's interpreter runs a kernel in numpy, ~1000x slower than compiled code: small shapes only.
INTERPRETER_SHAPES = dict(aggregate=[(3, 32, 100)], normalize=[(100, 64)],
                          sweep=dict(num_taus=5, rows=200, classes=100, dim=64))


def _batch_norm_output(input, weight, bias):
    return fastlt.ops.batch_norm_channels_last(input, weight, bias)[0]


def _torch_batch_norm_output(input, weight, bias):
    """torch's training-mode batch norm as nn.BatchNorm2d runs it (the op's reference also computes the unbiased
    variance in a separate reduction, which would flatter the kernel)."""
    return torch.nn.functional.batch_norm(input, None, None, weight, bias, training=True)


def default_backend(device="cpu"):
    """The fused implementation this install runs on ``device``: the compiled kernels, else Triton, else the
    reference (a pure-Python install on CPU without the Triton interpreter)."""
    from fastlt import _extension, kernels

    cuda = torch.device(device).type == "cuda"
    if _extension.AVAILABLE and (not cuda or _extension.HAS_CUDA):
        return "cpp"
    if kernels.AVAILABLE and (cuda or os.environ.get("TRITON_INTERPRET") == "1"):
        return "triton"
    return "reference"


def shapes(quick=False, backend="auto", device="cpu"):
    """(aggregate, normalize, sweep) problem sizes for this run."""
    backend = default_backend(device) if backend == "auto" else backend
    if backend == "triton" and torch.device(device).type == "cpu":
        return INTERPRETER_SHAPES["aggregate"], INTERPRETER_SHAPES["normalize"], INTERPRETER_SHAPES["sweep"]
    return AGGREGATE_SHAPES, NORMALIZE_SHAPES, SWEEP_SHAPE if not quick else dict(SWEEP_SHAPE, rows=5_000)


def problem(quick=False, backend="auto", device="cpu"):
    aggregate, normalize, sweep = shapes(quick, backend, device)
    backend = default_backend(device) if backend == "auto" else backend
    return (f"fp32 on {device}, fused = the {backend} backend; expert_aggregate (E, B, C) in {aggregate}, "
            f"tau_normalize (C, D) in {normalize}, tau_sweep K={sweep['num_taus']} taus N={sweep['rows']} "
            f"C={sweep['classes']} D={sweep['dim']}; batch_norm_channels_last (N, C, H, W) in {BATCH_NORM_SHAPES} "
            f"(CPU kernel only; eager = F.batch_norm in training); {5 if quick else 20} timed repeats")


def _implementations(fused, reference, quick):
    impls = {"fused": fused, "eager": reference}
    if not quick:
        impls["compile"] = torch.compile(reference, dynamic=False)
    return impls


def _time_modes(impls, make_inputs, fwd_bytes, fwd_bwd_bytes, grad_shape, bandwidth, label, repeats, device,
                grad_layout=torch.contiguous_format):
    rows = []
    for mode, num_bytes in (("fwd", fwd_bytes), ("fwd+bwd", fwd_bwd_bytes)):
        eager_ms = None
        for impl, fn in impls.items():
            inputs = make_inputs(mode == "fwd+bwd")
            grad = torch.randn(grad_shape, device=device).to(memory_format=grad_layout)

            def step():
                inputs[0].grad = None  # no gradient accumulation across repeats (it would add a read + write)
                out = fn(*inputs)
                if mode == "fwd+bwd":
                    out.backward(grad)

            median_ms, best_ms = measure(step, warmup=2, repeats=repeats)
            eager_ms = median_ms if impl == "eager" else eager_ms
            gbs = num_bytes / (best_ms * 1e-3) / 1e9
            rows.append(dict(op=label[0], shape=label[1], mode=mode, impl=impl, ms=median_ms, best_ms=best_ms,
                             gbs=gbs, pct_copy_bw=100 * gbs / bandwidth))
        for row in rows[-len(impls):]:
            row["speedup_vs_eager"] = eager_ms / row["ms"]
    return rows


def run(quick: bool = False, backend: str = "auto", device: str = "cpu") -> list:
    ops = fastlt.ops
    backend = default_backend(device) if backend == "auto" else backend
    aggregate_shapes, normalize_shapes, sweep_shape = shapes(quick, backend, device)
    bandwidth = copy_bandwidth_gbs(device=device)
    repeats = 5 if quick else 20
    rows = [dict(op="copy_", shape="256 MiB", mode="fwd", impl="torch", ms=None, best_ms=None, gbs=bandwidth,
                 pct_copy_bw=100.0, speedup_vs_eager=None)]
    cases = [("expert_aggregate", shape) for shape in aggregate_shapes]
    cases += [("tau_normalize", shape) for shape in normalize_shapes] + [("tau_sweep", None)]
    if torch.device(device).type == "cpu" and backend == "cpp":  # the op has a CPU kernel only
        cases += [("batch_norm_channels_last", shape) for shape in BATCH_NORM_SHAPES]
    with ops.use_backend(backend):
        for op, shape in progress(cases, "fastlt bench ops"):
            if op == "expert_aggregate":
                E, B, C = shape

                def make_inputs(grad, E=E, B=B, C=C):
                    return (torch.randn(E, B, C, device=device, requires_grad=grad),)

                impls = _implementations(ops.expert_aggregate, ops.expert_aggregate_reference, quick)
                size = B * C * 4
                rows += _time_modes(impls, make_inputs, (E + 1) * size, (2 * E + 2) * size, (B, C), bandwidth,
                                    ("expert_aggregate", f"E={E} B={B} C={C}"), repeats, device)
            elif op == "tau_normalize":
                C, D = shape

                def make_inputs(grad, C=C, D=D):
                    return (torch.randn(C, D, device=device, requires_grad=grad), 0.7)

                impls = _implementations(ops.tau_normalize, ops.tau_normalize_reference, quick)
                size = C * D * 4
                rows += _time_modes(impls, make_inputs, 2 * size, 5 * size, (C, D), bandwidth,
                                    ("tau_normalize", f"C={C} D={D}"), repeats, device)
            elif op == "batch_norm_channels_last":
                N, C, H, W = shape

                def make_inputs(grad, shape=shape):
                    input = torch.randn(shape).to(memory_format=torch.channels_last).requires_grad_(grad)
                    return input, torch.rand(shape[1]) + 0.5, torch.randn(shape[1])

                impls = _implementations(_batch_norm_output, _torch_batch_norm_output, quick)
                size = N * C * H * W * 4
                rows += _time_modes(impls, make_inputs, 2 * size, 5 * size, shape, bandwidth,
                                    ("batch_norm_channels_last", f"N={N} C={C} H={H} W={W}"), repeats, device,
                                    grad_layout=torch.channels_last)
            else:
                rows += _sweep_rows(sweep_shape, device)
    for row in rows:
        if row["impl"] == "fused":
            row["impl"] = f"fused ({backend})"
    return rows


def _sweep_rows(s, device):
    features = torch.randn(s["rows"], s["dim"], device=device)
    weight = torch.randn(s["classes"], s["dim"], device=device)
    taus = torch.linspace(0, 2, s["num_taus"])
    label = f"K={s['num_taus']} N={s['rows']} C={s['classes']} D={s['dim']}"
    fused_ms, _ = measure(lambda: fastlt.ops.tau_sweep(features, weight, taus), warmup=1, repeats=3)
    eager_ms, _ = measure(lambda: fastlt.ops.tau_sweep_reference(features, weight, taus), warmup=1, repeats=3)
    return [
        dict(op="tau_sweep", shape=label, mode="fwd", impl="fused", ms=fused_ms, best_ms=None, gbs=None,
             pct_copy_bw=None, speedup_vs_eager=eager_ms / fused_ms),
        dict(op="tau_sweep", shape=label, mode="fwd", impl="eager (loop over taus)", ms=eager_ms, best_ms=None,
             gbs=None, pct_copy_bw=None, speedup_vs_eager=1.0),
    ]
