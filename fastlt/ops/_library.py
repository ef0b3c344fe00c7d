"""One op name per op: the C++ extension defines ``fastlt::<op>`` (``torch.ops.fastlt.<op>.default``: the compiled
CPU and CUDA kernels, registered at the bottom of ``csrc/cpu/<op>.cpp`` and ``csrc/cuda/<op>.cu``), and the Triton
kernel is the same op's ``triton`` overload (``torch.ops.fastlt.<op>.triton``), with the same arguments, defined
here from Python. Fake and autograd registrations take either overload's qualified name (``"fastlt::<op>"`` or
``"fastlt::<op>.triton"``); ``tests/ops/test_op_registry.py`` checks that the two schemas agree.
"""

import torch

LIBRARY = torch.library.Library("fastlt", "FRAGMENT")  # kept alive for the process: it owns the registrations


def define_triton(op_name: str, schema: str, implementation) -> torch._ops.OpOverload:
    """Define ``fastlt::<op_name>.triton`` with ``schema`` (what follows the op name in the C++ ``m.def``:
    ``"(Tensor x, float eps) -> Tensor"``), run by ``implementation`` for CPU tensors (under ``TRITON_INTERPRET=1``)
    and CUDA tensors; returns the overload."""
    LIBRARY.define(f"{op_name}.triton{schema}")
    torch.library.register_kernel(f"fastlt::{op_name}.triton", ("cpu", "cuda"), implementation, lib=LIBRARY)
    return getattr(torch.ops.fastlt, op_name).triton


def define_overload(op_name: str, overload_name: str, schema: str, implementation) -> torch._ops.OpOverload:
    """Define ``fastlt::<op_name>.<overload_name>`` with ``schema``, run by ``implementation`` on every device (an
    op's portable PyTorch implementation, e.g. linear_ride_loss's ``.torch``); returns the overload."""
    LIBRARY.define(f"{op_name}.{overload_name}{schema}")
    torch.library.register_kernel(f"fastlt::{op_name}.{overload_name}", None, implementation, lib=LIBRARY)
    return getattr(getattr(torch.ops.fastlt, op_name), overload_name)


def overload(op_name: str, backend: str) -> torch._ops.OpOverload:
    """The registered op that runs ``backend``'s kernel: ``"cpp"`` -> ``.default``, ``"triton"`` -> ``.triton``."""
    return getattr(getattr(torch.ops.fastlt, op_name), "triton" if backend == "triton" else "default")


def register_with_backward_op(op_name: str, overload: str, fake_forward, fake_backward, make_backward,
                              setup_context) -> None:
    """Fake and autograd registrations of one overload ("default" or "triton") of an op whose backward is its own op,
    ``fastlt::<op_name>_backward`` (same overload): ``make_backward(backward_op)`` gives the autograd formula."""
    suffix = "" if overload == "default" else f".{overload}"
    torch.library.register_fake(f"fastlt::{op_name}{suffix}")(fake_forward)
    torch.library.register_fake(f"fastlt::{op_name}_backward{suffix}")(fake_backward)
    backward_op = getattr(getattr(torch.ops.fastlt, f"{op_name}_backward"), overload)
    torch.library.register_autograd(f"fastlt::{op_name}{suffix}", make_backward(backward_op),
                                    setup_context=setup_context)
