"""The fused head's two passes as separate ops, for heads whose classes are sharded across ranks
(fastlt/ops/_class_parallel.py): the overloads ``fastlt::linear_ride_loss.statistics`` and
``fastlt::linear_ride_loss.gradients``.

The op ``fastlt::linear_ride_loss`` runs pass 1 (the rows' softmax statistics, fastlt/ops/_chunked_head.py) and pass 2
(the gradients from the finished statistics) in one call. A class-parallel head needs a collective between them:
each rank's pass 1 sees only its shard's classes, the statistics are all-reduced, and pass 2 runs on the shard with
the whole batch's statistics. So each pass is an overload of its own, with the same implementations as the op:

- ``.statistics(features, weight, bias, target, target_margins, temperatures, row_bias_scales, scale,
  normalize_weight, diversity, chunk_size)`` -> the eight statistics of ``_chunked_head.STATISTICS``, in that
  order (``[E, B]`` per expert and row, ``[B]`` per row, in the accumulation dtype);
- ``.gradients(features, weight, bias, target, target_margins, temperatures, row_bias_scales, ce_coefs, div_coefs,
  ce_max, ce_sum, expert_max, expert_sum, mean_max, mean_sum, scale, normalize_weight, diversity, chunk_size)`` ->
  (d features, d weight, d bias) of the part of the loss these classes' logits carry, given the whole batch's
  statistics and row coefficients (``_chunked_head.row_coefficients``).

Both see the shard's classes as the weight's C: ``target`` holds each row's label among them, or -1 when the row's
class is another shard's (or the row is ignored); the per-class tables are the shard's. ``.statistics`` and
``.gradients`` are the C++ CPU and CUDA kernels (csrc/cpu/linear_ride_loss.cpp, csrc/cuda/linear_ride_loss.cu),
``.statistics_triton`` / ``.gradients_triton`` the Triton kernels of kernels/linear_ride_loss.py under the chunked
host loop, ``.statistics_torch`` / ``.gradients_torch`` the same loop in PyTorch. :func:`statistics_reference` and
:func:`gradients_reference` compute the same from the materialised ``[E, B, C]`` logits. They carry no autograd:
the class-parallel head attaches the gradients itself. Tests: tests/ops/test_linear_ride_loss_passes.py.
"""

import torch

from fastlt import _extension
from fastlt.ops import _checks, _library
from fastlt.ops._chunked_head import STATISTICS, ChunkedHead, gradient_outputs, row_statistics
from fastlt.ops._head_arguments import OP, check_head, check_row_table, check_row_tables, op_logits

STATISTICS_SCHEMA = ("(Tensor features, Tensor weight, Tensor? bias, Tensor target, Tensor target_margins, "
                     "Tensor temperatures, Tensor? row_bias_scales, float scale, bool normalize_weight, "
                     "bool diversity, int chunk_size) -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, "
                     "Tensor)")
GRADIENTS_SCHEMA = ("(Tensor features, Tensor weight, Tensor? bias, Tensor target, Tensor target_margins, "
                    "Tensor temperatures, Tensor? row_bias_scales, Tensor ce_coefs, Tensor div_coefs, Tensor ce_max, "
                    "Tensor ce_sum, Tensor expert_max, Tensor expert_sum, Tensor mean_max, Tensor mean_sum, "
                    "float scale, bool normalize_weight, bool diversity, int chunk_size) -> (Tensor, Tensor, Tensor)")
NOT_HERE = -1  # a row's label when its class is not among the weight's
PASS_STATISTICS = ("ce_max", "ce_sum", "expert_max", "expert_sum", "mean_max", "mean_sum")  # what pass 2 reads


def _check_shared(features, weight, bias, target, target_margins, temperatures, row_bias_scales, scale, chunk_size):
    """The checks of both overloads' shared arguments (the C++ pass_setup's)."""
    check_head(OP, features, weight, target, bias, chunk_size, NOT_HERE)  # labels in [-1, C)
    for name, table in (("target_margins", target_margins), ("temperatures", temperatures)):
        _checks.fused_loss_table(OP, name, table, (weight.shape[1],), weight)
    check_row_tables(None, row_bias_scales, bias, target.shape[0], weight)
    _checks.number(OP, "scale", scale, low=0.0, low_open=True)


def _check_statistics_given(weight, batch, ce_coefs, div_coefs, statistics):
    """The checks of .gradients' row coefficients ([B], finite) and statistics ([E, B] or [B], floating)."""
    for name, table in (("ce_coefs", ce_coefs), ("div_coefs", div_coefs)):
        check_row_table(name, table, batch, weight)
    num_experts = weight.shape[0]
    for name, table in zip(PASS_STATISTICS, statistics):
        _checks.tensor(OP, name, table, floating=True)
        shape = (batch,) if name.startswith("mean") else (num_experts, batch)
        if tuple(table.shape) != shape:
            raise ValueError(f"{OP}: {name} must be {list(shape)}, got {tuple(table.shape)}")
        _checks.same_device(OP, name, table, weight, "weight")


def _head(features, weight, bias, target, target_margins, temperatures, row_bias_scales, scale, normalize_weight):
    acc = _checks.accumulate_dtype(weight.dtype)
    return ChunkedHead(features, weight, bias, row_bias_scales, target, target_margins.to(acc), temperatures.to(acc),
                       scale, normalize_weight)


def _statistics(features, weight, bias, target, target_margins, temperatures, row_bias_scales, scale,
                normalize_weight, diversity, chunk_size, kernels=None):
    _check_shared(features, weight, bias, target, target_margins, temperatures, row_bias_scales, scale, chunk_size)
    head = _head(features, weight, bias, target, target_margins, temperatures, row_bias_scales, scale,
                 normalize_weight)
    statistics = row_statistics(head, min(chunk_size, weight.shape[1]), diversity, kernels)
    return tuple(statistics[name] for name in STATISTICS)


def _gradients(features, weight, bias, target, target_margins, temperatures, row_bias_scales, ce_coefs, div_coefs,
               ce_max, ce_sum, expert_max, expert_sum, mean_max, mean_sum, scale, normalize_weight, diversity,
               chunk_size, kernels=None):
    _check_shared(features, weight, bias, target, target_margins, temperatures, row_bias_scales, scale, chunk_size)
    given = (ce_max, ce_sum, expert_max, expert_sum, mean_max, mean_sum)
    _check_statistics_given(weight, target.shape[0], ce_coefs, div_coefs, given)
    head = _head(features, weight, bias, target, target_margins, temperatures, row_bias_scales, scale,
                 normalize_weight)
    statistics = {name: table.to(head.acc).contiguous() for name, table in zip(PASS_STATISTICS, given)}
    return gradient_outputs(head, statistics, features, weight, bias, min(chunk_size, weight.shape[1]),
                            ce_coefs.to(head.acc), div_coefs.to(head.acc).contiguous(), diversity, kernels)


def _triton_kernels():
    from fastlt.kernels import linear_ride_loss as kernels

    return kernels


def _statistics_triton(*args):
    return _statistics(*args, kernels=_triton_kernels())


def _gradients_triton(*args):
    return _gradients(*args, kernels=_triton_kernels())


# ---- the eager references: the materialised [E, B, C] logits of the shard ----


def _margin_logits(features, weight, bias, target, target_margins, row_bias_scales, scale, normalize_weight):
    """(logits z [E, B, C], margin logits z' (the target lowered by its margin), the target's one-hot [B, C]) in the
    accumulation dtype; a row labelled -1 has no target here."""
    acc = _checks.accumulate_dtype(weight.dtype)
    logits = op_logits(features.to(acc), weight.to(acc), normalize_weight=normalize_weight, scale=scale,
                       bias=None if bias is None else bias.to(acc),
                       row_bias_scales=None if row_bias_scales is None else row_bias_scales.to(acc))
    onehot = (target[:, None] == torch.arange(weight.shape[1], device=target.device)).to(acc)
    margins = target_margins.to(acc)[target.clamp_min(0)]
    return logits, logits - margins[:, None] * onehot, onehot


def statistics_reference(features, weight, bias, target, target_margins, temperatures, row_bias_scales, scale,
                         normalize_weight, diversity, chunk_size):
    """``.statistics`` from the materialised logits, formula by formula (the arguments are the overload's)."""
    logits, margin_logits, onehot = _margin_logits(features, weight, bias, target, target_margins, row_bias_scales,
                                                   scale, normalize_weight)
    statistics = {"ce_max": margin_logits.amax(-1), "target_logit": (margin_logits * onehot).sum(-1)}
    statistics["ce_sum"] = torch.exp(margin_logits - statistics["ce_max"][..., None]).sum(-1)
    num_experts, batch = logits.shape[:2]
    if diversity:
        tempered = logits / temperatures.to(logits)
        tempered_mean = tempered.mean(0)
        statistics["expert_max"] = tempered.amax(-1)
        statistics["expert_sum"] = torch.exp(tempered - statistics["expert_max"][..., None]).sum(-1)
        statistics["mean_max"] = tempered_mean.amax(-1)
        mean_exp = torch.exp(tempered_mean - statistics["mean_max"][:, None])
        statistics["mean_sum"] = mean_exp.sum(-1)
        statistics["gap"] = (mean_exp * (tempered_mean - tempered)).sum(-1)
    else:  # the statistics of no class: maxima -inf, sums 0
        for name in ("expert_max", "expert_sum", "gap"):
            statistics[name] = logits.new_full((num_experts, batch), float("-inf") if name.endswith("max") else 0.0)
        statistics["mean_max"] = logits.new_full((batch,), float("-inf"))
        statistics["mean_sum"] = logits.new_zeros((batch,))
    return tuple(statistics[name] for name in STATISTICS)


def gradients_reference(features, weight, bias, target, target_margins, temperatures, row_bias_scales, ce_coefs,
                        div_coefs, ce_max, ce_sum, expert_max, expert_sum, mean_max, mean_sum, scale, normalize_weight,
                        diversity, chunk_size):
    """``.gradients`` by autograd through the materialised logits: the gradient of the shard's surrogate
    ``sum_b ce_b (sum_c p_bc - z'_by) + div_b (sum_c q_bc - sum_c pbar_bc u_bc)``, with p, q and the (detached)
    expert-mean distribution pbar from the given statistics, is ``ce_b (p - onehot) + div_b / T (q - pbar)``: the
    logits' gradient of pass 2 (docs/methods.md 3.2)."""
    acc = _checks.accumulate_dtype(weight.dtype)
    inputs = [tensor.detach().to(acc).requires_grad_() for tensor in (features, weight)]
    inputs.append(bias.detach().to(acc).requires_grad_() if bias is not None else None)
    with torch.enable_grad():
        logits, margin_logits, onehot = _margin_logits(*inputs, target, target_margins, row_bias_scales, scale,
                                                       normalize_weight)
        probabilities = torch.exp(margin_logits - ce_max.to(acc)[..., None]) / ce_sum.to(acc)[..., None]
        surrogate = (ce_coefs.to(acc) * (probabilities.sum(-1) - (margin_logits * onehot).sum(-1))).sum()
        if diversity:
            tempered = logits / temperatures.to(acc)
            expert_probabilities = torch.exp(tempered - expert_max.to(acc)[..., None]) / expert_sum.to(acc)[..., None]
            mean_probabilities = (torch.exp(tempered.detach().mean(0) - mean_max.to(acc)[:, None])
                                  / mean_sum.to(acc)[:, None])
            diversity_terms = expert_probabilities.sum(-1) - (mean_probabilities * tempered).sum(-1)
            surrogate = surrogate + (div_coefs.to(acc) * diversity_terms).sum()
        wanted = [tensor for tensor in inputs if tensor is not None]
        grads = torch.autograd.grad(surrogate, wanted)
    grad_features, grad_weight = grads[0].to(features.dtype), grads[1].to(weight.dtype)
    grad_bias = grads[2].to(bias.dtype) if bias is not None else features.new_empty((0,))
    return grad_features, grad_weight, grad_bias


# ---- torch.library glue ----


def _fake_statistics(features, weight, bias, target, target_margins, temperatures, row_bias_scales, scale,
                     normalize_weight, diversity, chunk_size):
    acc = _checks.accumulate_dtype(weight.dtype)
    num_experts, batch = weight.shape[0], features.shape[-2]
    return tuple(weight.new_empty((batch,) if name.startswith("mean") else (num_experts, batch), dtype=acc)
                 for name in STATISTICS)


def _fake_gradients(features, weight, bias, *_):
    grad_bias = torch.empty_like(bias) if bias is not None else features.new_empty((0,))
    return torch.empty_like(features), torch.empty_like(weight, memory_format=torch.contiguous_format), grad_bias


PYTHON_OVERLOADS = {"statistics_torch": (STATISTICS_SCHEMA, _statistics),
                    "statistics_triton": (STATISTICS_SCHEMA, _statistics_triton),
                    "gradients_torch": (GRADIENTS_SCHEMA, _gradients),
                    "gradients_triton": (GRADIENTS_SCHEMA, _gradients_triton)}
for _name, (_schema, _implementation) in PYTHON_OVERLOADS.items():
    _library.define_overload("linear_ride_loss", _name, _schema, _implementation)
HAS_COMPILED_PASSES = _extension.AVAILABLE and "statistics" in torch.ops.fastlt.linear_ride_loss.overloads()
# {device type: whether the extension has the passes' kernel for it}, looked up once (torch.compile reads a dict)
_KERNEL_DEVICE_TYPES = {device_type: HAS_COMPILED_PASSES and torch._C._dispatch_has_kernel_for_dispatch_key(
    "fastlt::linear_ride_loss.statistics", key) for device_type, key in (("cpu", "CPU"), ("cuda", "CUDA"))}
for _name in (*PYTHON_OVERLOADS, *(("statistics", "gradients") if HAS_COMPILED_PASSES else ())):
    _library.register_fake(f"fastlt::linear_ride_loss.{_name}",
                           _fake_statistics if _name.startswith("statistics") else _fake_gradients)


def pass_implementations(backend: str, device: torch.device):
    """(pass 1, pass 2) of ``backend`` (``"cpp"``, ``"triton"``, ``"reference"``) for tensors on ``device``: the
    C++ kernels' overloads where the extension has them for the device, else the PyTorch loop's (``.torch``)."""
    if backend == "reference":
        return statistics_reference, gradients_reference
    packet = torch.ops.fastlt.linear_ride_loss
    if backend == "triton":
        return packet.statistics_triton, packet.gradients_triton
    if _KERNEL_DEVICE_TYPES.get(device.type, False):
        return packet.statistics, packet.gradients
    return packet.statistics_torch, packet.gradients_torch
