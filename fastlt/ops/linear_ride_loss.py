"""fastlt.ops.linear_ride_loss: the experts' classifiers and RIDE's loss fused, without the [E, B, C] logits.

    z_k = scale * normalize(x_k) @ normalize(W_k)^T + b_k      (normalize=False: z_k = x_k @ W_k^T + b_k)
    L   = ride_loss(z, y)                                      (fastlt/ops/ride_loss.py, docs/methods.md 3.2 and 6.3)

At 1e4 to 1e6 classes the logits and their gradient (E x B x C each) dominate a long-tailed model's memory. This op
walks the classes in chunks twice:

1. the per-row online softmax statistics of every term of the loss (each expert's LDAM-margin CE, its tempered
   softmax, the tempered softmax of the expert mean and their KL gap), which give the loss;
2. each chunk's logit gradient from the finished statistics, backpropagated through the chunk's GEMMs into d
   features and d weight[c0:c1]; the cosine classifier's weight normalisation is never materialised. The features
   (E x B x D, small) are normalised before the op, under autograd.

The algorithm in PyTorch, pass by pass: fastlt/ops/_chunked_head.py (the C++ and CUDA kernels follow it).

The forward computes the loss and the gradients of features, weight and bias; backward only scales them (as
``ride_loss``). Backends: ``cpp`` runs the C++ kernel (csrc/cpu/linear_ride_loss.cpp, per-class math in
csrc/include/fastlt/linear_ride_loss.h); ``triton`` the same host loop with Triton kernels for the row statistics
and the chunk gradient (kernels/linear_ride_loss.py, overload ``fastlt::linear_ride_loss.triton``); ``reference``
materialises the logits (``linear_ride_loss_reference``); otherwise (devices without a compiled kernel, no extension)
the host loop runs its elementwise work in PyTorch (``_chunked_head.chunked_forward``, overload
``fastlt::linear_ride_loss.torch``).
The CUDA kernel (csrc/cuda/linear_ride_loss.cu) is the op's CUDA implementation of ``.default``.

Reductions and ignored rows follow docs/methods.md 6.5: under ``"mean"`` the CE is divided by the sum of the kept
rows' class weights w_y and the diversity term by the number of kept rows; an ignored row adds nothing and its
features get a zero gradient. ``"none"`` is refused: the weight gradient is accumulated in the forward pass for
one scalar loss, so a per-row grad_output could not be applied.
Tests: tests/ops/test_linear_ride_loss.py.
"""

from typing import Optional

import torch
import torch.nn.functional as F

from fastlt import _extension
from fastlt.ops import _backend, _checks, _class_parallel, _fused_loss, _library, _lt_constants, _selfcheck
from fastlt.ops._chunked_head import NORM_EPS, chunked_forward, row_coefficients
from fastlt.ops._head_arguments import OP, check_head, check_row_tables, default_chunk_size, op_logits
from fastlt.ops.ride_loss import ride_loss_reference, ride_tables, validate_hyperparameters

# The arguments of fastlt::linear_ride_loss as csrc/cpu/linear_ride_loss.cpp defines them; its .triton and .torch
# overloads take the same. The logits are features @ W^T (normalize_weight: times scale / ||w_c||) + row_bias_scales
# x bias; reduction: 1 mean, 2 sum (0, none, is refused); the forward returns (loss, d features, d weight, d bias),
# the gradients [0]-shaped without compute_grad (d bias also without bias).
SCHEMA = ("(Tensor features, Tensor weight, Tensor? bias, Tensor target, Tensor target_margins, "
          "Tensor? class_weights, Tensor temperatures, Tensor? row_weights, Tensor? row_bias_scales, float scale, "
          "bool normalize_weight, float diversity_factor, int reduction, int ignore_index, int chunk_size, "
          "bool compute_grad) -> (Tensor, Tensor, Tensor, Tensor)")
def linear_ride_loss_reference(features, weight, target, class_counts, *, normalize=True, scale=30.0, bias=None,
                               margin_scale=30.0, max_margin=0.5, diversity_factor=-0.45, temperature_factor=0.05,
                               base_temperature=1.0, drw=False, drw_beta=0.9999, chunk_size=None,
                               reduction="mean", ignore_index=_checks.DEFAULT_IGNORE_INDEX):
    """Eager reference: materialises the [E, B, C] logits and calls :func:`fastlt.ops.ride_loss_reference` (RIDE's
    loss, docs/methods.md 6.3, with 6.5's reductions and ignored rows) on them. The arguments are
    :func:`linear_ride_loss`'s."""
    _validate(features, weight, target, class_counts, bias, scale, chunk_size, reduction, ignore_index,
              margin_scale=margin_scale, max_margin=max_margin, diversity_factor=diversity_factor,
              temperature_factor=temperature_factor, base_temperature=base_temperature, drw_beta=drw_beta)
    logits = expert_logits(features, weight, normalize=normalize, scale=scale, bias=bias)
    return ride_loss_reference(logits, target, class_counts, scale=margin_scale, max_margin=max_margin,
                               diversity_factor=diversity_factor, temperature_factor=temperature_factor,
                               base_temperature=base_temperature, drw=drw, drw_beta=drw_beta, reduction=reduction,
                               ignore_index=ignore_index)


def expert_logits(features, weight, *, normalize=True, scale=30.0, bias=None):
    """The [E, B, C] logits the fused op never holds (for inference and the reference)."""
    if normalize:
        features = F.normalize(features, dim=-1)
    return op_logits(features, weight, normalize_weight=normalize, scale=scale, bias=bias)


def linear_ride_loss(features: torch.Tensor, weight: torch.Tensor, target: torch.Tensor, class_counts: torch.Tensor,
                     *, normalize: bool = True, scale: float = 30.0, bias: Optional[torch.Tensor] = None,
                     margin_scale: float = 30.0, max_margin: float = 0.5, diversity_factor: float = -0.45,
                     temperature_factor: float = 0.05, base_temperature: float = 1.0, drw: bool = False,
                     drw_beta: float = 0.9999, chunk_size: Optional[int] = None, reduction: str = "mean",
                     ignore_index: int = _checks.DEFAULT_IGNORE_INDEX, process_group=None, gather_batch: bool = True,
                     ddp_trunk: bool = False) -> torch.Tensor:
    """RIDE's loss of E cosine (or linear) classifiers, computed with its gradients without the [E, B, C] logits.

    Args:
        features: ``[E, B, D]`` one feature row per expert, or ``[B, D]`` shared by the experts.
        weight: ``[E, C, D]`` the experts' classifier weights (one row per class), same dtype as ``features``.
        target: ``[B]`` int64 labels in ``[0, C)``, or ``ignore_index`` (rows the loss skips).
        class_counts: ``[C]`` positive training counts per class.
        normalize: cosine classifier (``scale * cos(x, w_c)``, RIDE's NormedLinear x 30); ``False``: ``x @ W^T``.
        scale: the cosine classifier's scale (ignored with ``normalize=False``).
        bias: optional ``[E, C]`` added to the logits.
        margin_scale: LDAM's ``s`` (``scale`` of :func:`fastlt.ops.ride_loss`): the target logit loses
            ``margin_scale * m_y``.
        max_margin, diversity_factor, temperature_factor, base_temperature, drw, drw_beta: as in
            :func:`fastlt.ops.ride_loss`.
        chunk_size: classes per chunk; ``None`` picks a power of two from E and B (about 2M logits per chunk).
        reduction: ``"mean"`` (RIDE's loss: the CE divided by the sum of the kept rows' DRW weights, the diversity
            term by the number of kept rows; 0 when every row is ignored) or ``"sum"`` (docs/methods.md 6.5).
            ``"none"`` raises ValueError: the weight gradient is accumulated in the forward pass for one scalar
            loss; for per-row losses use :func:`expert_logits` and :func:`fastlt.ops.ride_loss` with
            ``reduction="none"``.
        ignore_index: rows whose label equals it add nothing to the loss, and their features get a zero gradient.
        process_group: a ``torch.distributed`` group of W ranks for a class-parallel head (docs/methods.md 8.6):
            ``weight`` (and ``bias``) hold this rank's contiguous shard of the classes (``fastlt.ops.class_shard``:
            ``[E, n, D]``), ``class_counts`` all C classes; the loss and its gradients are those of the whole batch
            and the concatenated classifier, and only O(W x B x E x D) numbers are communicated. None: one process.
        gather_batch: with a group, ``features`` and ``target`` are this rank's rows and all ranks' are gathered
            (equal row counts); ``False``: every rank passes the same whole batch.
        ddp_trunk: with a group and ``gather_batch``, the features' gradient is W times the loss's, so that a trunk
            under DistributedDataParallel (which averages over the W ranks) gets the loss's gradient.

    Memory beyond the inputs and their gradients: O(E x B x chunk_size) for a few chunk-sized logit buffers, plus
    O(chunk_size x D) for one chunk of the weight (fp16/bf16 inputs are upcast chunk by chunk), O(E x B x D) for the
    normalised features and O(E x C) for the weight's row norms, never O(E x B x C). Computation runs in fp32 for
    fp16 / bf16 / fp32 inputs and in fp64 for fp64; the loss is fp32 (fp64), the gradients keep the inputs' dtype.
    A zero feature or weight row gets F.normalize's gradient (divided by its eps).

    >>> features, weight = torch.randn(3, 8, 16), torch.randn(3, 1000, 16, requires_grad=True)
    >>> counts = torch.linspace(500, 5, 1000).floor()
    >>> loss = fastlt.ops.linear_ride_loss(features, weight, torch.randint(0, 1000, (8,)), counts, chunk_size=256)
    >>> loss.backward(); weight.grad.shape
    torch.Size([3, 1000, 16])
    """
    _class_parallel.checks_on_every_rank(OP, process_group, features, gather_batch, lambda: _validate(
        features, weight, target, class_counts, bias, scale, chunk_size, reduction, ignore_index,
        margin_scale=margin_scale, max_margin=max_margin, diversity_factor=diversity_factor,
        temperature_factor=temperature_factor, base_temperature=base_temperature, drw_beta=drw_beta,
        num_classes=len(class_counts) if process_group is not None else None))
    target_margins, class_weights, temperatures = ride_tables(
        class_counts, scale=margin_scale, max_margin=max_margin, temperature_factor=temperature_factor,
        base_temperature=base_temperature, drw=drw, drw_beta=drw_beta,
        dtype=_checks.accumulate_dtype(weight.dtype), device=weight.device)
    return fused_linear_ride_loss(features, weight, bias, target, target_margins, class_weights, temperatures,
                                  scale=scale, normalize=normalize, diversity_factor=diversity_factor,
                                  chunk_size=chunk_size, reduction=reduction, ignore_index=ignore_index,
                                  process_group=process_group, gather_batch=gather_batch, ddp_trunk=ddp_trunk)


def fused_linear_ride_loss(features: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                           target: torch.Tensor, target_margins: torch.Tensor, class_weights: Optional[torch.Tensor],
                           temperatures: torch.Tensor, *, scale: float, normalize: bool, diversity_factor: float,
                           chunk_size: Optional[int] = None, reduction: str = "mean",
                           ignore_index: int = _checks.DEFAULT_IGNORE_INDEX,
                           row_weights: Optional[torch.Tensor] = None, row_bias_scales: Optional[torch.Tensor] = None,
                           normalize_features: bool = True, process_group=None, gather_batch: bool = True,
                           ddp_trunk: bool = False) -> torch.Tensor:
    """The fused head + loss from RIDE's per-class tables instead of class counts: the op :func:`linear_ride_loss`
    runs after :func:`fastlt.ops.ride_loss.ride_tables`, on the backend it would pick (C++ kernel, Triton, or the
    chunked PyTorch loop). ``linear_prior_shifted_ce`` and ``linear_reslt_loss`` build on it with their own tables.

    Args:
        features, weight, bias, target, scale, normalize, diversity_factor, chunk_size, reduction, ignore_index: as
            in :func:`linear_ride_loss`.
        target_margins: ``[C]`` the amount the target logit is lowered by (LDAM's ``s * m_y``; zeros: plain CE).
        class_weights: ``[C]`` weights w_y of the rows' CE terms (RIDE's DRW weights), or None (all 1). Zeros are
            allowed (0/1 masks select classes): under ``"mean"`` the CE is divided by the sum of the kept rows'
            weights, and a zero sum gives a CE term of 0 with zero gradients.
        temperatures: ``[C]`` positive per-class temperatures of the diversity term.
        row_weights: ``[B]`` non-negative factors on each row's CE and diversity terms, or None (all 1); under
            ``"mean"`` the normalisers are the kept rows' sums of ``row_weights * w_y`` and of ``row_weights``.
        row_bias_scales: ``[B]`` each row's factor on ``bias`` (which it needs), or None (all 1).
        normalize_features: with ``normalize``, whether the features are normalised (False: ``scale * x @
            normalize(W)^T``, for features that are sums of normalised rows).
        process_group, gather_batch, ddp_trunk: a class-parallel head, as in :func:`linear_ride_loss`: the
            per-class tables then have all C classes, ``weight`` and ``bias`` this rank's shard.
    """

    def check():
        """(reduction code, ignore_index, diversity_factor, C) of checked arguments; C: the tables' (a class-parallel
        head's weight holds this rank's shard of them), else the weight's."""
        num_classes = None
        if process_group is not None:
            _checks.tensor(OP, "target_margins", target_margins, dims=1)
            num_classes = target_margins.shape[0]
        codes = _validate_head(features, weight, target, bias, scale, chunk_size, reduction, ignore_index, num_classes)
        num_classes = num_classes or weight.shape[1]
        for name, table in (("target_margins", target_margins), ("class_weights", class_weights),
                            ("temperatures", temperatures)):
            if table is not None:
                _checks.fused_loss_table(OP, name, table, (num_classes,), weight)
        check_row_tables(row_weights, row_bias_scales, bias, target.shape[0], weight)
        if process_group is not None:
            _class_parallel.check_shard(OP, "weight", weight, 1, process_group, num_classes)
        return (*codes, _checks.number(OP, "diversity_factor", diversity_factor), num_classes)

    reduction, ignore_index, diversity_factor, num_classes = _class_parallel.checks_on_every_rank(
        OP, process_group, features, gather_batch, check)
    num_experts = weight.shape[0]
    acc_dtype = _checks.accumulate_dtype(weight.dtype)
    target_margins, temperatures = target_margins.to(acc_dtype), temperatures.to(acc_dtype)
    class_weights = class_weights.to(acc_dtype) if class_weights is not None else None
    if process_group is not None:
        return _class_parallel.fused_linear_ride_loss(
            features, weight, bias, target, target_margins, class_weights, temperatures, scale=scale,
            normalize=normalize, diversity_factor=diversity_factor, chunk_size=chunk_size, reduction=reduction,
            ignore_index=ignore_index, row_weights=row_weights, row_bias_scales=row_bias_scales,
            normalize_features=normalize_features, process_group=process_group, gather_batch=gather_batch,
            ddp_trunk=ddp_trunk)
    chunk = chunk_size or default_chunk_size(num_experts, target.shape[0], num_classes)
    compute_grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (features, weight, bias))
    backend = _backend.resolve(OP, weight, features, bias)  # CUDA: the first call checks the kernel
    if normalize and normalize_features:  # O(E x B x D): the op itself normalises only the weight
        features = F.normalize(features, dim=-1, eps=NORM_EPS)
    if backend == "reference":
        logits = op_logits(features, weight, normalize_weight=normalize, scale=scale, bias=bias,
                           row_bias_scales=row_bias_scales)
        return _loss_formula(logits, target, target_margins, class_weights, temperatures, diversity_factor,
                             reduction, ignore_index, row_weights)
    if backend == "triton":
        fused_op = torch.ops.fastlt.linear_ride_loss.triton
    else:
        compiled = _compiled_op(weight.device) if backend == "cpp" else None
        fused_op = compiled or torch.ops.fastlt.linear_ride_loss.torch
    loss, *_ = fused_op(
        features, weight, bias, target, target_margins, class_weights, temperatures, row_weights, row_bias_scales,
        float(scale), bool(normalize), float(diversity_factor), reduction, ignore_index, int(chunk), compute_grad)
    return loss


def _loss_formula(logits, target, target_margins, class_weights, temperatures, diversity_factor, reduction,
                  ignore_index, row_weights=None):
    """RIDE's loss (docs/methods.md 6.3, 6.5) of materialised [E, B, C] logits from the per-class (and per-row)
    tables, in eager PyTorch."""
    logits = logits.to(target_margins.dtype)
    labels, ce_coefs, div_coefs = row_coefficients(target, class_weights, temperatures, diversity_factor, reduction,
                                                   ignore_index, row_weights)
    labels = labels.clamp_min(0)  # an ignored row's coefficients are 0
    with torch.no_grad():
        mean_distribution = F.softmax(logits.mean(0) / temperatures, dim=-1)
    target_onehot = F.one_hot(labels, logits.shape[-1]).to(logits)
    loss = logits.new_zeros(())
    for expert in logits:
        margin_logits = expert - target_margins[labels][:, None] * target_onehot
        loss = loss + (ce_coefs * F.cross_entropy(margin_logits, labels, reduction="none")).sum()
        if diversity_factor != 0:
            kl = F.kl_div(F.log_softmax(expert / temperatures, dim=-1), mean_distribution, reduction="none").sum(-1)
            loss = loss + (div_coefs * kl).sum()
    return loss


def _compiled_op(device):
    """The extension's kernel for `device`, or None (extension built before this op, or no kernel for the device)."""
    return torch.ops.fastlt.linear_ride_loss.default if _KERNEL_DEVICE_TYPES.get(device.type, False) else None


def _kernel_device_types():
    """{device type: whether the extension has a linear_ride_loss kernel for it}, looked up once (at import, so
    torch.compile reads a plain dict)."""
    if not _extension.AVAILABLE or not torch._C._dispatch_has_kernel("fastlt::linear_ride_loss"):
        return {}
    return {device_type: torch._C._dispatch_has_kernel_for_dispatch_key("fastlt::linear_ride_loss", key)
            for device_type, key in (("cpu", "CPU"), ("cuda", "CUDA"))}


_KERNEL_DEVICE_TYPES = _kernel_device_types()


def _validate(features, weight, target, class_counts, bias, scale, chunk_size, reduction, ignore_index, *,
              margin_scale, num_classes=None, **ride_hyperparameters):
    """The checks of the op and its reference (RIDE's hyper-parameters: ride_loss's own check, ``margin_scale``
    being its ``scale``; ``num_classes``: a class-parallel head's C, else the weight's); returns (reduction code,
    ignore_index)."""
    checked = _validate_head(features, weight, target, bias, scale, chunk_size, reduction, ignore_index, num_classes)
    _lt_constants.check_class_counts(OP, class_counts, num_classes or weight.shape[1])
    validate_hyperparameters(scale=margin_scale, **ride_hyperparameters, op=OP, scale_name="margin_scale")
    return checked


def check_reduction(reduction) -> int:
    """The code of a reduction the fused head supports: 1 "mean", 2 "sum"; ValueError for "none" with the reason."""
    code = _checks.reduction(OP, reduction)
    if code == 0:
        raise ValueError(
            f"{OP}: reduction='none' is not supported: the fused head accumulates the weight gradient in the forward "
            "pass for one scalar loss, so per-row losses cannot be weighted in the backward; use the unfused heads "
            "(expert_logits) with fastlt.ops.ride_loss(..., reduction='none')")
    return code


def _validate_head(features, weight, target, bias, scale, chunk_size, reduction, ignore_index, num_classes=None):
    reduction = check_reduction(reduction)
    ignore_index = _checks.ignore_index(OP, ignore_index)
    check_head(OP, features, weight, target, bias, chunk_size, ignore_index, num_classes)
    _checks.number(OP, "scale", scale, low=0.0, low_open=True)
    return reduction, ignore_index


def _check_op_arguments(features, weight, bias, target, target_margins, class_weights, temperatures, row_weights,
                        row_bias_scales, scale, normalize_weight, diversity_factor, reduction, ignore_index, chunk_size,
                        compute_grad):
    """The op's own checks (as csrc/cpu/linear_ride_loss.cpp's), for the Python overloads called directly; the
    arguments are the op's (SCHEMA)."""
    _validate_head(features, weight, target, bias, scale, chunk_size,
                   _checks.REDUCTIONS[reduction] if reduction in (0, 1, 2) else reduction, ignore_index)
    for name, table in (("target_margins", target_margins), ("class_weights", class_weights),
                        ("temperatures", temperatures)):
        if table is not None:
            _checks.fused_loss_table(OP, name, table, (weight.shape[1],), weight)
    check_row_tables(row_weights, row_bias_scales, bias, target.shape[0], weight)
    _checks.number(OP, "diversity_factor", diversity_factor)


# ---- torch.library glue: fastlt::linear_ride_loss (C++, csrc/), its .torch and .triton overloads ----


def _torch_forward(*args):
    _check_op_arguments(*args)
    return chunked_forward(*args)


def _triton_forward(*args):
    from fastlt.kernels import linear_ride_loss as kernels

    _check_op_arguments(*args)
    return chunked_forward(*args, kernels=kernels)


def _fake_forward(features, weight, bias, target, target_margins, class_weights, temperatures, row_weights,
                  row_bias_scales, scale, normalize_weight, diversity_factor, reduction, ignore_index, chunk_size,
                  compute_grad):
    loss = weight.new_empty((), dtype=_checks.accumulate_dtype(weight.dtype))
    if not compute_grad:  # three distinct empty outputs: a custom op's outputs may not alias each other
        return loss, features.new_empty((0,)), features.new_empty((0,)), features.new_empty((0,))
    grad_bias = torch.empty_like(bias) if bias is not None else features.new_empty((0,))
    return loss, torch.empty_like(features), torch.empty_like(weight), grad_bias


def _op_loss_formula(features, weight, bias, target, target_margins, class_weights, temperatures, row_weights,
                     row_bias_scales, scale, normalize_weight, diversity_factor, reduction, ignore_index, chunk_size):
    """The op's loss from its arguments (SCHEMA's, but compute_grad) in differentiable eager PyTorch, through the
    materialised logits: the second-order path (``create_graph=True``)."""
    logits = op_logits(features, weight, normalize_weight=normalize_weight, scale=scale, bias=bias,
                       row_bias_scales=row_bias_scales)
    return _loss_formula(logits, target, target_margins, class_weights, temperatures, diversity_factor, reduction,
                         ignore_index, row_weights)


def _register(qualified_name):
    # d loss / d features, weight, bias (inputs 0, 1, 2) are outputs 1, 2, 3
    _fused_loss.register(qualified_name, _op_loss_formula, _fake_forward, gradient_outputs={0: 1, 1: 2, 2: 3})


_library.define_overload("linear_ride_loss", "torch", SCHEMA, _torch_forward)
_library.define_triton("linear_ride_loss", SCHEMA, _triton_forward)
_register("fastlt::linear_ride_loss.torch")
_register("fastlt::linear_ride_loss.triton")
if _extension.AVAILABLE and torch._C._dispatch_has_kernel("fastlt::linear_ride_loss"):
    _register("fastlt::linear_ride_loss")


@_selfcheck.case(OP)
def selfcheck_case(device, dtype, tiny):
    """The op's self-check (`fastlt doctor`, the CUDA kernel's first use; fastlt/ops/_selfcheck.py): ``(call,
    inputs)``."""
    E, B, C, D = (2, 3, 9, 4) if tiny else (3, 6, 37, 8)
    features = torch.randn(E, B, D, device=device).to(dtype).requires_grad_()
    weight = torch.randn(E, C, D, device=device).to(dtype).requires_grad_()
    target = torch.randint(0, C, (B,), device=device)
    target[1] = -100  # an ignored row
    counts = _selfcheck.sample_counts(C, device)
    # a small classifier scale keeps the reference's bf16 logits (rounded before the loss) within the tolerance
    return (lambda x, w: linear_ride_loss(x, w, target, counts, scale=4.0, margin_scale=3.0, drw=True,
                                                     chunk_size=4)), (features, weight)
