"""Backend choice for every fastlt op: "auto", "cpp" (C++ CPU / CUDA kernels), "triton" or "reference".

The choice is a module-level setting (like ``torch.backends`` flags) so ``torch.compile`` can guard on it.

Self-check: the first time a process would run an op's compiled kernel on a device type in
``SELFCHECK_DEVICE_TYPES`` (CUDA: those kernels are not tested on every GPU), it first runs that op on tiny inputs
against the reference (``fastlt.doctor.check_op``); if they disagree it warns once and that op uses Triton (CUDA) or
the reference instead for the rest of the process. ``FASTLT_SELFCHECK=0`` turns it off.
"""

import contextlib
import os
import warnings

import torch

from fastlt import _extension

BACKENDS = ("auto", "cpp", "triton", "reference")
_backend = "auto"

SELFCHECK = os.environ.get("FASTLT_SELFCHECK", "1") != "0"
SELFCHECK_DEVICE_TYPES = ("cuda",)
_selfcheck_results = {}  # (op, device type) -> None (agrees with the reference) or the backend used instead
_selfcheck_paused = False


def get_backend() -> str:
    return _backend


def set_backend(backend: str) -> None:
    """Select the implementation used by every fastlt op.

    ``auto``: the compiled kernels when the extension has them for the tensor's device (CUDA tensors fall back to
    Triton when the extension was built without CUDA), else the eager reference.

    >>> fastlt.ops.set_backend("reference")   # plain PyTorch everywhere, e.g. to debug
    """
    global _backend
    if backend not in BACKENDS:
        raise ValueError(f"fastlt.ops.set_backend: backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "cpp" and not _extension.AVAILABLE:
        raise RuntimeError(f"fastlt.ops.set_backend('cpp'): the extension is not built ({_extension.IMPORT_ERROR})")
    if backend == "triton":
        from fastlt import kernels

        if not kernels.AVAILABLE:
            raise RuntimeError("fastlt.ops.set_backend('triton'): triton is not installed")
    _backend = backend


@contextlib.contextmanager
def use_backend(backend: str):
    """Context manager form of :func:`set_backend`; restores the previous backend on exit.

    >>> logits = torch.randn(3, 8, 100)
    >>> with fastlt.ops.use_backend("triton"):
    ...     out = fastlt.ops.expert_aggregate(logits)
    >>> fastlt.ops.get_backend()
    'auto'
    """
    previous = _backend
    set_backend(backend)
    try:
        yield
    finally:
        set_backend(previous)


def resolve(op: str, tensor: torch.Tensor, *others) -> str:
    """The concrete backend for the op named ``op`` (``"fastlt.<op>"``) whose main input is ``tensor`` (its device
    decides) and whose other differentiable inputs are ``others`` (None allowed). A call traced by a ``torch.func``
    transform (grad, vmap, jacrev, ...: any of the tensors is wrapped) takes the eager reference on every op: the
    transforms cannot run through a torch.library autograd formula."""
    if not torch.compiler.is_compiling() and any(
            t is not None and torch._C._functorch.is_functorch_wrapped_tensor(t) for t in (tensor, *others)):
        return "reference"
    backend = _resolve(tensor)
    if backend == "cpp" and SELFCHECK and not _selfcheck_paused and tensor.device.type in SELFCHECK_DEVICE_TYPES:
        key = (op, tensor.device.type)
        if key not in _selfcheck_results:
            if torch.compiler.is_compiling():  # checked at the first eager call
                return backend
            _selfcheck_results[key] = _selfcheck(op, tensor.device)
        return _selfcheck_results[key] or backend
    return backend


@contextlib.contextmanager
def selfcheck_bypassed():
    """Run the compiled kernels unchecked (fastlt doctor tests them itself; the self-check calls the op too)."""
    global _selfcheck_paused
    previous, _selfcheck_paused = _selfcheck_paused, True
    try:
        yield
    finally:
        _selfcheck_paused = previous


def _selfcheck(op: str, device: torch.device):
    """None when ``op``'s compiled kernel agrees with the reference on ``device``, else the backend to use instead."""
    from fastlt import doctor, kernels

    failures = [row for row in doctor.check_op(op, device, "cpp", dtypes=(torch.float32,), tiny=True) if not row["ok"]]
    if not failures:
        return None
    fallback = "triton" if device.type == "cuda" and kernels.AVAILABLE else "reference"
    warnings.warn(
        f"fastlt: the compiled {device.type} kernel of {op} disagrees with the reference on this machine "
        f"({failures[0]['note']}); {op} uses the {fallback} backend in this process. `fastlt doctor` checks every "
        "kernel; FASTLT_SELFCHECK=0 turns this check off.",
        RuntimeWarning,
        stacklevel=3,
    )
    return fallback


def _resolve(tensor: torch.Tensor) -> str:
    """The concrete backend for an op whose main input is ``tensor``."""
    if _backend != "auto":
        if _backend == "cpp" and tensor.is_cuda and not _extension.HAS_CUDA:
            raise RuntimeError(
                "fastlt: backend 'cpp' was asked for a CUDA tensor, but the extension has no CUDA kernels"
            )
        return _backend
    if _extension.AVAILABLE and (tensor.device.type == "cpu" or (tensor.is_cuda and _extension.HAS_CUDA)):
        return "cpp"
    if tensor.is_cuda:
        from fastlt import kernels

        if kernels.AVAILABLE:
            return "triton"
    return "reference"
