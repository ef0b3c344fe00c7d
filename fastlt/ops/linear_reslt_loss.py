"""fastlt.ops.linear_reslt_loss: ResLT's shared classifier and loss fused, without the [K, B, C] branch logits.

    z_b   = f_b @ W^T + bias        (normalize=True: scale * normalize(f_b) @ normalize(W)^T + bias), b = 1..K
    L     = beta * L_ice + (1 - beta) * L_fce                                     (fastlt.ops.reslt_loss, log_eps=0)
    L_ice = sum_{b, i kept} g_b(y_i) * CE(z_b(x_i), y_i) / G,   G = sum_{b, i kept} g_b(y_i)
    L_fce = (1 / N) * sum_{i kept} CE(sum_b z_b(x_i), y_i)

Two calls of the fused head of RIDE (``fused_linear_ride_loss`` in fastlt/ops/linear_ride_loss.py), exact by
construction (docs/methods.md 4.4, 6.4 and 8.5). With no LDAM margin, no diversity term and unit temperatures, that
op's ``reduction="sum"`` loss of one head is the sum of the kept rows' CE. The branch term: the K branches' feature
rows stacked into one batch of K x B rows through the shared weight, a row whose label is outside its branch's group
relabelled ``ignore_index``, so the call gives sum_{b, i} g_b(y_i) * CE(z_b(x_i), y_i); divided by G. The fused term:
sum_b z_b = (sum_b f_b) @ W^T + K * bias is one linear head too (cosine: the sum of the normalised branch features
times ``scale`` against the normalised weight), one more call, divided by N. It runs on every backend of
:func:`fastlt.ops.linear_ride_loss` (C++ CPU and CUDA kernels, Triton, the chunked PyTorch loop, and the eager
reference, which materialises the logits). Tests: tests/ops/test_linear_reslt_loss.py; benchmark:
``fastlt bench fused-head``.
"""

import functools
from typing import Optional

import torch
import torch.nn.functional as F

from fastlt.ops import _backend, _checks
from fastlt.ops._fused_loss import scale_saved_gradient
from fastlt.ops.linear_ride_loss import NORM_EPS, fused_linear_ride_loss
from fastlt.ops.reslt_loss import check_group_masks, reslt_loss_reference

OP = "fastlt.linear_reslt_loss"


def linear_reslt_loss_reference(branch_features, weight, target, group_masks, *, beta, bias=None, normalize=False,
                                scale=1.0, chunk_size=None, reduction="mean", ignore_index=_checks.DEFAULT_IGNORE_INDEX,
                                log_eps=0.0):
    """Eager reference: materialises the ``[K, B, C]`` branch logits and calls
    :func:`fastlt.ops.reslt_loss_reference` (the eager formula of :func:`fastlt.ops.reslt_loss`) with
    ``log_eps=0``. The arguments are :func:`linear_reslt_loss`'s."""
    target, _ = _checks.loss_conveniences(target, None)
    _validate(branch_features, weight, target, group_masks, beta, bias, scale, chunk_size, reduction, ignore_index,
              log_eps)
    if normalize:
        logits = scale * (F.normalize(branch_features, dim=-1, eps=NORM_EPS) @ F.normalize(weight, dim=-1).t())
    else:
        logits = branch_features @ weight.t()
    if bias is not None:
        logits = logits + bias
    return reslt_loss_reference(logits, target, group_masks, beta=beta, log_eps=0.0, reduction=reduction,
                                ignore_index=ignore_index)


def linear_reslt_loss(branch_features: torch.Tensor, weight: torch.Tensor, target: torch.Tensor,
                      group_masks: torch.Tensor, *, beta: float, bias: Optional[torch.Tensor] = None,
                      normalize: bool = False, scale: float = 1.0, chunk_size: Optional[int] = None,
                      reduction: str = "mean", ignore_index: int = _checks.DEFAULT_IGNORE_INDEX,
                      log_eps: float = 0.0) -> torch.Tensor:
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
        log_eps: only 0, the exact log-softmax cross-entropy. The official ResLT code's ``-log(softmax + 1e-7)``
            (:func:`fastlt.ops.reslt_loss`'s ``log_eps``) is refused: the fused head's online softmax statistics
            give log-probabilities, not probabilities.

    Memory beyond the inputs and their gradients: O(K x B x chunk_size) for the chunk buffers, never O(K x B x C).
    Each call computes the weight's gradient in its forward pass; eager mode takes each call's gradients as the call
    returns and adds them up, so one C x D gradient is held beyond the result (torch.compile traces the plain sum of
    the two calls and holds both until the backward). With ``normalize=True`` the fused call also takes the
    normalised weight (C x D, and its gradient). So it saves memory over the materialised logits when K x B is large
    against D: per class, the logits take K x B values, the passing gradient D (at K = 3, B = 256, D = 512 the two
    are at par, and this takes about 2x the time: ``fastlt bench fused-head``).

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
    _validate(branch_features, weight, target, group_masks, beta, bias, scale, chunk_size, reduction, ignore_index,
              log_eps)
    if _backend.get_backend() == "reference":
        return linear_reslt_loss_reference(
            branch_features, weight, target, group_masks, beta=beta, bias=bias, normalize=normalize, scale=scale,
            chunk_size=chunk_size, reduction=reduction, ignore_index=ignore_index)
    term = functools.partial(_loss_term, target=target, group_masks=group_masks, beta=float(beta),
                             normalize=bool(normalize), scale=float(scale), chunk_size=chunk_size,
                             reduction=reduction, ignore_index=ignore_index)
    inputs = (branch_features, weight, bias)
    if (torch.compiler.is_compiling() or not torch.is_grad_enabled()
            or not any(x is not None and x.requires_grad for x in inputs)):
        return term(0, *inputs) + term(1, *inputs)
    return _GradientsInForward.apply(term, 2, *inputs)


def _loss_term(index, branch_features, weight, bias, *, target, group_masks, beta, normalize, scale, chunk_size,
               reduction, ignore_index):
    """Term ``index`` of the loss, one fused head call: 0 the branch term beta * sum_{b, i} g_b(y_i) CE(z_b(x_i)) / G
    (the K x B branch rows stacked, a row outside its group labelled ignore_index), 1 the fused term
    (1 - beta) * sum_i CE(sum_b z_b(x_i)) / N (G = N = 1 under ``reduction="sum"``)."""
    num_branches, batch, dim = branch_features.shape
    acc_dtype = _checks.accumulate_dtype(weight.dtype)
    num_classes = weight.shape[0]
    no_margins = torch.zeros(num_classes, dtype=acc_dtype, device=weight.device)
    unit_temperatures = torch.ones(num_classes, dtype=acc_dtype, device=weight.device)

    def head_loss(features, head_weight, head_bias, head_target, head_normalize):
        """sum_i CE(z(x_i), y_i) over the rows not labelled ignore_index, z one linear (or cosine) head: a
        [1, C, D] expert."""
        return fused_linear_ride_loss(
            features, head_weight[None], None if head_bias is None else head_bias[None], head_target, no_margins,
            None, unit_temperatures, scale=scale, normalize=head_normalize, diversity_factor=0.0,
            chunk_size=chunk_size, reduction="sum", ignore_index=ignore_index)

    kept = target != ignore_index
    if index == 0:
        labels = torch.where(kept, target, torch.zeros_like(target))  # an ignored row's label is never an index
        in_group = group_masks[:, labels] & kept  # [K, B]: g_b(y_i) of the kept rows
        branch_target = torch.where(in_group, target, ignore_index).reshape(num_branches * batch)
        term = beta * head_loss(branch_features.reshape(num_branches * batch, dim), weight, bias, branch_target,
                                normalize)
        return term if reduction == "sum" else term / in_group.sum().clamp_min(1).to(acc_dtype)  # G
    fused_bias = None if bias is None else num_branches * bias
    if normalize:  # sum_b scale * cos(f_b, W) is a plain linear head on scale * sum_b f_b / |f_b| and W / |w|
        fused_features = scale * F.normalize(branch_features, dim=-1, eps=NORM_EPS).sum(0)
        term = (1 - beta) * head_loss(fused_features, F.normalize(weight, dim=-1, eps=NORM_EPS), fused_bias, target,
                                      False)
    else:
        term = (1 - beta) * head_loss(branch_features.sum(0), weight, fused_bias, target, False)
    return term if reduction == "sum" else term / kept.sum().clamp_min(1).to(acc_dtype)  # N


class _GradientsInForward(torch.autograd.Function):
    """The sum of the loss terms, whose gradients are taken in the forward pass one term at a time and added into
    one buffer per input, which the backward scales by grad_output and hands on (it becomes the weight's ``.grad``).
    Each fused head call keeps the gradient of the weight it saw until its backward: through plain autograd both
    calls' gradients would live until the backward, which then copies one into ``.grad``, one C x D gradient more at
    the peak. (torch.compile traces the plain sum instead: dynamo cannot trace autograd.grad.)"""

    @staticmethod
    def forward(ctx, term, num_terms, *inputs):
        leaves = [x.detach().requires_grad_() if x is not None and x.requires_grad else None for x in inputs]
        differentiable = [leaf for leaf in leaves if leaf is not None]
        arguments = [leaf if leaf is not None else x for leaf, x in zip(leaves, inputs)]
        loss, gradients = None, None
        with torch.enable_grad():
            for index in range(num_terms):
                value = term(index, *arguments)
                value_gradients = torch.autograd.grad(value, differentiable, allow_unused=True)
                loss = value.detach() if loss is None else loss + value.detach()
                gradients = _add_into(gradients, value_gradients)
                del value, value_gradients  # the call's saved gradients go before the next call
        ctx.input_slots = [leaf is not None for leaf in leaves]
        ctx.save_for_backward(*(g if g is not None else torch.zeros_like(x) for g, x in zip(gradients, differentiable)))
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        gradients = iter(ctx.saved_tensors)
        return (None, None, *(scale_saved_gradient(next(gradients), grad_loss) if slot else None
                              for slot in ctx.input_slots))


def _add_into(totals, gradients):
    """``totals`` (None at first) plus ``gradients`` element-wise, in place where a total exists; None is zero."""
    if totals is None:
        return list(gradients)
    return [total if gradient is None else gradient if total is None else total.add_(gradient)
            for total, gradient in zip(totals, gradients)]


def _validate(branch_features, weight, target, group_masks, beta, bias, scale, chunk_size, reduction, ignore_index,
              log_eps):
    if _checks.reduction(OP, reduction) == _checks.REDUCTIONS.index("none"):
        raise ValueError(f"{OP}: reduction='none' is not supported: the fused head accumulates the weight's gradient "
                         "for one scalar loss; for per-row losses compute the branch logits and call "
                         "fastlt.ops.reslt_loss(reduction='none')")
    ignore_index = _checks.ignore_index(OP, ignore_index)
    if _checks.number(OP, "log_eps", log_eps, low=0.0) != 0.0:
        raise ValueError(f"{OP}: log_eps must be 0 (the exact log-softmax cross-entropy), got {log_eps}; the official "
                         "-log(softmax + 1e-7) needs the probabilities, which the fused head never forms: use the "
                         "branch logits and fastlt.ops.reslt_loss(log_eps=1e-7)")
    _checks.tensor(OP, "weight", weight, dims=2, floating=True)
    _checks.tensor(OP, "branch_features", branch_features, dims=3, floating=True)
    num_branches, batch, dim = branch_features.shape
    num_classes = weight.shape[0]
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
    _checks.labels(OP, "target", target, batch, num_classes, ignore_index)
    _checks.same_device(OP, "target", target, weight, "weight")
    check_group_masks(OP, group_masks, num_branches, num_classes, weight, "weight")
    _checks.number(OP, "beta", beta, low=0.0, high=1.0)
    if bias is not None:
        _checks.tensor(OP, "bias", bias, floating=True)
        if tuple(bias.shape) != (num_classes,) or bias.dtype != weight.dtype:
            raise ValueError(f"{OP}: bias must be [C]=[{num_classes}] of dtype {weight.dtype}, got "
                             f"{tuple(bias.shape)} {bias.dtype}")
        _checks.same_device(OP, "bias", bias, weight, "weight")
    _checks.number(OP, "scale", scale, low=0.0, low_open=True)
    _checks.chunk_size(OP, chunk_size)
