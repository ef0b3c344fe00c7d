"""Shared helpers of the op tests: backends to compare, dtype tolerance tables, skip rules, the fused heads' cases."""

import importlib
import pathlib
import re

import pytest
import torch

import fastlt
from fastlt import _extension
from fastlt.ops import _selfcheck

ROOT = pathlib.Path(__file__).resolve().parents[1]


def registered_ops():
    """{op name: the stem of the csrc/cpu file whose TORCH_LIBRARY_FRAGMENT defines it}: the op registry, read from
    the ``m.def`` lines of the C++ sources (every op has a CPU kernel)."""
    ops = {}
    for source in sorted((ROOT / "csrc" / "cpu").glob("*.cpp")):
        for name in re.findall(r'm\.def\(\s*"(\w+)\(', source.read_text()):
            ops[name] = source.stem
    return ops


# The public ops of the registry: an op's backward (``<op>_backward``) belongs to its op.
REGISTERED_OPS = sorted(name for name in registered_ops() if not name.endswith("_backward"))

COMPILED_BACKENDS = [
    pytest.param("cpp", marks=pytest.mark.skipif(not _extension.AVAILABLE, reason="extension not built")),
    "triton",
]
COMPILED_BACKEND_NAMES = (["cpp"] if _extension.AVAILABLE else []) + ["triton"]

# (atol, rtol) of a kernel's output vs the eager reference: the one table of the tests, the differential test and
# fastlt doctor (fastlt/ops/_selfcheck.py; atol relative to the reference's largest magnitude, at least 1)
TOLERANCES = _selfcheck.TOLERANCES

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


def assert_close(actual, expected, dtype=None, magnitude=None):
    """``actual`` within the tolerance of ``dtype`` (default: ``expected``'s) of the reference's ``expected``
    (``magnitude``: the atol's scale, fastlt.ops._selfcheck.tolerance)."""
    atol, rtol = _selfcheck.tolerance(dtype or expected.dtype, expected, magnitude)
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


# ---- fused heads: fastlt.ops.linear_ride_loss and the compositions on it (linear_prior_shifted_ce,
# linear_reslt_loss) ----

_linear_ride_loss_module = importlib.import_module("fastlt.ops.linear_ride_loss")  # the attribute is the function
# Every backend of linear_ride_loss: the eager reference, the C++ kernel, the Triton kernels (interpreter) and the
# chunked PyTorch loop ("torch": what devices without a compiled kernel run under "auto").
EVERY_HEAD_IMPLEMENTATION = [
    "reference",
    pytest.param("cpp", marks=pytest.mark.skipif(_linear_ride_loss_module._compiled_op(torch.device("cpu")) is None,
                                                 reason="no C++ op")),
    "triton", "torch"]


def head_implementation_fixture(implementations):
    """The fixture ``implementation`` of a fused-head test module: each test runs once per name in
    ``implementations``, a backend or "torch" (no compiled kernel: the chunked PyTorch loop)."""

    @pytest.fixture(params=implementations, name="implementation")
    def fixture(request, monkeypatch):
        if request.param == "torch":
            monkeypatch.setattr(_linear_ride_loss_module, "_compiled_op", lambda device: None)
        with backend("auto" if request.param == "torch" else request.param):
            yield request.param

    return fixture


def expert_head_inputs(num_experts, batch, num_classes, dim, *, shared=False, use_bias=False, dtype=torch.float64):
    """E experts' head inputs: ``[features, weight(, bias)]`` in ``dtype`` requiring grad (features ``[E, B, D]``,
    or ``[B, D]`` when ``shared``; weight ``[E, C, D]``; bias ``[E, C]``), a ``[B]`` target and ``[C]`` long-tailed
    class counts."""
    features = torch.randn(batch, dim) if shared else torch.randn(num_experts, batch, dim)
    weight = torch.randn(num_experts, num_classes, dim)
    bias = torch.randn(num_experts, num_classes) if use_bias else None
    tensors = [t.to(dtype).requires_grad_(True) for t in (features, weight, bias) if t is not None]
    return tensors, torch.randint(0, num_classes, (batch,)), long_tail_counts(num_classes)


def head_loss_and_grads(fn, tensors, target, class_table, **kwargs):
    """``fn(features, weight, target, class_table, bias=..., **kwargs)`` detached and its gradients with respect to
    ``tensors`` (``[features, weight(, bias)]``)."""
    features, weight, *bias = tensors
    loss = fn(features, weight, target, class_table, bias=bias[0] if bias else None, **kwargs)
    return loss.detach(), torch.autograd.grad(loss, tensors)


def assert_head_matches_reference(reference, fn, tensors, target, class_table, rtol=1e-10, atol=1e-12, **kwargs):
    """``fn`` and its eager ``reference`` give the same loss (and dtype) and gradients; returns ``fn``'s
    gradients."""
    expected_loss, expected_grads = head_loss_and_grads(reference, tensors, target, class_table, **kwargs)
    loss, grads = head_loss_and_grads(fn, tensors, target, class_table, **kwargs)
    assert loss.dtype == expected_loss.dtype
    torch.testing.assert_close(loss, expected_loss, rtol=rtol, atol=atol)
    for grad, expected in zip(grads, expected_grads):
        assert grad.dtype == expected.dtype and grad.shape == expected.shape
        torch.testing.assert_close(grad, expected, rtol=rtol, atol=atol * max(1.0, expected.abs().max().item()))
    return grads


def assert_head_compiles_fullgraph(fn, tensors, target, class_table, **kwargs):
    """``fn`` under ``torch.compile(fullgraph=True)`` (aot_eager) gives its eager loss and gradients."""

    def loss(features, weight, *bias):
        return fn(features, weight, target, class_table, bias=bias[0] if bias else None, **kwargs)

    expected_loss, expected_grads = head_loss_and_grads(fn, tensors, target, class_table, **kwargs)
    compiled_loss = torch.compile(loss, fullgraph=True, backend="aot_eager")(*tensors)
    torch.testing.assert_close(compiled_loss.detach(), expected_loss)
    for grad, expected in zip(torch.autograd.grad(compiled_loss, tensors), expected_grads):
        torch.testing.assert_close(grad, expected)
