"""Backend choice for every fastlt op: "auto", "cpp" (C++ CPU / CUDA kernels), "triton" or "reference".

The choice is a module-level setting (like ``torch.backends`` flags) so ``torch.compile`` can guard on it.
"""

import contextlib

import torch

from fastlt import _extension

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


def resolve(tensor: torch.Tensor) -> str:
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
