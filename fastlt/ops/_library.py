"""One op name per op: the C++ extension defines ``fastlt::<op>`` (``torch.ops.fastlt.<op>.default``: the compiled
CPU and CUDA kernels, registered at the bottom of ``csrc/cpu/<op>.cpp`` and ``csrc/cuda/<op>.cu``), and the Triton
kernel is the same op's ``triton`` overload (``torch.ops.fastlt.<op>.triton``), with the same arguments, defined
here from Python. Fake and autograd registrations take either overload's qualified name (``"fastlt::<op>"`` or
``"fastlt::<op>.triton"``); ``tests/ops/test_op_registry.py`` checks that the two schemas agree.

Every overload defined here, and every fake (meta) implementation registered through :func:`register_fake`, first
checks each tensor argument's device and dtype (:func:`check_tensor_arguments`), as the C++ kernels do: a tensor on
another device (the ``meta`` device included: the dispatcher sends such a call to the fake implementation) is a
ValueError naming the argument, never uninitialised memory.
"""

import ctypes
import weakref

import torch


def _kept_at_exit(library: torch.library.Library) -> torch.library.Library:
    """``library``, whose registrations are never removed: not by its finalizer at interpreter exit, nor when its
    C++ object would be freed as the modules are cleared (one reference is kept for the process). Removing them
    aborts torch 2.14 once fastlt::linear_ride_loss has more Python-defined overloads than .torch and .triton (the
    passes of fastlt/ops/_head_passes.py): an internal assert of its operator registry ("Tried to access the schema
    for ... which doesn't have a schema registered yet"). An exiting process needs nothing removed."""
    for finalizer in list(weakref.finalize._registry):
        if finalizer.peek() is not None and finalizer.peek()[0] is library:
            finalizer.atexit = False
    ctypes.pythonapi.Py_IncRef(ctypes.py_object(library.m))
    return library


LIBRARY = _kept_at_exit(torch.library.Library("fastlt", "FRAGMENT"))  # kept for the process: it owns the registrations

# Ops with a compiled CPU kernel only, on purpose (op name -> why): no CUDA kernel, no Triton overload, no self-check
# case; on every other device (and dtype / layout the kernel does not take) the public function runs the reference.
# tests/ops/test_op_registry.py requires exactly that of them, so the exemption cannot drift.
CPU_ONLY_OPS = {
    "batch_norm_channels_last": "mends torch's CPU channels_last batch norm (its scalar channel tail); cuDNN has none",
}

# The dtypes of the ops' tensor arguments, by argument name; every other tensor argument is floating point.
TENSOR_DTYPES = {"target": (torch.int64,), "active": (torch.bool,), "group_masks": (torch.bool,)}
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _overload(qualified_name: str) -> torch._ops.OpOverload:
    """``"fastlt::<op>"`` or ``"fastlt::<op>.<overload>"`` -> the OpOverload."""
    op_name, _, overload = qualified_name.removeprefix("fastlt::").partition(".")
    return getattr(getattr(torch.ops.fastlt, op_name), overload or "default")


def check_tensor_arguments(op: torch._ops.OpOverload, args) -> None:
    """ValueError naming the argument unless every tensor among ``args`` (``op``'s positional arguments) is on the
    first tensor argument's device and of its argument's dtype (:data:`TENSOR_DTYPES`)."""
    op_name = "fastlt." + op._schema.name.removeprefix("fastlt::")
    first = None
    for argument, value in zip(op._schema.arguments, args):
        if not isinstance(value, torch.Tensor):
            continue
        allowed = TENSOR_DTYPES.get(argument.name, FLOAT_DTYPES)
        if value.dtype not in allowed:
            names = "/".join(str(dtype).removeprefix("torch.") for dtype in allowed)
            raise ValueError(f"{op_name}: {argument.name} must be {names}, got {value.dtype}")
        if first is None:
            first = argument.name, value.device
        elif value.device != first[1]:
            raise ValueError(f"{op_name}: {argument.name} is on {value.device} but {first[0]} is on {first[1]}")


def _checked(qualified_name: str, implementation):
    """``implementation`` behind :func:`check_tensor_arguments` of the (defined) op ``qualified_name``."""
    op = _overload(qualified_name)

    def checked(*args):
        check_tensor_arguments(op, args)
        return implementation(*args)

    return checked


def register_fake(qualified_name: str, fake_implementation) -> None:
    """Register the fake (meta) implementation of ``qualified_name``, behind the tensor arguments' checks."""
    torch.library.register_fake(qualified_name)(_checked(qualified_name, fake_implementation))


def define_triton(op_name: str, schema: str, implementation) -> torch._ops.OpOverload:
    """Define ``fastlt::<op_name>.triton`` with ``schema`` (what follows the op name in the C++ ``m.def``:
    ``"(Tensor x, float eps) -> Tensor"``), run by ``implementation`` for CPU tensors (under ``TRITON_INTERPRET=1``)
    and CUDA tensors; returns the overload."""
    LIBRARY.define(f"{op_name}.triton{schema}")
    qualified_name = f"fastlt::{op_name}.triton"
    torch.library.register_kernel(qualified_name, ("cpu", "cuda"), _checked(qualified_name, implementation),
                                  lib=LIBRARY)
    return getattr(torch.ops.fastlt, op_name).triton


def define_overload(op_name: str, overload_name: str, schema: str, implementation) -> torch._ops.OpOverload:
    """Define ``fastlt::<op_name>.<overload_name>`` with ``schema``, run by ``implementation`` on every device (an
    op's portable PyTorch implementation, e.g. linear_ride_loss's ``.torch``); returns the overload."""
    LIBRARY.define(f"{op_name}.{overload_name}{schema}")
    qualified_name = f"fastlt::{op_name}.{overload_name}"
    torch.library.register_kernel(qualified_name, None, _checked(qualified_name, implementation), lib=LIBRARY)
    return getattr(getattr(torch.ops.fastlt, op_name), overload_name)


def overload(op_name: str, backend: str) -> torch._ops.OpOverload:
    """The registered op that runs ``backend``'s kernel: ``"cpp"`` -> ``.default``, ``"triton"`` -> ``.triton``."""
    return getattr(getattr(torch.ops.fastlt, op_name), "triton" if backend == "triton" else "default")


def register_with_backward_op(op_name: str, overload: str, fake_forward, fake_backward, make_backward,
                              setup_context) -> None:
    """Fake and autograd registrations of one overload ("default" or "triton") of an op whose backward is its own op,
    ``fastlt::<op_name>_backward`` (same overload): ``make_backward(backward_op)`` gives the autograd formula."""
    suffix = "" if overload == "default" else f".{overload}"
    register_fake(f"fastlt::{op_name}{suffix}", fake_forward)
    register_fake(f"fastlt::{op_name}_backward{suffix}", fake_backward)
    backward_op = getattr(getattr(torch.ops.fastlt, f"{op_name}_backward"), overload)
    torch.library.register_autograd(f"fastlt::{op_name}{suffix}", make_backward(backward_op),
                                    setup_context=setup_context)
