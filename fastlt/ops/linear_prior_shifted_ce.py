"""fastlt.ops.linear_prior_shifted_ce: E classifier heads and the prior-shifted cross-entropy fused, without the
[E, B, C] logits.

    z_k = scale * normalize(x_k) @ normalize(W_k)^T + b_k      (normalize=False: z_k = x_k @ W_k^T + b_k)
    L   = sum_k (1 / N) * sum_{i kept} CE(z_k(x_i) + tau_k * log(pi), y_i)      (fastlt.ops.prior_shifted_ce)

A composition, exact by construction (docs/methods.md 8.1 and 8.5): RIDE's loss with no LDAM margin, no diversity
term, no class weights and unit temperatures is sum_k mean_i CE(z_k(x_i), y_i), so this loss is one call of the fused
head of RIDE (``fused_linear_ride_loss`` in fastlt/ops/linear_ride_loss.py) whose bias carries each expert's shift,
``b_k + tau_k * log(pi)``. The shift is a constant: only the user's bias receives a gradient. It runs on every
backend of :func:`fastlt.ops.linear_ride_loss` (C++ CPU and CUDA kernels, Triton, the chunked PyTorch loop, and the
eager reference, which materialises the logits). Tests: tests/ops/test_linear_prior_shifted_ce.py; benchmark:
``fastlt bench fused-head``.
"""

from typing import Optional

import torch

from fastlt.ops import _backend, _checks, _lt_constants
from fastlt.ops._class_parallel import check_shard, checks_on_every_rank, group_shard
from fastlt.ops._head_arguments import check_head
from fastlt.ops.linear_ride_loss import expert_logits, fused_linear_ride_loss
from fastlt.ops.prior_shifted_ce import prior_shifted_ce_reference, validate_hyperparameters

OP = "fastlt.linear_prior_shifted_ce"


def linear_prior_shifted_ce_reference(features, weight, target, class_counts, *, taus, normalize=True, scale=30.0,
                                      bias=None, chunk_size=None, reduction="mean",
                                      ignore_index=_checks.DEFAULT_IGNORE_INDEX):
    """Eager reference: materialises the ``[E, B, C]`` logits and calls
    :func:`fastlt.ops.prior_shifted_ce_reference` (the eager formula of :func:`fastlt.ops.prior_shifted_ce`). The
    arguments are :func:`linear_prior_shifted_ce`'s."""
    target, class_counts = _checks.loss_conveniences(target, class_counts)
    _validate(features, weight, target, class_counts, taus, bias, scale, chunk_size, reduction, ignore_index)
    logits = expert_logits(features, weight, normalize=normalize, scale=scale, bias=bias)
    return prior_shifted_ce_reference(logits, target, class_counts, taus=taus, reduction=reduction,
                                      ignore_index=ignore_index)


def linear_prior_shifted_ce(features: torch.Tensor, weight: torch.Tensor, target: torch.Tensor,
                            class_counts: torch.Tensor, *, taus, normalize: bool = True, scale: float = 30.0,
                            bias: Optional[torch.Tensor] = None, chunk_size: Optional[int] = None,
                            reduction: str = "mean", ignore_index: int = _checks.DEFAULT_IGNORE_INDEX,
                            process_group=None, gather_batch: bool = True, ddp_trunk: bool = False) -> torch.Tensor:
    """Sum over E experts of the cross-entropy of ``z_k + tau_k * log(pi)`` (Balanced Softmax, logit adjustment,
    BalPoE), computed with its gradients from the features and the experts' classifier weights, never holding the
    ``[E, B, C]`` logits.

    Args:
        features: ``[E, B, D]`` one feature row per expert, or ``[B, D]`` shared by the experts.
        weight: ``[E, C, D]`` the experts' classifier weights (one row per class), same dtype as ``features``.
        target: ``[B]`` integer labels in ``[0, C)`` or equal to ``ignore_index``.
        class_counts: ``[C]`` positive training counts per class (pi = counts / counts.sum()).
        taus: E finite numbers, one per expert, or one number for every expert (1: Balanced Softmax).
        normalize: cosine classifier (``scale * cos(x, w_c)``); ``False``: ``x @ W^T``.
        scale: the cosine classifier's scale (ignored with ``normalize=False``).
        bias: optional ``[E, C]`` added to the logits (before the shift).
        chunk_size: classes per chunk; ``None`` picks one from E and B (about 2M logits per chunk).
        reduction: ``"mean"`` (each expert's CE summed over the kept rows over N, the number of kept rows) or
            ``"sum"`` (docs/methods.md 6.5). ``"none"`` is refused: the fused head accumulates the weight's gradient
            for one scalar loss (per-row losses need the logits: the heads and :func:`fastlt.ops.prior_shifted_ce`).
        ignore_index: rows whose label equals it add nothing to the loss or to N; their features get a zero
            gradient. Every row ignored: the loss is 0.
        process_group, gather_batch, ddp_trunk: a class-parallel head (:func:`fastlt.ops.linear_ride_loss`):
            ``weight`` and ``bias`` hold this rank's shard of the classes, ``class_counts`` all of them.

    Memory beyond the inputs and their gradients: O(E x B x chunk_size) (the fused head's chunk buffers), plus the
    ``[E, C]`` shifted bias, never O(E x B x C). Returns the loss in the accumulation dtype (fp32 for fp16/bf16/fp32,
    fp64 for fp64), differentiable in ``features``, ``weight`` and ``bias``.

    >>> features, weight = torch.randn(3, 8, 16), torch.randn(3, 1000, 16, requires_grad=True)
    >>> counts = torch.linspace(500, 5, 1000).floor()
    >>> target = torch.randint(0, 1000, (8,))
    >>> loss = fastlt.ops.linear_prior_shifted_ce(features, weight, target, counts, taus=[0.0, 1.0, 2.0],
    ...                                           chunk_size=256)
    >>> loss.backward(); weight.grad.shape
    torch.Size([3, 1000, 16])
    """
    target, class_counts = _checks.loss_conveniences(target, class_counts)
    ignore_index = _checks.ignore_index(OP, ignore_index)
    num_classes = len(class_counts) if process_group is not None else None

    def check():
        checked_taus = _validate(features, weight, target, class_counts, taus, bias, scale, chunk_size, reduction,
                                 ignore_index, num_classes)
        if process_group is not None:
            check_shard(OP, "weight", weight, 1, process_group, num_classes)
        return checked_taus

    tau_table = checks_on_every_rank(OP, process_group, features, gather_batch, check)
    if _backend.get_backend() == "reference" and process_group is None:
        return linear_prior_shifted_ce_reference(
            features, weight, target, class_counts, taus=taus, normalize=normalize, scale=scale, bias=bias,
            chunk_size=chunk_size, reduction=reduction, ignore_index=ignore_index)
    shifts = _lt_constants.prior_logit_shifts(class_counts.to(weight.device), tau_table).to(weight.dtype)
    if process_group is not None:  # this rank's classes
        shifts = shifts[:, slice(*group_shard(OP, process_group, len(class_counts)))]
    shifted_bias = shifts if bias is None else bias + shifts  # the shift is a constant: no gradient
    acc_dtype = _checks.accumulate_dtype(weight.dtype)
    num_classes = len(class_counts)
    no_margins = torch.zeros(num_classes, dtype=acc_dtype, device=weight.device)
    unit_temperatures = torch.ones(num_classes, dtype=acc_dtype, device=weight.device)
    return fused_linear_ride_loss(features, weight, shifted_bias, target, no_margins, None, unit_temperatures,
                                  scale=float(scale), normalize=bool(normalize), diversity_factor=0.0,
                                  chunk_size=chunk_size, reduction=reduction, ignore_index=ignore_index,
                                  process_group=process_group, gather_batch=gather_batch, ddp_trunk=ddp_trunk)


def _validate(features, weight, target, class_counts, taus, bias, scale, chunk_size, reduction, ignore_index,
              num_classes=None):
    """Checks the arguments (``num_classes``: a class-parallel head's C, whose shard the weight holds; default the
    weight's); returns the taus as an fp64 [E] tensor."""
    if _checks.reduction(OP, reduction) == _checks.REDUCTIONS.index("none"):
        raise ValueError(f"{OP}: reduction='none' is not supported: the fused head accumulates the weight's gradient "
                         "for one scalar loss; for per-row losses compute the logits and call "
                         "fastlt.ops.prior_shifted_ce(reduction='none')")
    ignore_index = _checks.ignore_index(OP, ignore_index)
    check_head(OP, features, weight, target, bias, chunk_size, ignore_index, num_classes)
    _lt_constants.check_class_counts(OP, class_counts, num_classes or weight.shape[1],
                                     "the log prior of a class without training samples is -inf")
    tau_table = validate_hyperparameters(taus=taus, label_smoothing=0.0, num_experts=weight.shape[0], op=OP)
    _checks.number(OP, "scale", scale, low=0.0, low_open=True)
    return tau_table
