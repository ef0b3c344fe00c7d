"""Shared helpers of the op tests: backends to compare, dtype tolerance tables, skip rules."""

import pytest
import torch

import fastlt
from fastlt import _extension

COMPILED_BACKENDS = [
    pytest.param("cpp", marks=pytest.mark.skipif(not _extension.AVAILABLE, reason="extension not built")),
    "triton",
]
COMPILED_BACKEND_NAMES = (["cpp"] if _extension.AVAILABLE else []) + ["triton"]

# (atol, rtol) of a kernel's output vs the eager reference run on the same low-precision inputs; both accumulate
# in fp32 and round once, so the gap is rounding of the final value (a few ulps).
TOLERANCES = {
    torch.float64: (1e-12, 1e-10),
    torch.float32: (1e-6, 1e-5),
    torch.float16: (1e-3, 2e-3),
    torch.bfloat16: (1e-2, 1.6e-2),
}

needs_cpp = pytest.mark.skipif(not _extension.AVAILABLE, reason="extension not built")
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
needs_cuda_build = pytest.mark.skipif(not _extension.HAS_CUDA, reason="extension built without CUDA kernels")


def raw_ops(op_name):
    """Parameters naming the registered overloads of ``op_name`` that a test may call raw (:func:`raw_op`): the
    compiled one (when the extension is built) and the Triton one."""
    return [pytest.param(op_name, marks=needs_cpp), f"{op_name}.triton"]


def raw_op(name):
    """``torch.ops.fastlt.<op>.default`` for ``"<op>"`` (the compiled kernels), ``.triton`` for ``"<op>.triton"``."""
    op_name, _, overload = name.partition(".")
    return getattr(getattr(torch.ops.fastlt, op_name), overload or "default")


def call_cuda_kernel(op_name, *args):
    """Call the CUDA kernel registered for ``torch.ops.fastlt.<op_name>`` directly, whatever the inputs' device (the
    dispatcher would pick the CPU kernel for CPU tensors): lets a machine without a GPU check that it refuses them."""
    cuda_only = torch._C.DispatchKeySet(torch._C.DispatchKey.CUDA)
    return getattr(torch.ops.fastlt, op_name).default.redispatch(cuda_only, *args)


def assert_close(actual, expected, dtype=None):
    atol, rtol = TOLERANCES[dtype or expected.dtype]
    torch.testing.assert_close(actual, expected, atol=atol, rtol=rtol)


def backend(name):
    return fastlt.ops.use_backend(name)


def long_tail_counts(num_classes, ratio=100.0):
    """Exponential long-tailed class counts from `ratio` down to 1 (ones in the tail)."""
    return (ratio * torch.exp(-torch.arange(num_classes) / max(num_classes, 1) * 6)).floor().clamp_min(1)


def loss_inputs(shape, dtype=torch.float32, scale=10.0, device="cpu"):
    """A fused loss's inputs for ``shape = (E, B, C)``: logits ``[E, B, C]`` (normal, times ``scale``) requiring
    grad, a ``[B]`` target and long-tailed ``[C]`` class counts."""
    num_experts, batch, num_classes = shape
    logits = (torch.randn(num_experts, batch, num_classes) * scale).to(dtype=dtype, device=device).requires_grad_(True)
    return logits, torch.randint(0, num_classes, (batch,), device=device), long_tail_counts(num_classes).to(device)


def loss_and_grad(fn, logits, *args, **kwargs):
    """``fn(logits, *args, **kwargs)`` detached and its gradient with respect to ``logits``."""
    loss = fn(logits, *args, **kwargs)
    (grad,) = torch.autograd.grad(loss, logits)
    return loss.detach(), grad


def backend_param(name, *values):
    """A parameter ``(name, *values)`` for backend ``name`` (skipped for cpp without the build)."""
    return pytest.param(name, *values, marks=[needs_cpp] if name == "cpp" else [])


def on_cpu(name, *values):
    """A parameter ``(name, "cpu", *values)``: backend ``name`` on CPU tensors (skipped for cpp without the build)."""
    return backend_param(name, "cpu", *values)


def on_cuda(name, *values):
    """A ``gpu``-marked parameter ``(name, "cuda", *values)``: backend ``name`` on a CUDA device."""
    return pytest.param(name, "cuda", *values,
                        marks=[needs_cuda, pytest.mark.gpu] + ([needs_cuda_build] if name == "cpp" else []))
