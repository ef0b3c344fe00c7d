"""fastlt.ops.expert_aggregate: (weighted, routed) mean or sum of expert / branch logits.

    out[b, c] = sum_k coef[b, k] * logits[k, b, c],   coef[b, k] = active[b, k] * weights[b, k] / divisor[b]

divisor = E for ``reduce="mean"`` (RIDE), the row's number of active experts when ``active`` is given (RIDE's
routed inference), 1 for ``reduce="sum"`` (ResLT's additive shortcut). Math: csrc/include/fastlt/expert_aggregate.h;
kernels: csrc/cpu/expert_aggregate.cpp, csrc/cuda/expert_aggregate.cu, kernels/expert_aggregate.py;
tests: tests/ops/test_expert_aggregate.py; benchmark: bench/ops.py.
"""

from typing import Optional

import torch

from fastlt import _extension
from fastlt._formulas import expert_coefficients
from fastlt.ops import _backend, _checks, _library, _selfcheck

OP = "fastlt.expert_aggregate"
# The arguments of fastlt::expert_aggregate and its backward, as csrc/cpu/expert_aggregate.cpp defines them (their
# Triton overloads take the same).
SCHEMA = "(Tensor logits, str reduce, Tensor? weights, Tensor? active) -> Tensor"
BACKWARD_SCHEMA = ("(Tensor grad, Tensor logits, str reduce, Tensor? weights, Tensor? active, "
                   "bool weights_requires_grad) -> (Tensor, Tensor)")
REDUCTIONS = ("mean", "sum")


def expert_aggregate_reference(logits, *, reduce="mean", weights=None, active=None):
    """Eager PyTorch reference (fp32 accumulation for fp16/bf16), differentiable by autograd."""
    _validate(logits, reduce, weights, active)
    if active is not None and not torch.compiler.is_compiling():
        _check_active_rows(active)
    acc_dtype = _checks.accumulate_dtype(logits.dtype)
    num_experts, num_rows, _ = logits.shape
    _, coef = expert_coefficients(num_rows, num_experts, reduce, weights, active, acc_dtype, logits.device)
    out = (coef.t().unsqueeze(-1) * logits.to(acc_dtype)).sum(0)
    return out.to(logits.dtype)


def expert_aggregate(
    logits: torch.Tensor,
    *,
    reduce: str = "mean",
    weights: Optional[torch.Tensor] = None,
    active: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Aggregate expert logits ``[E, B, C]`` into ``[B, C]`` in one pass (no copy of strided inputs).

    Args:
        logits: ``[E, B, C]`` fp32/fp16/bf16/fp64, any strides (a ``[B, E, C]`` tensor's ``.transpose(0, 1)`` is
            read in place). Accumulates in fp32 (fp64 for fp64); returns ``logits.dtype``.
        reduce: ``"mean"`` (RIDE) or ``"sum"`` (ResLT's additive shortcut).
        weights: optional ``[E]`` or ``[B, E]`` multipliers of each expert's logits ("mean" = sum_k w_k z_k / E).
        active: optional ``[B, E]`` bool: average each row over its active experts only (RIDE routing). Every row
            needs at least one active expert.

    Differentiable in ``logits`` and ``weights``.

    >>> logits = torch.randn(3, 8, 100)            # 3 experts, batch 8, 100 classes
    >>> fastlt.ops.expert_aggregate(logits).shape
    torch.Size([8, 100])
    """
    _validate(logits, reduce, weights, active)
    backend = _backend.resolve(OP, logits, weights)
    if backend == "reference":
        return expert_aggregate_reference(logits, reduce=reduce, weights=weights, active=active)
    return _library.overload("expert_aggregate", backend)(logits, reduce, weights, active)


def _validate(logits, reduce, weights, active):
    """The one argument check of every backend (the wrapper, the reference and the Triton op call it; the C++ op
    runs the same checks, csrc/ops_common.h expert_aggregate_tables). Active rows are checked apart: a data read."""
    _checks.tensor(OP, "logits", logits, dims=3, floating=True)
    if reduce not in REDUCTIONS:
        raise ValueError(f"{OP}: reduce must be one of {REDUCTIONS}, got {reduce!r}")
    num_experts, num_rows, _ = logits.shape
    if num_experts > _checks.MAX_EXPERTS:
        raise ValueError(f"{OP}: logits has {num_experts} experts; at most {_checks.MAX_EXPERTS} are supported")
    if weights is not None:
        _checks.tensor(OP, "weights", weights, dims=(1, 2), floating=True)
        _checks.same_device(OP, "weights", weights, logits, "logits")
        if tuple(weights.shape) not in ((num_experts,), (num_rows, num_experts)):
            raise ValueError(
                f"{OP}: weights must be [E]=[{num_experts}] or [B, E]=[{num_rows}, {num_experts}], "
                f"got {tuple(weights.shape)}"
            )
    if active is not None:
        _checks.tensor(OP, "active", active, dims=2)
        _checks.same_device(OP, "active", active, logits, "logits")
        if active.dtype != torch.bool:
            raise ValueError(f"{OP}: active must be a bool tensor, got {active.dtype}")
        if tuple(active.shape) != (num_rows, num_experts):
            raise ValueError(f"{OP}: active must be [B, E]=[{num_rows}, {num_experts}], got {tuple(active.shape)}")


def _check_active_rows(active):
    empty_rows = (~active).all(1)
    if bool(empty_rows.any()):
        row = int(empty_rows.nonzero()[0, 0])
        raise ValueError(f"{OP}: active row {row} has no active expert (every row needs >= 1)")


# ---- torch.library glue: fake (meta) implementations and autograd, shared by the C++ and Triton ops ----


def _fake_forward(logits, reduce, weights, active):
    return logits.new_empty((logits.shape[1], logits.shape[2]))


def _fake_backward(grad, logits, reduce, weights, active, weights_requires_grad):
    grad_weights = weights.new_empty(weights.shape) if (weights_requires_grad and weights is not None) else None
    return logits.new_empty(logits.shape), grad_weights if grad_weights is not None else logits.new_empty((0,))


def _setup_context(ctx, inputs, output):
    logits, reduce, weights, active = inputs
    ctx.save_for_backward(logits, weights, active)
    ctx.reduce = reduce


def _differentiable_backward(grad, logits, reduce, weights, active, want_logits, want_weights):
    """The gradients through the reference, themselves differentiable (create_graph=True: gradient penalties,
    second-order methods); the kernels' backward is not."""
    wanted = [tensor for tensor, want in ((logits, want_logits), (weights, want_weights)) if want]
    with torch.enable_grad():
        out = expert_aggregate_reference(logits, reduce=reduce, weights=weights, active=active)
        grads = list(torch.autograd.grad(out, wanted, grad, create_graph=True))
    return (grads.pop(0) if want_logits else None), (grads.pop(0) if want_weights else None)


def _make_backward(backward_op):
    def backward(ctx, grad):
        logits, weights, active = ctx.saved_tensors
        want_weights = weights is not None and ctx.needs_input_grad[2]
        if torch.is_grad_enabled():  # the backward is being recorded (create_graph=True)
            grad_logits, grad_weights = _differentiable_backward(
                grad, logits, ctx.reduce, weights, active, ctx.needs_input_grad[0], want_weights
            )
            return grad_logits, None, grad_weights, None
        grad_logits, grad_weights = backward_op(grad, logits, ctx.reduce, weights, active, want_weights)
        return grad_logits, None, (grad_weights if want_weights else None), None

    return backward


if _extension.AVAILABLE:
    _library.register_with_backward_op("expert_aggregate", "default", _fake_forward, _fake_backward, _make_backward,
                                       _setup_context)


def _expert_aggregate_triton(logits, reduce, weights, active):
    from fastlt.kernels import expert_aggregate as kernel

    _validate(logits, reduce, weights, active)
    if active is not None:
        _check_active_rows(active)
    return kernel.forward(logits, reduce, weights, active)


def _expert_aggregate_triton_backward(grad, logits, reduce, weights, active, weights_requires_grad):
    from fastlt.kernels import expert_aggregate as kernel

    _validate(logits, reduce, weights, active)
    _checks.tensor(f"{OP}_backward", "grad", grad, floating=True)
    if tuple(grad.shape) != tuple(logits.shape[1:]):
        raise ValueError(f"{OP}_backward: grad must be [B, C]={list(logits.shape[1:])}, got {tuple(grad.shape)}")
    _checks.same_device(f"{OP}_backward", "grad", grad, logits, "logits")
    return kernel.backward(grad, logits, reduce, weights, active, weights_requires_grad)


_library.define_triton("expert_aggregate", SCHEMA, _expert_aggregate_triton)
_library.define_triton("expert_aggregate_backward", BACKWARD_SCHEMA, _expert_aggregate_triton_backward)
_library.register_with_backward_op("expert_aggregate", "triton", _fake_forward, _fake_backward, _make_backward,
                                   _setup_context)


@_selfcheck.case(OP)
def selfcheck_case(device, dtype, tiny):
    """The op's self-check (`fastlt doctor`, the CUDA kernel's first use; fastlt/ops/_selfcheck.py): ``(call,
    inputs)``."""
    E, B, C = (2, 3, 9) if tiny else (3, 6, 37)
    logits = torch.randn(E, B, C, device=device).to(dtype).requires_grad_()
    weights = torch.rand(E, device=device).to(dtype)
    return (lambda x: expert_aggregate(x, weights=weights)), (logits,)
