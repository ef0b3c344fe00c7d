"""Backend choice for every fastlt op: "auto", "cpp" (C++ CPU / CUDA kernels), "triton" or "reference".

The choice is a module-level setting (like ``torch.backends`` flags) so ``torch.compile`` can guard on it.
:func:`resolve` turns it into the concrete backend of one call; it routes ``torch.func`` transforms to the reference
and applies the first-use self-check of the compiled kernels (fastlt/ops/_selfcheck.py).
"""

import contextlib

import torch

from fastlt import _extension
from fastlt.ops import _selfcheck

BACKENDS = ("auto", "cpp", "triton", "reference")
_backend = "auto"


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
    transforms cannot run through a torch.library autograd formula. A compiled kernel that failed its first-use
    self-check is replaced by the backend the check chose."""
    if not torch.compiler.is_compiling() and any(
            t is not None and torch._C._functorch.is_functorch_wrapped_tensor(t) for t in (tensor, *others)):
        return "reference"
    backend = _resolve(tensor)
    if backend == "cpp":
        return _selfcheck.verdict(op, tensor.device) or backend
    return backend


def _resolve(tensor: torch.Tensor) -> str:
    """The concrete backend for an op whose main input is ``tensor``, from the setting (or the backend the
    self-check is running the op on)."""
    setting = _selfcheck.running_backend or _backend
    if setting != "auto":
        if setting == "cpp" and tensor.is_cuda and not _extension.HAS_CUDA:
            raise RuntimeError(
                "fastlt: backend 'cpp' was asked for a CUDA tensor, but the extension has no CUDA kernels"
            )
        return setting
    if _extension.AVAILABLE and (tensor.device.type == "cpu" or (tensor.is_cuda and _extension.HAS_CUDA)):
        return "cpp"
    if tensor.is_cuda:
        from fastlt import kernels

        if kernels.AVAILABLE:
            return "triton"
    return "reference"
