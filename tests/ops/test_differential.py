"""Differential test of every fastlt op against its eager reference.

A seeded generator draws inputs for each op over shapes (B = 1, C = 1 / 2, odd sizes), strides (transposed, sliced,
broadcast and offset views), dtypes (fp32, fp64, bf16, fp16, mixed), NaN / Inf placement and argument values,
invalid ones included. Every backend (reference, cpp, triton; the fused heads' chunked PyTorch loop, "torch"; their
CUDA versions when a GPU is present; the raw ``torch.ops.fastlt`` ops of expert_aggregate / tau_normalize /
tau_sweep / batch_norm_channels_last, the last a CPU-only op: its C++ CPU kernel alone) runs each draw, and they must
either all refuse it with the same exception type at the same stage (forward, backward, second backward) or agree
with the reference within the dtype tolerance. Each draw's mode decides what is compared: values only; first-order
gradients; ``create_graph=True`` (the gradients of a function of the gradients: second order); ``retain_graph=True``
(a second backward through the same graph, after which the first gradients must be unchanged); or
``torch.func.grad``. A draw known to be invalid must be refused with a ValueError.

The ops drawn are read from the op registry (the C++ sources' ``m.def`` lines, as tests/ops/test_op_registry.py
reads them): an op without a drawer fails the test. The compositions on the fused head (linear_prior_shifted_ce,
linear_reslt_loss) are drawn too.

    FASTLT_DIFF_DRAWS=3000 FASTLT_DIFF_SEED=1 pytest tests/ops/test_differential.py    # a longer / other run

A failure names the op, the seed and the draw; FASTLT_DIFF_ONLY=<draw> replays that draw alone.
"""

import dataclasses
import importlib
import math
import os
import random
import zlib
from typing import Callable, Optional
from unittest import mock

import pytest
import torch
from op_helpers import REGISTERED_OPS

from fastlt import _extension, ops
from fastlt.ops._library import CPU_ONLY_OPS
from fastlt.ops.batch_norm_channels_last import LOW_PRECISION
from fastlt.ops._selfcheck import TOLERANCES, tolerance

DRAWS = int(os.environ.get("FASTLT_DIFF_DRAWS", "300"))
SEED = int(os.environ.get("FASTLT_DIFF_SEED", "0"))
ONLY = os.environ.get("FASTLT_DIFF_ONLY")

FLOAT_DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]


def _backends():
    names = ["reference"] + (["cpp"] if _extension.AVAILABLE else []) + ["triton"]
    runs = [(name, "cpu") for name in names]
    if torch.cuda.is_available():
        runs += [(name, "cuda") for name in names if name != "cpp" or _extension.HAS_CUDA]
    return runs


BACKENDS = _backends()


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny tensors: waking an intra-op thread pool per op costs more than the op (30x on a loaded 2-core machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ---- draws ----


@dataclasses.dataclass
class Input:
    """A tensor argument: ``view(base)`` is what the op receives (a strided view of ``base``, the leaf)."""

    base: torch.Tensor
    view: Callable = lambda t: t
    grad: bool = False  # differentiate with respect to base


@dataclasses.dataclass
class Draw:
    label: str
    inputs: dict  # name -> Input
    call: Callable  # call(**views) -> output tensor, or a tuple: (output, *statistics); runs under use_backend
    mode: str = "gradients"  # one of MODES: what is compared beyond the values
    invalid: Optional[str] = None  # a known-invalid argument: every backend must raise ValueError
    raw: Optional[Callable] = None  # raw(overload, **views): the registered op called directly ("default" or "triton")
    compare: Optional[Callable] = None  # compare(actual, expected, views) for outputs that are not tolerance-equal
    dtype: torch.dtype = torch.float32  # of the main input: results are no more precise than its accumulation dtype
    magnitude: float = 1.0  # of the terms a result is a difference of, when larger than the result: the atol's scale
    condition: float = 1.0  # how many times its own size the terms of a result are (batch norm of values far from
    # their mean): the atol's factor over the reference's largest magnitude
    statistics: tuple = ()  # names of the values-only outputs after the first when call returns a tuple
    # every result only as exact as the main input's dtype, float32 ones included: sums of the rounded inputs that
    # each backend forms differently (batch norm of a bf16 batch: torch rounds its statistics to bf16 on the way)
    input_precision: bool = False
    chunked_loop: bool = False  # a fused head's: also run the chunked PyTorch loop ("torch")


# values only; + gradients; + gradients of a function of the gradients (create_graph=True); + a second backward
# through the same graph (retain_graph=True) after which the first gradients are unchanged; + torch.func.grad
MODES = ("values", "gradients", "create_graph", "retain_graph", "func_grad")


class Gen:
    """Seeded choices (random.Random) and tensors (torch.Generator) of one draw."""

    def __init__(self, seed):
        self.rng = random.Random(seed)
        self.torch = torch.Generator().manual_seed(seed)

    def pick(self, *options, weights=None):
        return self.rng.choices(options, weights=weights)[0]

    def chance(self, p):
        return self.rng.random() < p

    def randn(self, shape, scale=1.0):
        return torch.randn(shape, generator=self.torch, dtype=torch.float64) * scale

    def randint(self, low, high, shape):
        return torch.randint(low, high, shape, generator=self.torch)

    def dtype(self):
        return self.pick(*FLOAT_DTYPES, weights=[4, 3, 2, 2])

    def mode(self):
        return self.pick(*MODES, weights=[1, 2, 2, 1, 1])

    def float_input(self, shape, dtype, scale=1.0, grad=False, special=0.15, prepare=None):
        """A float tensor of ``shape`` as a random layout (contiguous, permuted, sliced, broadcast, offset), with
        NaN / +-inf at a random element with probability ``special``; ``prepare(values)`` edits it first."""
        values = self.randn(shape, scale)
        if prepare is not None:
            prepare(values)
        if special and self.chance(special) and values.numel():
            values.view(-1)[self.rng.randrange(values.numel())] = self.pick(math.nan, math.inf, -math.inf)
        return self.layout(values.to(dtype), grad)

    def layout(self, values, grad=False, broadcast=True):
        """``values`` as one of the layouts; ``broadcast`` (row 0 repeated) only where the rows' content may change."""
        shape = tuple(values.shape)
        kinds = ("contiguous", "permuted", "sliced", "broadcast", "offset")
        kind = self.pick(*kinds, weights=[4, 2, 2, int(broadcast), 1])
        if kind == "permuted" and len(shape) >= 2:
            perm = list(range(len(shape)))
            while perm == sorted(perm):
                self.rng.shuffle(perm)
            inverse = [perm.index(i) for i in range(len(shape))]
            return Input(values.permute(perm).contiguous(), lambda t: t.permute(inverse), grad)
        if kind == "sliced" and shape:
            base = torch.zeros(shape[:-1] + (2 * shape[-1],), dtype=values.dtype)
            base[..., ::2] = values
            return Input(base, lambda t: t[..., ::2], grad)
        if kind == "broadcast" and shape and shape[0] > 1:
            return Input(values[:1].clone(), lambda t: t.expand(shape), grad)
        if kind == "offset" and shape:
            base = torch.cat([torch.zeros((1,) + shape[1:], dtype=values.dtype), values])
            return Input(base, lambda t: t[1:], grad)
        return Input(values, lambda t: t, grad)


def _counts(gen, num_classes):
    """Positive training counts spanning the many / medium / few ranges, as int64 or float."""
    counts = torch.tensor([gen.pick(1, 3, 7, 19, 20, 50, 100, 101, 300, 1000) for _ in range(num_classes)])
    return counts.to(gen.pick(torch.int64, torch.float32, torch.float64))


def _target(gen, batch, num_classes):
    target = gen.randint(0, num_classes, (batch,))
    if gen.chance(0.2):
        base = torch.stack([target, gen.randint(0, num_classes, (batch,))], 1)
        return Input(base, lambda t: t[:, 0])  # stride 2
    return Input(target)


def draw_expert_aggregate(gen):
    dtype = gen.dtype()
    E = gen.pick(1, 2, 3, 4, 5, 6, 7, 8, weights=[3, 4, 4, 2, 1, 1, 1, 1])
    B, C = gen.pick(1, 2, 3, 5, weights=[4, 3, 2, 1]), gen.pick(1, 2, 3, 7, 33)
    invalid = None
    if gen.chance(0.02):
        E, B, C, invalid = 65, 1, 2, "experts"
    reduce = gen.pick("mean", "sum")
    if gen.chance(0.04):
        reduce, invalid = gen.pick("max", "", "Mean"), "reduce"
    inputs = {"logits": gen.float_input((E, B, C), dtype, scale=3.0, grad=True)}
    weights_kind = gen.pick(None, "expert", "row", weights=[2, 2, 2])
    if weights_kind:
        shape = (E,) if weights_kind == "expert" else (B, E)
        if gen.chance(0.05):
            shape, invalid = gen.pick((E + 1,), (B + 1, E), (B, E, 1)), "weights"
        weight_dtype = dtype if gen.chance(0.7) else gen.dtype()
        inputs["weights"] = gen.float_input(shape, weight_dtype, grad=True, special=0.05)
        if gen.chance(0.03) and invalid is None:
            inputs["weights"], invalid = Input(gen.randint(0, 3, shape)), "weights"
    if gen.chance(0.4):
        active = torch.rand((B, E), generator=gen.torch) > 0.5
        active[torch.arange(B), gen.randint(0, E, (B,))] = True
        if gen.chance(0.1):
            active[gen.rng.randrange(B)] = False
            invalid = "active row"
        if gen.chance(0.03):
            active, invalid = active.float(), "active"
        inputs["active"] = gen.layout(active, broadcast=False)

    def call(logits, weights=None, active=None):
        return ops.expert_aggregate(logits, reduce=reduce, weights=weights, active=active)

    def raw(overload, logits, weights=None, active=None):
        return getattr(torch.ops.fastlt.expert_aggregate, overload)(logits, reduce, weights, active)

    label = f"E={E} B={B} C={C} {dtype} reduce={reduce!r} weights={weights_kind} active={'active' in inputs}"
    return Draw(label, inputs, call, mode=gen.mode(), invalid=invalid, raw=raw, dtype=dtype)


def draw_tau_normalize(gen):
    dtype = gen.dtype()
    C, D = gen.pick(1, 2, 3, 5, weights=[4, 3, 2, 1]), gen.pick(1, 2, 3, 7, 16)
    tau = gen.pick(0.0, 0.3, 0.5, 1.0, 1.7, 2.0)
    eps = gen.pick(1e-12, 1e-6, 0.1, 1.0)
    invalid = None
    if gen.chance(0.05):
        tau, invalid = gen.pick(-0.5, math.nan, math.inf), "tau"
    if gen.chance(0.05):
        eps, invalid = gen.pick(0.0, -1e-3, math.nan, math.inf), "eps"
    zero_row = gen.chance(0.2)  # its norm is clamped to eps

    def prepare(values):
        if zero_row:
            values[gen.rng.randrange(C)] = 0

    weight = gen.float_input((C, D), dtype, scale=gen.pick(1.0, 0.05), grad=True, prepare=prepare)

    def call(weight):
        return ops.tau_normalize(weight, tau, eps=eps)

    # d (w / ||w||^tau) / d w is a difference of terms ||w||^-tau large (its radial part cancels) for a row above eps
    # (below, the norm is the constant eps): small rows round in proportion
    norms = torch.linalg.vector_norm(weight.view(weight.base).double(), dim=1)
    norms = norms[torch.isfinite(norms) & (norms > eps)] if invalid is None else norms[:0]
    magnitude = float(norms.min()) ** -tau if norms.numel() else 1.0

    def raw(overload, weight):
        return getattr(torch.ops.fastlt.tau_normalize, overload)(weight, tau, eps)

    label = f"C={C} D={D} {dtype} tau={tau} eps={eps}"
    return Draw(label, {"weight": weight}, call, mode=gen.mode(), invalid=invalid, raw=raw, dtype=dtype,
                magnitude=magnitude)


def _tau_sweep_scores(features, weight, taus, bias, eps):
    """fp64 scores [K, N, C] and their rounding scale sum_d |f_d| |w_jd| s_kj + |b_j|."""
    f, w = features.double(), weight.double()
    norms = torch.linalg.vector_norm(w, dim=1).clamp_min(eps)
    scales = norms[None, :] ** -torch.as_tensor(taus, dtype=torch.float64)[:, None]  # [K, C]
    raw, magnitude = f @ w.t(), f.abs() @ w.abs().t()
    b = torch.zeros(w.shape[0], dtype=torch.float64) if bias is None else bias.double()
    return raw[None] * scales[:, None] + b, magnitude[None] * scales[:, None] + b.abs()


def _same_argmax(taus, eps):
    def compare(actual, expected, views):
        """Equal predictions, or near-ties: the two classes' fp64 scores differ by less than fp32 rounding."""
        assert actual.shape == expected.shape and actual.dtype == expected.dtype == torch.long
        differ = actual.cpu() != expected.cpu()
        if not differ.any():
            return
        scores, magnitude = _tau_sweep_scores(views["features"], views["weight"], taus, views.get("bias"), eps)
        k, n = differ.nonzero(as_tuple=True)
        a, e = actual.cpu()[k, n], expected.cpu()[k, n]
        score_a, score_e = scores[k, n, a], scores[k, n, e]
        dtypes = {views["features"].dtype, views["weight"].dtype}
        tol = 1e-10 if torch.float64 in dtypes else 2e-5
        slack = tol * (magnitude[k, n, a] + magnitude[k, n, e])
        near_tie = (score_a - score_e).abs() <= slack
        assert bool(near_tie.all()), (
            f"predictions differ beyond a near-tie at (tau index, row) {list(zip(k.tolist(), n.tolist()))}: "
            f"classes {a.tolist()} vs {e.tolist()}, scores {score_a.tolist()} vs {score_e.tolist()}"
        )

    return compare


def draw_tau_sweep(gen):
    N, C, D = gen.pick(1, 2, 3, 5, weights=[4, 3, 2, 1]), gen.pick(1, 2, 3, 7, 33), gen.pick(1, 2, 4, 5)
    f_dtype = gen.dtype()
    w_dtype = f_dtype if gen.chance(0.7) else gen.dtype()
    K = gen.pick(1, 2, 3)
    taus = [gen.pick(0.0, 0.5, 1.0, 1.5, 2.0) for _ in range(K)]
    eps = gen.pick(1e-12, 1e-6, 0.5)
    invalid = None
    if gen.chance(0.05):
        taus[gen.rng.randrange(K)], invalid = gen.pick(-1.0, math.nan, math.inf), "tau"
    if gen.chance(0.05):
        eps, invalid = gen.pick(0.0, -1.0, math.nan, math.inf), "eps"
    duplicate, zero = gen.chance(0.15), gen.chance(0.15)

    def prepare(values):
        if duplicate:  # exact ties: the first index wins
            values[gen.rng.randrange(C)] = values[gen.rng.randrange(C)]
        if zero:  # clamped to eps
            values[gen.rng.randrange(C)] = 0

    inputs = {
        "features": gen.float_input((N, D), f_dtype, special=0.1),
        "weight": gen.float_input((C, D), w_dtype, scale=gen.pick(1.0, 3.0), special=0.1, prepare=prepare),
    }
    if gen.chance(0.3):
        shape = (C,) if not gen.chance(0.05) else gen.pick((C + 1,), (C, 1))
        invalid = invalid if shape == (C,) else "bias"
        inputs["bias"] = gen.float_input(shape, gen.dtype(), special=0.05)
    taus_as_tensor = gen.chance(0.5)
    if gen.chance(0.04):
        taus, invalid = [], "taus"

    def tau_argument(device):
        return torch.tensor(taus, dtype=torch.float64, device=device) if taus_as_tensor else taus

    def call(features, weight, bias=None):
        return ops.tau_sweep(features, weight, tau_argument(features.device), bias=bias, eps=eps)

    def raw(overload, features, weight, bias=None):
        taus_tensor = torch.tensor(taus, dtype=torch.float64, device=features.device)
        return getattr(torch.ops.fastlt.tau_sweep, overload)(features, weight, taus_tensor, bias, eps)

    label = f"N={N} C={C} D={D} {f_dtype}/{w_dtype} taus={taus} eps={eps} bias={'bias' in inputs}"
    return Draw(label, inputs, call, mode="values", invalid=invalid, raw=raw, compare=_same_argmax(taus, eps))


def _shot_accuracy_oracle(predictions, targets, class_counts, taus):
    """shot_accuracy_per_tau written as plain loops (mean of per-class accuracies over evaluated classes)."""
    counts = [int(c) for c in class_counts]
    groups = {
        "overall": range(len(counts)),
        "many": [c for c, n in enumerate(counts) if n > 100],
        "medium": [c for c, n in enumerate(counts) if 20 <= n <= 100],
        "few": [c for c, n in enumerate(counts) if n < 20],
    }
    rows = []
    for k, row in enumerate(predictions.tolist()):
        per_class = {}
        for c in range(len(counts)):
            hits = [row[i] == c for i, y in enumerate(targets.tolist()) if y == c]
            if hits:
                per_class[c] = sum(hits) / len(hits)
        entry = {"tau": None if taus is None else float(taus[k])}
        for name, classes in groups.items():
            values = [per_class[c] for c in classes if c in per_class]
            entry[name] = 100.0 * sum(values) / len(values) if values else math.nan
        rows.append(entry)
    return rows


def draw_shot_accuracy_per_tau(gen):
    K, N, C = gen.pick(1, 2, 3), gen.pick(1, 2, 5, 9), gen.pick(1, 2, 3, 6)
    class_counts = _counts(gen, C).numpy()
    targets = gen.randint(0, C, (N,))
    predictions = gen.randint(0, C, (K, N))
    taus = gen.pick(None, "match", "fewer", "more", "nested", weights=[2, 6, 1, 1, 1])
    invalid = None
    if taus == "match":
        taus = [round(0.5 * k, 1) for k in range(K)]
    elif taus is not None:
        invalid = "taus"
        taus = {"fewer": [0.0] * (K - 1), "more": [0.0] * (K + 1), "nested": [[0.0] * K]}[taus]
    if gen.chance(0.05):
        targets[gen.rng.randrange(N)], invalid = gen.pick(-1, C), "targets"
    if gen.chance(0.05):
        targets, invalid = targets[:-1] if N > 1 else targets.repeat(2), "targets"
    as_numpy = gen.chance(0.3)
    label = f"K={K} N={N} C={C} taus={taus} numpy={as_numpy}"
    return label, predictions, targets, class_counts, taus, as_numpy, invalid


def _rows(gen):
    """Batch sizes: the Triton interpreter runs one program per row at Python speed, so few rows, mostly."""
    return gen.pick(1, 2, 3, 5, weights=[4, 3, 2, 1])


def _ride_terms(gen):
    """The RIDE loss's valid hyper-parameters, drawn alike for ride_loss and the fused head (in this order)."""
    return dict(
        max_margin=gen.pick(0.5, 0.1, 0.0),
        diversity_factor=gen.pick(-0.45, 0.0, 0.2),
        temperature_factor=gen.pick(0.05, 0.2),
        base_temperature=gen.pick(1.0, 1.5),
        drw=gen.chance(0.5),
        drw_beta=gen.pick(0.9999, 0.99),
    )


def draw_ride_loss(gen):
    dtype = gen.dtype()
    E, B, C = gen.pick(1, 2, 3, 4, weights=[3, 3, 2, 1]), _rows(gen), gen.pick(1, 2, 3, 5, 8)
    kwargs = dict(
        scale=gen.pick(30.0, 1.0, 0.0),
        **_ride_terms(gen),
    )
    invalid = None
    if gen.chance(0.08):
        name, value = gen.pick(("diversity_factor", math.nan), ("max_margin", math.inf), ("base_temperature", 0.0),
                               ("drw_beta", 1.0))
        kwargs[name], invalid = value, name
        kwargs["drw"] = kwargs["drw"] or name == "drw_beta"
    inputs = {"expert_logits": gen.float_input((E, B, C), dtype, scale=gen.pick(1.0, 10.0), grad=True),
              "target": _target(gen, B, C)}
    counts = _counts(gen, C)
    if gen.chance(0.04):
        counts[gen.rng.randrange(C)], invalid = gen.pick(0, -3), "class_counts"
    kwargs["reduction"] = gen.pick("mean", "sum", "none", weights=[2, 1, 1])
    if gen.chance(0.3):  # some rows ignored (every row, at times), NaN / inf logits there included
        kwargs["ignore_index"] = gen.pick(-100, -1)
        target = inputs["target"]
        target.view(target.base)[gen.randint(0, 2, (B,)).bool()] = kwargs["ignore_index"]
    if gen.chance(0.03):
        inputs["target"].base[0], invalid = C, "target"

    def call(expert_logits, target):
        return ops.ride_loss(expert_logits, target, counts.to(expert_logits.device), **kwargs)

    label = f"E={E} B={B} C={C} {dtype} {kwargs}"
    return Draw(label, inputs, call, mode=gen.mode(), invalid=invalid, dtype=dtype)


def draw_reslt_loss(gen):
    dtype = gen.dtype()
    K, B, C = gen.pick(1, 2, 3), _rows(gen), gen.pick(1, 2, 3, 5, 8)
    beta = gen.pick(0.0, 0.5, 0.995, 1.0)
    log_eps = gen.pick(0.0, 0.0, 1e-7)
    fused_log_eps = gen.pick(None, None, 0.0, 1e-7)
    invalid = None
    if gen.chance(0.05):
        beta, invalid = gen.pick(-0.1, 1.5, math.nan), "beta"
    if gen.chance(0.03):
        log_eps, invalid = gen.pick(-1e-7, math.nan), "log_eps"
    if gen.chance(0.02):
        fused_log_eps, invalid = gen.pick(-1e-7, math.inf), "fused_log_eps"
    masks = torch.rand((K, C), generator=gen.torch) > 0.5
    masks[0] = True
    masks[torch.arange(K), gen.randint(0, C, (K,))] = True
    if gen.chance(0.05):
        masks[gen.rng.randrange(K)], invalid = False, "group_masks"
    inputs = {"branch_logits": gen.float_input((K, B, C), dtype, scale=gen.pick(1.0, 10.0), grad=True),
              "target": _target(gen, B, C), "group_masks": gen.layout(masks, broadcast=False)}
    kwargs = dict(beta=beta, log_eps=log_eps, fused_log_eps=fused_log_eps,
                  reduction=gen.pick("mean", "sum", "none", weights=[2, 1, 1]))
    if gen.chance(0.3):  # some rows ignored (every row, at times)
        kwargs["ignore_index"] = gen.pick(-100, -1, C + 3)
        target = inputs["target"]
        target.view(target.base)[gen.randint(0, 2, (B,)).bool()] = kwargs["ignore_index"]

    def call(branch_logits, target, group_masks):
        return ops.reslt_loss(branch_logits, target, group_masks, **kwargs)

    label = f"K={K} B={B} C={C} {dtype} {kwargs}"
    return Draw(label, inputs, call, mode=gen.mode(), invalid=invalid, dtype=dtype)


def draw_prior_shifted_ce(gen):
    dtype = gen.dtype()
    E, B, C = gen.pick(1, 2, 3), _rows(gen), gen.pick(1, 2, 3, 5, 8)
    taus = [gen.pick(0.0, 1.0, 2.0, -1.0) for _ in range(E)]
    invalid = None
    if gen.chance(0.05):
        taus[gen.rng.randrange(E)], invalid = gen.pick(math.nan, math.inf), "taus"
    if gen.chance(0.03):
        taus, invalid = taus + [1.0], "taus"
    inputs = {"expert_logits": gen.float_input((E, B, C), dtype, scale=gen.pick(1.0, 10.0), grad=True),
              "target": _target(gen, B, C)}
    counts = _counts(gen, C)
    if gen.chance(0.04):
        counts = counts.double()
        counts[gen.rng.randrange(C)], invalid = gen.pick(0.0, math.nan, math.inf), "class_counts"
    kwargs = dict(taus=taus, reduction=gen.pick("mean", "sum", "none", weights=[2, 1, 1]))
    if gen.chance(0.3):  # some rows ignored (every row, at times)
        kwargs["ignore_index"] = gen.pick(-100, -1, C + 3)
        target = inputs["target"]
        target.view(target.base)[gen.randint(0, 2, (B,)).bool()] = kwargs["ignore_index"]

    def call(expert_logits, target):
        return ops.prior_shifted_ce(expert_logits, target, counts.to(expert_logits.device), **kwargs)

    label = f"E={E} B={B} C={C} {dtype} {kwargs}"
    return Draw(label, inputs, call, mode=gen.mode(), invalid=invalid, dtype=dtype)


def _ignored_rows(gen, target, kwargs, num_classes):
    """Some rows ignored (every row, at times), with probability 0.3."""
    if gen.chance(0.3):
        kwargs["ignore_index"] = gen.pick(-100, -1, num_classes + 3)
        target.view(target.base)[gen.randint(0, 2, (target.base.shape[0],)).bool()] = kwargs["ignore_index"]


def _head_inputs(gen, dtype, num_experts, batch, num_classes, dim, *, bias, shared):
    """The fused head's features ([E, B, D], or [B, D] shared), weight ([E, C, D]) and bias ([E, C]), all leaves.
    Non-finite values are left out: the materialised logits of the reference and the chunked statistics of the
    kernels may turn one NaN feature into different NaN / inf patterns."""
    inputs = {"features": gen.float_input((batch, dim) if shared else (num_experts, batch, dim), dtype, grad=True,
                                          special=0, prepare=_moderate_row_norms),
              "weight": gen.float_input((num_experts, num_classes, dim), dtype, grad=True, special=0,
                                        prepare=_moderate_row_norms)}
    if bias:
        inputs["bias"] = gen.float_input((num_experts, num_classes), dtype, grad=True, special=0)
    return inputs


def _moderate_row_norms(values):
    """Rows of norm 0.5 to 2: the cosine classifier's gradients (weight and features) are differences of terms
    1 / ||row|| times larger than themselves (their radial parts cancel), so their rounding grows as rows shrink."""
    norms = torch.linalg.vector_norm(values, dim=-1, keepdim=True).clamp_min(1e-3)
    values.mul_(torch.linspace(0.5, 2.0, values.shape[-2], dtype=values.dtype)[:, None] / norms)


def _cosine_magnitude(kwargs):
    """A cosine head's logits and their gradient's terms are ``scale`` times the cosines: the results' rounding."""
    return kwargs["scale"] if kwargs["normalize"] else 1.0


def _head_shape(gen):
    return gen.pick(1, 2, 3), _rows(gen), gen.pick(1, 2, 3, 5, 9), gen.pick(1, 3, 4)


def _chunk_size(gen):
    """Classes per chunk: None (one chunk at these sizes) most often; every chunk costs a Triton launch."""
    return gen.pick(None, 1, 2, 4, weights=[3, 1, 1, 1])


def _head_dtype(gen):
    """fp32 / fp64: the reference rounds low-precision logits before the loss, the kernels never do (their fp16 /
    bf16 tolerance is tests/ops/test_linear_ride_loss.py's)."""
    return gen.pick(torch.float32, torch.float64, weights=[3, 2])


def draw_linear_ride_loss(gen):
    dtype, (E, B, C, D) = _head_dtype(gen), _head_shape(gen)
    normalize = gen.chance(0.6)
    kwargs = dict(
        normalize=normalize,
        scale=gen.pick(30.0, 4.0, 1.0),
        margin_scale=gen.pick(30.0, 3.0, 0.0),
        **_ride_terms(gen),
        chunk_size=_chunk_size(gen),
        reduction=gen.pick("mean", "sum", weights=[2, 1]),
    )
    invalid = None
    if gen.chance(0.1):
        name, value = gen.pick(("margin_scale", -30.0), ("drw_beta", 1.0), ("temperature_factor", 2.0),
                               ("max_margin", -1.0), ("base_temperature", 0.0), ("max_margin", math.inf),
                               ("diversity_factor", math.nan), ("scale", 0.0), ("chunk_size", 0),
                               ("reduction", "none"), ("ignore_index", 2**63))
        kwargs[name], invalid = value, name
    inputs = _head_inputs(gen, dtype, E, B, C, D, bias=gen.chance(0.4), shared=gen.chance(0.3))
    inputs["target"] = _target(gen, B, C)
    if invalid != "ignore_index":
        _ignored_rows(gen, inputs["target"], kwargs, C)
    counts = _counts(gen, C)

    def call(features, weight, target, bias=None):
        return ops.linear_ride_loss(features, weight, target, counts.to(weight.device), bias=bias, **kwargs)

    label = f"E={E} B={B} C={C} D={D} {dtype} features={tuple(inputs['features'].base.shape)} " \
            f"bias={'bias' in inputs} {kwargs}"
    return Draw(label, inputs, call, mode=gen.mode(), invalid=invalid, dtype=dtype, chunked_loop=True,
                magnitude=_cosine_magnitude(kwargs))


def draw_linear_prior_shifted_ce(gen):
    dtype, (E, B, C, D) = _head_dtype(gen), _head_shape(gen)
    kwargs = dict(taus=[gen.pick(0.0, 1.0, 2.0, -1.0) for _ in range(E)], normalize=gen.chance(0.5),
                  scale=gen.pick(30.0, 4.0), chunk_size=_chunk_size(gen),
                  reduction=gen.pick("mean", "sum", weights=[2, 1]))
    invalid = None
    if gen.chance(0.08):
        name, value = gen.pick(("taus", [math.nan] * E), ("taus", [1.0] * (E + 1)), ("reduction", "none"))
        kwargs[name], invalid = value, name
    inputs = _head_inputs(gen, dtype, E, B, C, D, bias=gen.chance(0.4), shared=gen.chance(0.3))
    inputs["target"] = _target(gen, B, C)
    _ignored_rows(gen, inputs["target"], kwargs, C)
    counts = _counts(gen, C)

    def call(features, weight, target, bias=None):
        return ops.linear_prior_shifted_ce(features, weight, target, counts.to(weight.device), bias=bias, **kwargs)

    label = f"E={E} B={B} C={C} D={D} {dtype} bias={'bias' in inputs} {kwargs}"
    return Draw(label, inputs, call, mode=gen.mode(), invalid=invalid, dtype=dtype, chunked_loop=True,
                magnitude=_cosine_magnitude(kwargs))


def draw_linear_reslt_loss(gen):
    dtype, (K, B, C, D) = _head_dtype(gen), _head_shape(gen)
    kwargs = dict(beta=gen.pick(0.0, 0.5, 0.995, 1.0), normalize=gen.chance(0.4), scale=gen.pick(1.0, 10.0),
                  chunk_size=_chunk_size(gen), reduction=gen.pick("mean", "sum", weights=[2, 1]))
    invalid = None
    if gen.chance(0.08):
        name, value = gen.pick(("beta", 1.5), ("beta", math.nan), ("log_eps", 1e-7), ("fused_log_eps", 1e-7),
                               ("reduction", "none"))
        kwargs[name], invalid = value, name
    masks = torch.rand((K, C), generator=gen.torch) > 0.5
    masks[0] = True
    masks[torch.arange(K), gen.randint(0, C, (K,))] = True
    inputs = {"features": gen.float_input((K, B, D), dtype, grad=True, special=0, prepare=_moderate_row_norms),
              "weight": gen.float_input((C, D), dtype, grad=True, special=0, prepare=_moderate_row_norms),
              "target": _target(gen, B, C), "group_masks": gen.layout(masks, broadcast=False)}
    if gen.chance(0.4):
        inputs["bias"] = gen.float_input((C,), dtype, grad=True, special=0)
    _ignored_rows(gen, inputs["target"], kwargs, C)

    def call(features, weight, target, group_masks, bias=None):
        return ops.linear_reslt_loss(features, weight, target, group_masks, bias=bias, **kwargs)

    label = f"K={K} B={B} C={C} D={D} {dtype} bias={'bias' in inputs} {kwargs}"
    return Draw(label, inputs, call, mode=gen.mode(), invalid=invalid, dtype=dtype, chunked_loop=True,
                magnitude=K * _cosine_magnitude(kwargs))  # the fused rows are sums of K normalised rows


def _batch_norm_layout(gen, values, grad):
    """A 4-D ``values`` as the op may receive it: channels_last (the kernel's), NCHW contiguous, a channels_last
    batch at an offset (still channels_last: the kernel's), or a strided slice (every other column or channel) of a
    channels_last or NCHW base (neither: the reference's, and the raw kernel's own copy)."""
    N, C, H, W = values.shape
    kind = gen.pick("channels_last", "contiguous", "offset", "columns", "channels", weights=[6, 2, 2, 1, 1])
    fmt = gen.pick(torch.channels_last, torch.contiguous_format)
    if kind == "channels_last":
        return kind, Input(values.contiguous(memory_format=torch.channels_last), grad=grad)
    if kind == "offset":
        base = torch.cat([torch.zeros((1, C, H, W), dtype=values.dtype), values])
        return kind, Input(base.contiguous(memory_format=torch.channels_last), lambda t: t[1:], grad)
    if kind == "columns":
        base = torch.zeros((N, C, H, 2 * W), dtype=values.dtype)
        base[..., ::2] = values
        return f"{kind} of {fmt}", Input(base.contiguous(memory_format=fmt), lambda t: t[..., ::2], grad)
    if kind == "channels":
        base = torch.zeros((N, 2 * C, H, W), dtype=values.dtype)
        base[:, ::2] = values
        return f"{kind} of {fmt}", Input(base.contiguous(memory_format=fmt), lambda t: t[:, ::2], grad)
    return kind, Input(values, grad=grad)


def draw_batch_norm_channels_last(gen):
    """CPU-only (fastlt.ops._library.CPU_ONLY_OPS): "auto" / "cpp" run the C++ kernel for a channels_last fp32 /
    fp64 CPU batch only, every other draw (and "triton", "reference") torch's batch norm; the raw op is the C++
    kernel on every layout."""
    dtype = gen.pick(torch.float32, torch.float64, torch.bfloat16, torch.float16, weights=[5, 4, 2, 1])
    N = gen.pick(1, 2, 3, 4, 8, weights=[2, 3, 2, 2, 1])
    # channel counts the tiles of lcm(C, 16) values cover unevenly, C = 1, and 16..64
    C = gen.pick(1, 2, 3, 5, 7, 16, 17, 24, 31, 32, 40, 48, 64, weights=[2, 1, 2, 1, 1, 1, 1, 3, 1, 1, 1, 1, 1])
    H, W = gen.pick((1, 1), (1, 2), (2, 3), (3, 3), (4, 5), (7, 1), (16, 16), weights=[3, 1, 2, 2, 2, 1, 1])
    if (H, W) == (16, 16):  # several blocks of 256 tiles: fewer images, fewer channels
        N, C = gen.pick(1, 2, 8), gen.pick(3, 24, 40)
    if N * H * W == 1:
        N = gen.pick(2, 3)  # one value per channel is an invalid draw of its own
    eps = gen.pick(1e-5, 1e-3, 0.1)
    # per-channel means around `mean`, spread `std`: far from zero (mean 1e3, std down to 1e-2), the kernel's
    # shifted sums against the references' accumulations
    mean, std = gen.pick((0.0, 1.0), (0.0, 30.0), (0.5, 1e-3), (-50.0, 0.5), (1e3, 1.0), (1e3, 1e-2),
                         weights=[5, 1, 1, 1, 1, 1])
    if N * H * W > 256:  # torch's fp32 channels_last statistics (the reference) are summed in fp32: at mean 1e3,
        std = max(std, abs(mean) * 1e-4)  # std 1e-2 and 2048 values a channel its invstd is 50% off (the kernel's 3e-6)
    weight_dtype, input_dims = dtype, 4
    if dtype in LOW_PRECISION and gen.chance(0.5):  # autocast: a bf16 / fp16 batch, float32 parameters
        weight_dtype = torch.float32
    weight_shape, bias_shape = (C,), (C,)
    invalid = None
    if gen.chance(0.15):
        invalid = gen.pick("weight", "bias", "input dims", "one value per channel", "eps", "weight dtype")
        if invalid == "weight":
            weight_shape = gen.pick((C + 1,), (C, 1), ())
        elif invalid == "bias":
            bias_shape = gen.pick((C + 1,), (max(C - 1, 0),))
        elif invalid == "input dims":
            input_dims = gen.pick(3, 5)
        elif invalid == "one value per channel":
            N, H, W = 1, 1, 1
        elif invalid == "eps":
            eps = gen.pick(0.0, -1e-5, math.nan, math.inf)
        else:
            # float32 is valid beside a bf16 / fp16 batch (autocast's parameters)
            weight_dtype = gen.pick(*(d for d in (torch.float32, torch.float64, torch.bfloat16)
                                      if d != dtype and not (d == torch.float32 and dtype in LOW_PRECISION)))

    channel_means = mean * (1 + 0.1 * gen.randn((C,)))
    values = gen.randn((N, C, H, W), std) + channel_means[:, None, None]
    if gen.chance(0.1):  # a constant channel (a dead ReLU's zeros, or a constant): zero variance, invstd = eps^-1/2
        values[:, gen.rng.randrange(C)] = gen.pick(0.0, 1.5)
    # Results far from the values they are computed from: out = x * invstd * w + (b - mean * invstd * w) rounds
    # terms |x| * invstd times its size, and x - mean (the gradients) with mean rounded to the input's dtype is off
    # by |x| / std times the rounding of x - mean. Both the kernel and torch round so, torch's fp32 channels_last
    # kernel by more (its mean is summed in fp32, off by ~sqrt(M) roundings: its weight gradient is 1e-2 off at mean
    # 1e3, std 1e-2, M = 160); a constant channel's x - mean is exact. The statistics are sums of terms |x| large.
    condition, magnitude = 1.0, max(1.0, float(values.abs().max()))
    if N * H * W > 1:
        deviation = values.std(dim=(0, 2, 3), unbiased=False)
        spread = torch.where(deviation > 0, deviation, torch.tensor(max(eps, 1e-5)).sqrt())
        condition = max(1.0, float((values.abs().amax(dim=(0, 2, 3)) / spread).max()))
        condition *= max(1.0, math.sqrt(N * H * W / 256))
    if gen.chance(0.1):  # NaN / +-inf: the channel's results NaN (mean +-inf)
        n, c, h, w = (gen.rng.randrange(size) for size in (N, C, H, W))
        values[n, c, h, w] = gen.pick(math.nan, math.inf, -math.inf)  # at pixel 0 too: the kernel's shift
    if input_dims == 3:
        layout, x = "contiguous", Input(values[..., 0].to(dtype), grad=True)
    elif input_dims == 5:
        layout, x = "contiguous", Input(values[..., None].to(dtype), grad=True)
    else:
        layout, x = _batch_norm_layout(gen, values.to(dtype), grad=True)
    # every layout, expanded included: torch's CPU batch norm backward (the reference) reads a strided weight as if
    # contiguous for a channels_last or 1x1 batch, so the op hands it weight.contiguous()
    weight = gen.randn(weight_shape, gen.pick(1.0, 0.1)).to(weight_dtype)
    inputs = {
        "input": x,
        "weight": gen.layout(weight, grad=True),
        "bias": gen.float_input(bias_shape, weight_dtype, grad=True, special=0),
    }

    # the fused ReLU (the models' conv -> BN -> ReLU), where every backend puts an output on the same side of 0: not
    # where the reference's rounding (torch's fp32 statistics of values far from their mean; a bf16 module's
    # statistics rounded to bf16) is larger than the outputs' distance from 0, which flips whole gradients
    relu = gen.chance(0.5) and condition < 100 and weight_dtype not in LOW_PRECISION

    def call(input, weight, bias):
        return ops.batch_norm_channels_last(input, weight, bias, eps=eps, relu=relu)

    def raw(overload, input, weight, bias):
        return getattr(torch.ops.fastlt.batch_norm_channels_last, overload)(input, weight, bias, eps, relu)

    # the raw kernel takes fp32 / fp64 / bf16 only (fp16 is the wrapper's reference): raw calls on valid draws of
    # those dtypes, and on every invalid draw (refused alike)
    raw_ok = invalid is not None or dtype in (torch.float32, torch.float64, torch.bfloat16)
    label = (f"N={N} C={C} H={H} W={W} {dtype} weight {weight_dtype}{list(weight_shape)} bias {list(bias_shape)} "
             f"dims={input_dims} {layout} mean={mean} std={std} eps={eps} relu={relu}")
    return Draw(label, inputs, call, mode=gen.mode(), invalid=invalid, raw=raw if raw_ok else None, dtype=dtype,
                magnitude=magnitude, condition=condition, statistics=("mean", "invstd", "unbiased_var"),
                input_precision=True)


# ---- running a draw on one backend ----


@dataclasses.dataclass
class Outcome:
    results: dict  # "out", "grad:<name>", "grad2:<name>", "regrad:<name>", "func_grad:<name>" -> tensor
    error: Optional[type] = None
    stage: Optional[str] = None
    message: str = ""


def _probe(shape, seed):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


_linear_ride_loss_module = importlib.import_module("fastlt.ops.linear_ride_loss")  # the attribute is the function


def _backend(backend):
    """``fastlt.ops.use_backend(backend)``; "torch": no compiled kernel, the fused heads' chunked PyTorch loop."""
    if backend != "torch":
        return ops.use_backend(backend)
    return mock.patch.object(_linear_ride_loss_module, "_compiled_op", lambda device: None)


def run(draw, backend, device, raw_overload=None):
    bases = {name: inp.base.to(device).clone().requires_grad_(inp.grad) for name, inp in draw.inputs.items()}
    leaves = [name for name, inp in draw.inputs.items() if inp.grad]
    results = {}
    stage = "forward"

    def forward(**leaf_values):
        """The op's (first) output; a tuple's other outputs are recorded as values (draw.statistics) by the plain
        call (no ``leaf_values``: torch.func.grad's call returns them wrapped)."""
        views = {name: draw.inputs[name].view(leaf_values.get(name, base)) for name, base in bases.items()}
        out = draw.raw(raw_overload, **views) if raw_overload is not None else draw.call(**views)
        if not isinstance(out, tuple):
            return out
        out, *statistics = out
        assert len(statistics) == len(draw.statistics), f"{len(statistics)} statistics, named {draw.statistics}"
        if not leaf_values:
            results.update({f"out:{name}": value.detach() for name, value in zip(draw.statistics, statistics)})
        return out

    def gradients(objective, **kwargs):
        grads = torch.autograd.grad(objective, [bases[n] for n in leaves], allow_unused=True, **kwargs)
        return [torch.zeros_like(bases[n]) if g is None else g for n, g in zip(leaves, grads)]

    try:
        with _backend(backend):
            out = forward()
            results["out"] = out.detach()
            if draw.mode == "values" or not leaves or not out.requires_grad:
                return Outcome(results)
            probe = _probe(out.shape, 1).to(device)
            stage = "backward"
            if draw.mode == "func_grad":
                def objective_of(*values):
                    return (forward(**dict(zip(leaves, values))).double() * probe).sum()

                grads = torch.func.grad(objective_of, tuple(range(len(leaves))))(*[bases[n].detach() for n in leaves])
                results.update({f"func_grad:{n}": g for n, g in zip(leaves, grads)})
                return Outcome(results)
            objective = (out.double() * probe).sum()
            grads = gradients(objective, create_graph=draw.mode == "create_graph",
                              retain_graph=draw.mode in ("create_graph", "retain_graph"))
            if draw.mode == "retain_graph":  # the first gradients as they stand after a second backward
                stage = "second backward"
                again = gradients(objective * 3)
                results.update({f"regrad:{n}": g.detach() for n, g in zip(leaves, again)})
            results.update({f"grad:{n}": g.detach() for n, g in zip(leaves, grads)})
            if draw.mode != "create_graph":
                return Outcome(results)
            stage = "second backward"
            objective = sum((g.double() ** 2 * _probe(g.shape, 2 + i).to(device)).sum() for i, g in enumerate(grads))
            # Gradients that do not depend on the inputs (a linear op) have zero second derivatives. A backend that
            # returns a gradient detached from the graph where the reference's is not shows as different values.
            second = (torch.autograd.grad(objective, [bases[n] for n in leaves], allow_unused=True)
                      if objective.requires_grad else [None] * len(leaves))
            results.update({f"grad2:{n}": (torch.zeros_like(bases[n]) if g is None else g).detach()
                            for n, g in zip(leaves, second)})
            return Outcome(results)
    except Exception as error:  # noqa: BLE001 - the type is what the backends must agree on
        return Outcome(results, type(error), stage, str(error).splitlines()[0][:300] if str(error) else "")


def assert_tensors_close(actual, expected, what, compute_dtype, magnitude=1.0, condition=1.0, input_precision=False):
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} vs {tuple(expected.shape)}"
    assert actual.dtype == expected.dtype, f"{what}: dtype {actual.dtype} vs {expected.dtype}"
    actual, expected = actual.cpu(), expected.cpu()
    if not actual.is_floating_point():
        assert torch.equal(actual, expected), f"{what}: {actual.tolist()} vs {expected.tolist()}"
        return
    # no more precise than the accumulation dtype of the inputs (the loss of fp16 logits is fp32, but as exact as
    # fp16 inputs allow)
    accumulation = compute_dtype if input_precision else torch.float64 if compute_dtype == torch.float64 else \
        torch.float32
    dtype = max(expected.dtype, accumulation, key=lambda dtype: TOLERANCES[dtype][1])
    atol, rtol = tolerance(dtype, expected)
    atol = max(atol * condition, TOLERANCES[dtype][0] * magnitude)  # the draw's terms may be larger than its result
    torch.testing.assert_close(actual, expected, atol=atol, rtol=rtol, equal_nan=True, msg=lambda m: f"{what}: {m}")


def check(draw, runs):
    """Every outcome agrees with the reference's (the first run)."""
    (ref_key, expected), *others = runs.items()
    if draw.invalid is not None:
        for key, outcome in runs.items():
            assert outcome.error is ValueError and outcome.stage == "forward", (
                f"{key}: an invalid {draw.invalid} must raise ValueError, got "
                f"{outcome.error.__name__ if outcome.error else 'a result'} ({outcome.message})"
            )
    for key, outcome in others:
        assert (outcome.error, outcome.stage) == (expected.error, expected.stage), (
            f"{key} vs {ref_key}: {outcome.error and outcome.error.__name__} at {outcome.stage} ({outcome.message!r}) "
            f"vs {expected.error and expected.error.__name__} at {expected.stage} ({expected.message!r})"
        )
        assert outcome.results.keys() == expected.results.keys(), (
            f"{key}: {list(outcome.results)} vs {list(expected.results)}"
        )
        views = {name: inp.view(inp.base) for name, inp in draw.inputs.items()}
        for name, value in expected.results.items():
            if name == "out" and draw.compare is not None:
                draw.compare(outcome.results[name], value, views)
            else:
                assert_tensors_close(outcome.results[name], value, f"{key} {name}", draw.dtype, draw.magnitude,
                                     draw.condition, draw.input_precision)


def check_draw(draw, check_raw, cpu_only=False):
    """Every backend on ``draw``; with ``check_raw``, also the raw registered ops (values only: their gradients are
    the wrapper's). ``cpu_only``: the op has its C++ CPU kernel alone (fastlt.ops._library.CPU_ONLY_OPS), no triton
    overload nor CUDA kernel to call raw (its public function runs the reference there, compared above)."""
    backends = BACKENDS + ([("torch", "cpu")] if draw.chunked_loop else [])
    check(draw, {(backend, device): run(draw, backend, device) for backend, device in backends})
    if draw.raw is not None and check_raw:
        values_only = dataclasses.replace(draw, mode="values")
        runs = {("reference", "cpu"): run(values_only, "reference", "cpu")}
        for backend, device in BACKENDS:
            if backend != "reference" and not (cpu_only and (backend == "triton" or device != "cpu")):
                overload = "triton" if backend == "triton" else "default"
                runs[(backend + " raw op", device)] = run(values_only, backend, device, overload)
        check(values_only, runs)


# op -> its drawer: every op of the registry (REGISTERED_OPS) and the compositions on the fused head
DRAWERS = {
    "expert_aggregate": draw_expert_aggregate,
    "tau_normalize": draw_tau_normalize,
    "tau_sweep": draw_tau_sweep,
    "ride_loss": draw_ride_loss,
    "reslt_loss": draw_reslt_loss,
    "prior_shifted_ce": draw_prior_shifted_ce,
    "linear_ride_loss": draw_linear_ride_loss,
    "linear_prior_shifted_ce": draw_linear_prior_shifted_ce,
    "linear_reslt_loss": draw_linear_reslt_loss,
    "batch_norm_channels_last": draw_batch_norm_channels_last,
}
# The fused heads' draws cost most (a chunk loop per backend, four backends): fewer of them.
DRAW_SHARE = {"linear_ride_loss": 0.3, "linear_prior_shifted_ce": 0.1, "linear_reslt_loss": 0.1}


def _draw_indices(op):
    return [int(ONLY)] if ONLY is not None else range(max(1, round(DRAWS * DRAW_SHARE.get(op, 1.0))))


def _seed(op, index):
    return (SEED * 1_000_003 + index) * 31 + zlib.crc32(op.encode())


@pytest.mark.parametrize("op", sorted(set(REGISTERED_OPS) | DRAWERS.keys()))
def test_backends_agree_or_refuse_alike(op):
    assert op in DRAWERS, f"{op} is in the op registry but has no drawer here: add draw_{op} to DRAWERS"
    failures = []
    for index in _draw_indices(op):
        draw = DRAWERS[op](Gen(_seed(op, index)))
        try:
            # raw ops on every invalid draw and a quarter of the valid ones (the Triton interpreter is slow)
            check_draw(draw, check_raw=draw.invalid is not None or index % 4 == 0, cpu_only=op in CPU_ONLY_OPS)
        except AssertionError as error:
            failures.append(f"draw {index} ({draw.label}): {error}")
    assert not failures, (
        f"{op}: {len(failures)} of {len(_draw_indices(op))} draws disagree (FASTLT_DIFF_SEED={SEED}; replay one with "
        f"FASTLT_DIFF_ONLY=<draw>):\n" + "\n".join(failures[:10])
    )


def test_shot_accuracy_per_tau_matches_its_oracle():
    """No backends to compare: every draw (fed from tensors or numpy, on every device) matches the plain-loop oracle
    or, for a known-invalid draw, raises ValueError."""
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    failures = []
    for index in _draw_indices("shot_accuracy_per_tau"):
        draw = draw_shot_accuracy_per_tau(Gen(_seed("shot_accuracy_per_tau", index)))
        label, predictions, targets, class_counts, taus, as_numpy, invalid = draw
        for device in devices:
            p, t = (predictions.numpy(), targets.numpy()) if as_numpy else (predictions.to(device), targets.to(device))
            try:
                try:
                    rows = ops.shot_accuracy_per_tau(p, t, class_counts, taus)
                except ValueError as error:
                    assert invalid is not None, f"a valid draw was refused: {error}"
                    continue
                assert invalid is None, f"an invalid {invalid} was accepted"
                expected = _shot_accuracy_oracle(predictions, targets, class_counts, taus)
                assert len(rows) == len(expected)
                for row, want in zip(rows, expected):
                    assert row.keys() == want.keys()
                    for key in want:
                        assert (row[key] is None and want[key] is None) or row[key] == pytest.approx(
                            want[key], nan_ok=True), f"{key}: {row[key]} vs {want[key]}"
            except AssertionError as error:
                failures.append(f"draw {index} ({label}) on {device}: {error}")
    assert not failures, f"{len(failures)} draws disagree:\n" + "\n".join(failures[:10])
