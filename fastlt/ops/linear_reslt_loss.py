"""fastlt.ops.linear_reslt_loss: ResLT's shared classifier and loss fused, without the [K, B, C] branch logits.

    z_b   = f_b @ W^T + bias        (normalize=True: scale * normalize(f_b) @ normalize(W)^T + bias), b = 1..K
    L     = beta * L_ice + (1 - beta) * L_fce               (fastlt.ops.reslt_loss, log_eps = fused_log_eps = 0)
    L_ice = sum_{b, i kept} g_b(y_i) * CE(z_b(x_i), y_i) / G,   G = sum_{b, i kept} g_b(y_i)
    L_fce = (1 / N) * sum_{i kept} CE(sum_b z_b(x_i), y_i)

One call of the fused head of RIDE (``fused_linear_ride_loss`` in fastlt/ops/linear_ride_loss.py), exact by
construction (docs/methods.md 4.4, 6.4 and 8.5). With no LDAM margin, no diversity term and unit temperatures, that
op's ``reduction="sum"`` loss is sum_r w_r * CE(z_r, y_r) over its kept rows r, w_r the row weights. Its rows, through
the shared weight as one expert: the K x B branch rows, a row whose label is outside its branch's group relabelled
``ignore_index``, each weighted beta / G; then the B fused rows sum_b f_b, weighted (1 - beta) / N, since sum_b z_b =
(sum_b f_b) @ W^T + K * bias is one linear head too (the op's row bias scale K; cosine: the sum of the normalised
branch features, times ``scale`` against the normalised weight, which the op never materialises). It runs on every
backend of :func:`fastlt.ops.linear_ride_loss` (C++ CPU and CUDA kernels, Triton, the chunked PyTorch loop, and the
eager reference, which materialises the logits). Tests: tests/ops/test_linear_reslt_loss.py; benchmark:
``fastlt bench fused-head``.
"""

from typing import Optional

import torch
import torch.nn.functional as F

from fastlt.ops import _backend, _checks
from fastlt.ops._class_parallel import batch_loss, check_shard, checks_on_every_rank, whole_batch
from fastlt.ops.linear_ride_loss import NORM_EPS, fused_linear_ride_loss
from fastlt.ops.reslt_loss import check_group_masks, reslt_loss_reference, validate_hyperparameters

OP = "fastlt.linear_reslt_loss"


def linear_reslt_loss_reference(branch_features, weight, target, group_masks, *, beta, bias=None, normalize=False,
                                scale=1.0, chunk_size=None, reduction="mean", ignore_index=_checks.DEFAULT_IGNORE_INDEX,
                                log_eps=0.0, fused_log_eps=None):
    """Eager reference: materialises the ``[K, B, C]`` branch logits and calls
    :func:`fastlt.ops.reslt_loss_reference` (the eager formula of :func:`fastlt.ops.reslt_loss`) with both
    epsilons 0. The arguments are :func:`linear_reslt_loss`'s."""
    target, _ = _checks.loss_conveniences(target, None)
    _validate(branch_features, weight, target, group_masks, beta, bias, scale, chunk_size, reduction, ignore_index,
              log_eps, fused_log_eps)
    if normalize:
        logits = scale * (F.normalize(branch_features, dim=-1, eps=NORM_EPS) @ F.normalize(weight, dim=-1).t())
    else:
        logits = branch_features @ weight.t()
    if bias is not None:
        logits = logits + bias
    return reslt_loss_reference(logits, target, group_masks, beta=beta, log_eps=0.0, fused_log_eps=0.0,
                                reduction=reduction, ignore_index=ignore_index)


def linear_reslt_loss(branch_features: torch.Tensor, weight: torch.Tensor, target: torch.Tensor,
                      group_masks: torch.Tensor, *, beta: float, bias: Optional[torch.Tensor] = None,
                      normalize: bool = False, scale: float = 1.0, chunk_size: Optional[int] = None,
                      reduction: str = "mean", ignore_index: int = _checks.DEFAULT_IGNORE_INDEX,
                      log_eps: float = 0.0, fused_log_eps: Optional[float] = None, process_group=None,
                      gather_batch: bool = True, ddp_trunk: bool = False) -> torch.Tensor:
    """ResLT's loss of K branches through one shared classifier, computed with its gradients from the branch
    features and the classifier weight, never holding the ``[K, B, C]`` logits.

    Args:
        branch_features: ``[K, B, D]`` each branch's feature rows (main branch first).
        weight: ``[C, D]`` the shared classifier's weight (one row per class), same dtype as ``branch_features``.
        target: ``[B]`` integer labels in ``[0, C)`` or equal to ``ignore_index``.
        group_masks: ``[K, C]`` bool, ``group_masks[b, c]``: class c is in branch b's group
            (:func:`fastlt.ops.reslt_groups`); every row must select a class.
        beta: weight of the branch loss L_ice in [0, 1] (the paper's alpha).
        bias: optional ``[C]`` classifier bias; every branch adds it, so the fused logits carry ``K * bias``.
        normalize: cosine classifier (``scale * cos(f_b, w_c)``); ``False`` (ResLT's): ``f_b @ W^T``.
        scale: the cosine classifier's scale (ignored with ``normalize=False``).
        chunk_size: classes per chunk; ``None`` picks one from K x B (about 2M logits per chunk).
        reduction: ``"mean"`` (the paper's loss: the branch terms over G, the fused terms over N, the number of kept
            rows; G is taken at least 1) or ``"sum"`` (no normalisers; docs/methods.md 6.5). ``"none"`` is refused:
            the fused head accumulates the weight's gradient for one scalar loss (per-row losses need the logits
            and :func:`fastlt.ops.reslt_loss`).
        ignore_index: rows whose label equals it add nothing to any term, G or N; their features get a zero
            gradient. Every row ignored: the loss is 0.
        log_eps, fused_log_eps: only 0 (``fused_log_eps=None`` takes ``log_eps``), the exact log-softmax
            cross-entropy in the branch and the fused terms. The official ResLT code's ``-log(softmax + 1e-7)``
            (:func:`fastlt.ops.reslt_loss`'s epsilons) is refused in either term: the fused head's online softmax
            statistics give log-probabilities, not probabilities. So neither the CIFAR / iNaturalist scripts'
            setting (1e-7 in the branch terms only) nor ImageNet-LT's (1e-7 in both) is available here; both need
            the branch logits and :func:`fastlt.ops.reslt_loss`.
        process_group, gather_batch, ddp_trunk: a class-parallel head (:func:`fastlt.ops.linear_ride_loss`):
            ``weight`` ``[n, D]`` and ``bias`` ``[n]`` hold this rank's shard of the classes, ``group_masks`` all C;
            G and N are the whole batch's.

    Memory beyond the inputs and their gradients: O((K + 1) x B x chunk_size) for the chunk buffers and O(K x B x D)
    for the stacked feature rows, never O(K x B x C) and no second C x D buffer: the op writes the weight's gradient
    once, chunk by chunk, and its backward scales it in place. Per class the logits would take K x B values, the
    op's passing gradient D, so the saving grows with K x B / D (``fastlt bench fused-head``).

    Returns the loss in the accumulation dtype (fp32 for fp16/bf16/fp32, fp64 for fp64), differentiable in
    ``branch_features``, ``weight`` and ``bias``.

    >>> counts = (500 * 0.01 ** (torch.arange(1000) / 999)).floor()
    >>> groups = fastlt.ops.reslt_groups(counts, cutoffs=[350, 700])
    >>> features, weight = torch.randn(3, 8, 16), torch.randn(1000, 16, requires_grad=True)
    >>> loss = fastlt.ops.linear_reslt_loss(features, weight, torch.randint(0, 1000, (8,)), groups, beta=0.995,
    ...                                     chunk_size=256)
    >>> loss.backward(); weight.grad.shape
    torch.Size([1000, 16])
    """
    target, _ = _checks.loss_conveniences(target, None)
    ignore_index = _checks.ignore_index(OP, ignore_index)
    num_classes = group_masks.shape[1] if process_group is not None and isinstance(group_masks, torch.Tensor) else None

    def check():
        _validate(branch_features, weight, target, group_masks, beta, bias, scale, chunk_size, reduction,
                  ignore_index, log_eps, fused_log_eps, num_classes)
        if process_group is not None:
            check_shard(OP, "weight", weight, 0, process_group, num_classes)

    checks_on_every_rank(OP, process_group, branch_features, gather_batch, check)
    if _backend.get_backend() == "reference" and process_group is None:
        return linear_reslt_loss_reference(
            branch_features, weight, target, group_masks, beta=beta, bias=bias, normalize=normalize, scale=scale,
            chunk_size=chunk_size, reduction=reduction, ignore_index=ignore_index)
    return _fused_head_call(branch_features, weight, bias, target, group_masks, beta=float(beta),
                            normalize=bool(normalize), scale=float(scale), chunk_size=chunk_size, reduction=reduction,
                            ignore_index=ignore_index, process_group=process_group, gather_batch=gather_batch,
                            ddp_trunk=ddp_trunk)


def _fused_head_call(branch_features, weight, bias, target, group_masks, *, beta, normalize, scale, chunk_size,
                     reduction, ignore_index, process_group=None, gather_batch=True, ddp_trunk=False):
    """The loss as one call of the fused head of RIDE over (K + 1) x B rows through the shared weight (a [1, C, D]
    expert): the K x B branch rows, a row outside its branch's group labelled ignore_index, then the B fused rows
    sum_b f_b (cosine: sum_b f_b / |f_b|, not normalised again) whose bias counts K times. Each row's weight is its
    term's factor, beta / G or (1 - beta) / N (G = N = 1 under ``reduction="sum"``), under the op's sum. With a
    ``process_group`` the rows are the whole batch's (gathered first: G and N count it all), through this rank's
    shard of the classes."""
    if normalize:
        branch_features = F.normalize(branch_features, dim=-1, eps=NORM_EPS)
    if process_group is not None:
        branch_features, (target,) = whole_batch(OP, branch_features, [target], process_group,
                                                 gather_batch=gather_batch, ddp_trunk=ddp_trunk)
    num_branches, batch, dim = branch_features.shape
    acc_dtype = _checks.accumulate_dtype(weight.dtype)
    num_classes = group_masks.shape[1]
    kept = target != ignore_index
    labels = torch.where(kept, target, torch.zeros_like(target))  # an ignored row's label is never an index
    in_group = group_masks[:, labels] & kept  # [K, B]: g_b(y_i) of the kept rows
    branch_target = torch.where(in_group, target, ignore_index).reshape(num_branches * batch)
    rows = torch.cat([branch_features.reshape(num_branches * batch, dim), branch_features.sum(0)])
    branch_factor = torch.full((), beta, dtype=acc_dtype, device=weight.device)
    fused_factor = torch.full((), 1.0 - beta, dtype=acc_dtype, device=weight.device)
    if reduction == "mean":
        branch_factor = branch_factor / in_group.sum().clamp_min(1).to(acc_dtype)  # G
        fused_factor = fused_factor / kept.sum().clamp_min(1).to(acc_dtype)  # N
    row_weights = torch.cat([branch_factor.expand(num_branches * batch), fused_factor.expand(batch)])
    row_bias_scales = None
    if bias is not None:
        row_bias_scales = torch.cat([torch.ones(num_branches * batch, dtype=acc_dtype, device=weight.device),
                                     torch.full((batch,), float(num_branches), dtype=acc_dtype, device=weight.device)])
    arguments = (rows, weight[None], None if bias is None else bias[None], torch.cat([branch_target, target]),
                 torch.zeros(num_classes, dtype=acc_dtype, device=weight.device), None,
                 torch.ones(num_classes, dtype=acc_dtype, device=weight.device))
    options = dict(scale=scale, normalize=normalize, diversity_factor=0.0, chunk_size=chunk_size,
                   ignore_index=ignore_index, row_weights=row_weights, row_bias_scales=row_bias_scales)
    if process_group is None:
        return fused_linear_ride_loss(*arguments, **options, normalize_features=False, reduction="sum")
    return batch_loss(*arguments, **options, reduction=_checks.REDUCTIONS.index("sum"), process_group=process_group)


def _validate(branch_features, weight, target, group_masks, beta, bias, scale, chunk_size, reduction, ignore_index,
              log_eps, fused_log_eps, num_classes=None):
    """The checks (``num_classes``: a class-parallel head's C, whose shard the weight holds; default the weight's)."""
    if _checks.reduction(OP, reduction) == _checks.REDUCTIONS.index("none"):
        raise ValueError(f"{OP}: reduction='none' is not supported: the fused head accumulates the weight's gradient "
                         "for one scalar loss; for per-row losses compute the branch logits and call "
                         "fastlt.ops.reslt_loss(reduction='none')")
    ignore_index = _checks.ignore_index(OP, ignore_index)
    validate_hyperparameters(beta=beta, log_eps=log_eps, fused_log_eps=fused_log_eps, op=OP)
    for name, value in (("log_eps", log_eps), ("fused_log_eps", 0.0 if fused_log_eps is None else fused_log_eps)):
        if value != 0.0:
            raise ValueError(f"{OP}: {name} must be 0 (the exact log-softmax cross-entropy), got {value}; the "
                             "official -log(softmax + 1e-7) needs the probabilities, which the fused head never "
                             f"forms: use the branch logits and fastlt.ops.reslt_loss({name}=...)")
    _checks.tensor(OP, "weight", weight, dims=2, floating=True)
    _checks.tensor(OP, "branch_features", branch_features, dims=3, floating=True)
    num_branches, batch, dim = branch_features.shape
    all_classes, num_classes = num_classes or weight.shape[0], weight.shape[0]
    if num_branches > _checks.MAX_EXPERTS:
        raise ValueError(f"{OP}: branch_features has {num_branches} branches; at most {_checks.MAX_EXPERTS} are "
                         "supported")
    if branch_features.dtype != weight.dtype:
        raise ValueError(f"{OP}: branch_features must have weight's dtype {weight.dtype}, got "
                         f"{branch_features.dtype}")
    if weight.shape[1] != dim:
        raise ValueError(f"{OP}: branch_features must have D={weight.shape[1]} (weight's last dim) features, got "
                         f"{tuple(branch_features.shape)}")
    _checks.same_device(OP, "branch_features", branch_features, weight, "weight")
    _checks.labels(OP, "target", target, batch, all_classes, ignore_index)
    _checks.same_device(OP, "target", target, weight, "weight")
    check_group_masks(OP, group_masks, num_branches, all_classes, weight, "weight")
    if bias is not None:
        _checks.tensor(OP, "bias", bias, floating=True)
        if tuple(bias.shape) != (num_classes,) or bias.dtype != weight.dtype:
            raise ValueError(f"{OP}: bias must be [C]=[{num_classes}] of dtype {weight.dtype}, got "
                             f"{tuple(bias.shape)} {bias.dtype}")
        _checks.same_device(OP, "bias", bias, weight, "weight")
    _checks.number(OP, "scale", scale, low=0.0, low_open=True)
    _checks.chunk_size(OP, chunk_size)
