"""Class-parallel fused heads: the classifier's classes sharded across the ranks of a process group
(docs/methods.md 8.6). What ``linear_ride_loss``, ``linear_prior_shifted_ce`` and ``linear_reslt_loss`` run when
given a ``process_group``.

Shards are contiguous: of C classes and W ranks, rank r holds classes ``[start_r, stop_r)`` (:func:`class_shard`;
the first ``C mod W`` ranks one class more, as ``torch.tensor_split``), their rows of the weight and bias, and the
whole batch's features: gathered from the ranks' local batches (``gather_batch=True``) or the same whole batch given
on every rank. The per-class tables (class counts, group masks) are passed whole ([C], O(C) numbers): their
normalisers are global (LDAM's largest margin, DRW's weight sum, the prior, the mean temperature), and a row's
target class is looked up on every rank; the kernels read only the shard's slice.

One step on each rank (:func:`shard_loss`):

1. pass 1 over the shard's classes (``fastlt::linear_ride_loss.statistics``, fastlt/ops/_head_passes.py): the
   rows' softmax statistics restricted to the shard;
2. two all-reduces of ``O(E x B)`` numbers: the maxima (max), then every sum rescaled to its global maximum, the KL
   gaps and the target logits (only the target's shard has a nonzero one) (sum). Statistics of disjoint class ranges
   merge exactly as chunks do, so every rank now holds the whole batch's statistics and the loss;
3. pass 2 over the shard (``.gradients``): the shard's weight and bias gradients, complete (no collective), and
   its part of the features' gradient, which the gather's backward reduce-scatters to each rank's rows (or, for a
   batch given whole, all-reduces).

So a step communicates the gathered features and their gradient (``O(W x B x E x D)``) and the statistics, never the
``[E, C, D]`` weight or its gradient. The loss each rank returns is the whole batch's, as one process on the
gathered batch and the concatenated classifier computes it; its gradients are that process's. A trunk under
DistributedDataParallel averages its gradients over the W ranks: ``ddp_trunk=True`` multiplies the features'
gradient by W, so that the trunk still ends with the gradient of the whole batch's loss (the head's own parameters
stay out of DDP: each rank's are its shard's).
"""

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol
import torch.nn.functional as F

from fastlt.ops import _backend, _checks
from fastlt.ops._chunked_head import NORM_EPS, STATISTICS, loss_from_statistics, row_coefficients
from fastlt.ops._head_passes import NOT_HERE, PASS_STATISTICS, pass_implementations
from fastlt.ops._head_arguments import default_chunk_size

OP = "fastlt.linear_ride_loss"


def class_shard(num_classes: int, world_size: int, rank: int) -> tuple:
    """The classes ``[start, stop)`` rank ``rank`` of ``world_size`` holds: contiguous, the first
    ``num_classes mod world_size`` ranks one class more."""
    base, extra = divmod(num_classes, world_size)
    start = rank * base + min(rank, extra)
    return start, start + base + (1 if rank < extra else 0)


def group_shard(op: str, process_group, num_classes: int) -> tuple:
    """This rank's ``(start, stop)`` of ``num_classes`` in ``process_group``; ValueError when a rank would hold none."""
    _check_initialised(op)
    world_size = dist.get_world_size(process_group)
    if num_classes < world_size:
        raise ValueError(f"{op}: {num_classes} classes cannot be sharded over {world_size} ranks (at least one each)")
    return class_shard(num_classes, world_size, dist.get_rank(process_group))


def _check_initialised(op: str) -> None:
    if not dist.is_available() or not dist.is_initialized():
        raise ValueError(f"{op}: process_group needs torch.distributed initialised (init_process_group)")


def check_shard(op: str, name: str, tensor, dim: int, process_group, num_classes: int) -> None:
    """ValueError unless ``tensor``'s dim ``dim`` holds this rank's shard of ``num_classes`` in ``process_group``."""
    start, stop = group_shard(op, process_group, num_classes)
    if isinstance(tensor, torch.Tensor) and tensor.dim() > dim and tensor.shape[dim] != stop - start:
        raise ValueError(f"{op}: {name} must hold this rank's {stop - start} classes [{start}, {stop}) of "
                         f"{num_classes} (contiguous shards: fastlt.ops.class_shard) in dim {dim}, got shape "
                         f"{tuple(tensor.shape)}")


def checks_on_every_rank(op: str, process_group, features, gather_batch: bool, check):
    """``check()`` (a wrapper's argument checks; returns what it returns). With a ``process_group`` its outcome is
    shared: an error on any rank, or (``gather_batch``) row counts that differ, raise on every rank, instead of the
    other ranks waiting on a collective that one never joins. One all-gather of 2 W numbers per call; while
    torch.compile traces, each rank checks alone."""
    if process_group is None or torch.compiler.is_compiling():
        return check()
    _check_initialised(op)
    try:
        result, error = check(), None
    except (TypeError, ValueError) as caught:
        result, error = None, caught
    batch = features.shape[-2] if gather_batch and isinstance(features, torch.Tensor) and features.dim() >= 2 else -1
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend(process_group) == "nccl" else "cpu"
    mine = torch.tensor([batch, error is not None], device=device)
    batches, failed = funcol.all_gather_single(mine, 0, process_group).view(-1, 2).t().tolist()
    if error is not None:
        raise error
    if any(failed):
        raise ValueError(f"{op}: rank {failed.index(1)} of the process group refused its arguments (see its error)")
    if len(set(batches)) != 1:
        raise ValueError(f"{op}: with gather_batch=True every rank must pass the same number of rows, got {batches} "
                         "(ranks in order)")
    return result


# ---- the batch: gathered from the ranks, or given whole ----


class _ScaleGradient(torch.autograd.Function):
    """Identity whose backward multiplies the gradient by ``factor`` (``ddp_trunk``: DDP divides it again)."""

    @staticmethod
    def forward(ctx, tensor, factor):
        ctx.factor = factor
        return tensor.view_as(tensor)

    @staticmethod
    def backward(ctx, grad):
        return grad * ctx.factor, None


class _SumGradientOverRanks(torch.autograd.Function):
    """Identity whose backward all-reduces (sums) the gradient: each rank's shard gives part of the gradient of a
    batch that every rank holds whole."""

    @staticmethod
    def forward(ctx, tensor, group):
        ctx.group = group
        return tensor.view_as(tensor)

    @staticmethod
    def backward(ctx, grad):
        return funcol.all_reduce(grad.contiguous(), "sum", ctx.group), None


def whole_batch(op: str, features, row_tables, group, *, gather_batch: bool, ddp_trunk: bool):
    """(features, row tables) of the whole batch: with ``gather_batch`` all ranks' rows in rank order (the
    features' gradient is reduce-scattered back, times W with ``ddp_trunk``), else as given (the same whole batch on
    every rank; the features' gradient is all-reduced). ``features``: [..., B, D]; ``row_tables``: [B] tensors or
    None."""
    if not gather_batch:
        return _SumGradientOverRanks.apply(features, group), row_tables
    if ddp_trunk:
        features = _ScaleGradient.apply(features, dist.get_world_size(group))
    gathered = funcol.all_gather_single_autograd(features.contiguous(), features.dim() - 2, group)
    tables = [None if table is None else funcol.all_gather_single(table.contiguous(), 0, group)
              for table in row_tables]
    return gathered, tables


# ---- the loss of the whole batch on one shard of the classes ----


def all_reduce_statistics(statistics: dict, diversity: bool, group) -> dict:
    """The whole batch's statistics from each shard's: the maxima all-reduced (max), then each shard's sums rescaled
    to the global maxima and all-reduced (sum) with the KL gaps (relative to the mean's maximum) and the target
    logits. Without ``diversity`` only the CE's statistics are reduced (the others are unused)."""
    maximum_of = {"ce_sum": "ce_max", "target_logit": None}
    if diversity:
        maximum_of.update(expert_sum="expert_max", mean_sum="mean_max", gap="mean_max")
    maxima = sorted(set(name for name in maximum_of.values() if name))
    reduced = dict(statistics, **_split(funcol.all_reduce(_flat(statistics, maxima), "max", group), statistics,
                                        maxima))
    rescaled = {}
    for name, maximum in maximum_of.items():
        value = statistics[name]
        if maximum is not None:
            shift = torch.exp(statistics[maximum] - reduced[maximum])
            value = value * (shift if shift.dim() == value.dim() else shift[None])  # the gap: [E, B] by [B]
        rescaled[name] = value
    names = list(maximum_of)
    reduced.update(_split(funcol.all_reduce(_flat(rescaled, names), "sum", group), statistics, names))
    return reduced


def _flat(tensors: dict, names) -> torch.Tensor:
    return torch.cat([tensors[name].reshape(-1) for name in names])


def _split(flat: torch.Tensor, like: dict, names) -> dict:
    parts = torch.split(flat, [like[name].numel() for name in names])
    return {name: part.view_as(like[name]) for name, part in zip(names, parts)}


class _AttachGradients(torch.autograd.Function):
    """The loss, whose backward hands out the gradients the passes computed in the forward, scaled by grad_loss (in
    place in eager mode: no second weight-sized buffer). Once only: they came from collectives, which a backward
    cannot run again, so a second backward through the same graph raises instead of handing out scaled buffers, and
    so does a backward with create_graph=True (no second-order terms, rather than silently dropping them)."""

    @staticmethod
    def forward(ctx, loss, features, weight, bias, grad_features, grad_weight, grad_bias):
        ctx.has_bias, ctx.handed_out = bias is not None, False
        ctx.save_for_backward(grad_features, grad_weight, grad_bias)
        return loss.clone()

    @staticmethod
    def backward(ctx, grad_loss):
        if ctx.handed_out:
            raise RuntimeError(f"{OP}: a class-parallel loss's gradients come from its forward's collectives; a second "
                               "backward through the same graph is not supported: compute the loss again")
        if torch.is_grad_enabled():  # create_graph=True: these gradients carry no graph to differentiate
            raise RuntimeError(f"{OP}: a class-parallel loss has no second-order gradients (create_graph=True); "
                               "use the one-process op (process_group=None) for a gradient penalty")
        ctx.handed_out = True
        scale = grad_loss.to(ctx.saved_tensors[0].dtype)
        if torch.compiler.is_compiling():  # traced: functional
            grads = [grad * scale for grad in ctx.saved_tensors]
        else:
            grads = [grad.mul_(scale) if float(grad_loss) != 1.0 else grad for grad in ctx.saved_tensors]
        return None, grads[0], grads[1], grads[2] if ctx.has_bias else None, None, None, None


def shard_loss(features, weight, bias, target, target_margins, class_weights, temperatures, *, shard, scale,
               normalize, diversity_factor, chunk_size, reduction, ignore_index, row_weights, row_bias_scales,
               group):
    """The whole batch's loss (``fused_linear_ride_loss``'s: the same arguments, the per-class tables whole) with
    this rank's shard of the classes: ``weight`` [E, n, D] and ``bias`` [E, n] are the classes ``shard`` =
    ``(start, stop)``, ``features`` [E, B, D] or [B, D] the whole batch (already normalised for a cosine head).
    Backward gives the shard's complete weight and bias gradients and the shard's part of the features' gradient."""
    start, stop = shard
    acc = _checks.accumulate_dtype(weight.dtype)
    target_margins, temperatures = target_margins.to(acc), temperatures.to(acc)
    class_weights = class_weights.to(acc) if class_weights is not None else None
    labels, ce_coef, div_coef = row_coefficients(target, class_weights, temperatures, diversity_factor, reduction,
                                                 ignore_index, row_weights)
    shard_labels = torch.where((labels >= start) & (labels < stop), labels - start, NOT_HERE)
    diversity = diversity_factor != 0.0
    chunk = int(chunk_size or default_chunk_size(weight.shape[0], target.shape[0], stop - start))
    statistics_pass, gradients_pass = pass_implementations(_backend.resolve(OP, weight, features, bias), weight.device)
    head = (features.detach(), weight.detach(), None if bias is None else bias.detach(), shard_labels,
            target_margins[start:stop], temperatures[start:stop], row_bias_scales)
    options = (float(scale), bool(normalize), diversity, chunk)
    statistics = dict(zip(STATISTICS, statistics_pass(*head, *options)))
    statistics = all_reduce_statistics(statistics, diversity, group)
    loss = loss_from_statistics(statistics, ce_coef[None, :], div_coef, diversity)
    if not (torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (features, weight, bias))):
        return loss
    grads = gradients_pass(*head, ce_coef, div_coef, *(statistics[name] for name in PASS_STATISTICS), *options)
    return _AttachGradients.apply(loss, features, weight, bias, *grads)


def batch_loss(features, weight, bias, target, target_margins, class_weights, temperatures, *, scale, normalize,
               diversity_factor, chunk_size, reduction, ignore_index, row_weights, row_bias_scales, process_group):
    """:func:`shard_loss` of ``process_group``'s shard for this rank (the caller checked that ``weight`` holds it:
    :func:`check_shard`); ``features`` (and the row tables) are already the whole batch, and its gradient is this
    shard's part (the caller's gather or sum over the ranks completes it)."""
    shard = group_shard(OP, process_group, target_margins.shape[0])
    return shard_loss(features, weight, bias, target, target_margins, class_weights, temperatures, shard=shard,
                      scale=scale, normalize=normalize, diversity_factor=diversity_factor, chunk_size=chunk_size,
                      reduction=reduction, ignore_index=ignore_index, row_weights=row_weights,
                      row_bias_scales=row_bias_scales, group=process_group)


def fused_linear_ride_loss(features, weight, bias, target, target_margins, class_weights, temperatures, *, scale,
                           normalize, diversity_factor, chunk_size, reduction, ignore_index, row_weights,
                           row_bias_scales, normalize_features, process_group, gather_batch, ddp_trunk):
    """``fastlt.ops.linear_ride_loss.fused_linear_ride_loss`` with a ``process_group``: the arguments are its,
    checked (``reduction`` as its code), with the per-class tables whole and ``weight`` / ``bias`` this rank's
    shard (checked: :func:`checks_on_every_rank`)."""
    if normalize and normalize_features:  # per row: before the gather, whose backward then brings the rows' grads
        features = F.normalize(features, dim=-1, eps=NORM_EPS)
    features, (target, row_weights, row_bias_scales) = whole_batch(
        OP, features, [target, row_weights, row_bias_scales], process_group, gather_batch=gather_batch,
        ddp_trunk=ddp_trunk)
    return batch_loss(features, weight, bias, target, target_margins, class_weights, temperatures, scale=scale,
                      normalize=normalize, diversity_factor=diversity_factor, chunk_size=chunk_size,
                      reduction=reduction, ignore_index=ignore_index, row_weights=row_weights,
                      row_bias_scales=row_bias_scales, process_group=process_group)
