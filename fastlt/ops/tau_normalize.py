"""fastlt.ops.tau_normalize: Decoupling's tau-normalised classifier weights, w_j / max(||w_j||_2, eps) ** tau.

Math: csrc/include/fastlt/tau_normalize.h; kernels: csrc/cpu/tau_normalize.cpp, csrc/cuda/tau_normalize.cu,
kernels/tau_normalize.py; tests: tests/ops/test_tau_normalize.py; benchmark: bench/ops.py.
"""

import torch

from fastlt import _extension
from fastlt.ops import _backend, _checks, _library, _selfcheck

OP = "fastlt.tau_normalize"
# The arguments of fastlt::tau_normalize and its backward, as csrc/cpu/tau_normalize.cpp defines them (their Triton
# overloads take the same).
SCHEMA = "(Tensor weight, float tau, float eps) -> Tensor"
BACKWARD_SCHEMA = "(Tensor grad, Tensor weight, float tau, float eps) -> Tensor"


def tau_normalize_reference(weight, tau, *, eps=1e-12):
    """Eager PyTorch reference (fp32 accumulation for fp16/bf16), differentiable by autograd."""
    tau, eps = _validate(weight, tau, eps)
    w = weight.to(_checks.accumulate_dtype(weight.dtype))
    norms = torch.linalg.vector_norm(w, dim=1, keepdim=True).clamp_min(eps)
    return (w / norms.pow(tau)).to(weight.dtype)


def tau_normalize(weight: torch.Tensor, tau: float, *, eps: float = 1e-12) -> torch.Tensor:
    """Divide every row of a classifier weight ``[C, D]`` by its L2 norm to the power ``tau`` (>= 0).

    ``tau = 0`` returns the weight unchanged, ``tau = 1`` gives unit-norm rows. Differentiable in ``weight``.

    >>> w = torch.randn(1000, 512)
    >>> fastlt.ops.tau_normalize(w, 1.0).norm(dim=1)[:2]
    tensor([1.0000, 1.0000])
    """
    tau, eps = _validate(weight, tau, eps)
    backend = _backend.resolve(OP, weight)
    if backend == "reference":
        return tau_normalize_reference(weight, tau, eps=eps)
    return _library.overload("tau_normalize", backend)(weight, tau, eps)


def _validate(weight, tau, eps):
    """The one argument check of every backend (the wrapper, the reference and the Triton op call it; the C++ op
    runs the same checks, csrc/ops_common.h check_tau_normalize_inputs). Returns (tau, eps) as floats."""
    _checks.tensor(OP, "weight", weight, dims=2, floating=True)
    return _checks.number(OP, "tau", tau, low=0.0), check_eps(OP, eps)


def check_eps(op: str, eps) -> float:
    """The norm clamp max(||w||, eps) of tau_normalize and tau_sweep: a finite number > 0."""
    return _checks.number(op, "eps", eps, low=0.0, low_open=True)


def _differentiable_backward(grad, weight, tau, eps):
    """d out / d weight . grad through the reference, itself differentiable (create_graph=True: gradient penalties,
    second-order methods); the kernels' backward is not."""
    with torch.enable_grad():
        out = tau_normalize_reference(weight, tau, eps=eps)
        (grad_weight,) = torch.autograd.grad(out, weight, grad, create_graph=True)
    return grad_weight


def _fake_forward(weight, tau, eps):
    return torch.empty_like(weight, memory_format=torch.contiguous_format)


def _fake_backward(grad, weight, tau, eps):
    return torch.empty_like(weight, memory_format=torch.contiguous_format)


def _setup_context(ctx, inputs, output):
    weight, tau, eps = inputs
    ctx.save_for_backward(weight)
    ctx.tau, ctx.eps = tau, eps


def _make_backward(backward_op):
    def backward(ctx, grad):
        (weight,) = ctx.saved_tensors
        if torch.is_grad_enabled():  # the backward is being recorded (create_graph=True)
            return _differentiable_backward(grad, weight, ctx.tau, ctx.eps), None, None
        return backward_op(grad, weight, ctx.tau, ctx.eps), None, None

    return backward


if _extension.AVAILABLE:
    _library.register_with_backward_op("tau_normalize", "default", _fake_forward, _fake_backward, _make_backward,
                                       _setup_context)


def _tau_normalize_triton(weight, tau, eps):
    from fastlt.kernels import tau_normalize as kernel

    tau, eps = _validate(weight, tau, eps)
    return kernel.forward(weight, tau, eps)


def _tau_normalize_triton_backward(grad, weight, tau, eps):
    from fastlt.kernels import tau_normalize as kernel

    tau, eps = _validate(weight, tau, eps)
    _checks.tensor(f"{OP}_backward", "grad", grad, floating=True)
    if grad.shape != weight.shape:
        raise ValueError(
            f"{OP}_backward: grad must match weight's shape {tuple(weight.shape)}, got {tuple(grad.shape)}"
        )
    _checks.same_device(f"{OP}_backward", "grad", grad, weight, "weight")
    return kernel.backward(grad, weight, tau, eps)


_library.define_triton("tau_normalize", SCHEMA, _tau_normalize_triton)
_library.define_triton("tau_normalize_backward", BACKWARD_SCHEMA, _tau_normalize_triton_backward)
_library.register_with_backward_op("tau_normalize", "triton", _fake_forward, _fake_backward, _make_backward,
                                   _setup_context)


@_selfcheck.case(OP)
def selfcheck_case(device, dtype, tiny):
    """The op's self-check (`fastlt doctor`, the CUDA kernel's first use; fastlt/ops/_selfcheck.py): ``(call,
    inputs)``."""
    C, D = (5, 8) if tiny else (37, 24)
    weight = torch.randn(C, D, device=device).to(dtype).requires_grad_()
    return (lambda w: tau_normalize(w, 0.7)), (weight,)
