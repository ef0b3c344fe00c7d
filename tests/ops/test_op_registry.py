"""Every op the C++ sources define has all of its pieces (docs/architecture.md 2 and 4): the public function and its
eager reference in fastlt.ops, the CPU kernel registered at the bottom of its own csrc/cpu/<op>.cpp, the CUDA kernel
registered at the bottom of csrc/cuda/<op>.cu, the Triton kernel in kernels/<op>.py as the op's ``triton`` overload
with the same schema, a test file, a benchmark row and its figure in BENCHMARKS.md, and a self-check case
(fastlt/ops/_selfcheck.py: `fastlt doctor` and the CUDA first-use check run it). The CPU-only ops
(fastlt.ops._library.CPU_ONLY_OPS) instead must have no CUDA kernel, Triton kernel, triton overload or self-check case:
every device but the CPU runs their reference. Every overload of every op checks its tensor arguments' devices and
dtypes, its fake (meta) implementation included."""

import re

import pytest
import torch
from op_helpers import REGISTERED_OPS, ROOT, needs_cpp, registered_ops

import fastlt
from fastlt import _extension
from fastlt.ops import _library, _selfcheck

OPS = registered_ops()
PUBLIC_OPS = REGISTERED_OPS


def test_the_sources_define_the_ops_fastlt_exports():
    assert {"expert_aggregate", "tau_normalize", "tau_sweep", "ride_loss", "reslt_loss", "prior_shifted_ce",
            "linear_ride_loss"} <= set(PUBLIC_OPS)
    assert all(OPS[f"{name}_backward"] == name for name in ("expert_aggregate", "tau_normalize"))


def test_cpu_only_ops_are_registered_ops():
    """An exemption names an op of the registry (a renamed or removed op leaves none behind)."""
    assert set(_library.CPU_ONLY_OPS) <= set(PUBLIC_OPS)


def _overload_names(name):
    """The registered overloads of ``fastlt::<name>`` (none when nothing defines it: a CPU-only op without the
    extension)."""
    packet = getattr(torch.ops.fastlt, name, None)
    return packet.overloads() if packet is not None else []


@pytest.mark.parametrize("name", PUBLIC_OPS)
def test_op_has_every_piece(name):
    stem = OPS[name]
    assert stem == name, f"{name} is defined in csrc/cpu/{stem}.cpp, not in its own file"
    assert callable(getattr(fastlt.ops, name, None)), f"fastlt.ops.{name} is not exported"
    assert callable(getattr(fastlt.ops, f"{name}_reference", None)), f"fastlt.ops.{name}_reference is not exported"
    assert (ROOT / "fastlt" / "ops" / f"{name}.py").is_file()
    triton_kernel, cuda_source = ROOT / "kernels" / f"{name}.py", ROOT / "csrc" / "cuda" / f"{name}.cu"
    if name in _library.CPU_ONLY_OPS:  # on purpose: none of the other devices' pieces, no self-check
        assert not triton_kernel.is_file(), f"{name} is CPU-only (_library.CPU_ONLY_OPS) but has kernels/{name}.py"
        assert not cuda_source.is_file(), f"{name} is CPU-only (_library.CPU_ONLY_OPS) but has csrc/cuda/{name}.cu"
        assert "triton" not in _overload_names(name), f"{name} is CPU-only (_library.CPU_ONLY_OPS) but has .triton"
        assert name not in _selfcheck.CASES, f"{name} is CPU-only (_library.CPU_ONLY_OPS) but has a self-check case"
    else:
        assert triton_kernel.is_file(), f"no Triton kernel kernels/{name}.py"
        assert cuda_source.is_file(), f"no CUDA kernel csrc/cuda/{name}.cu"
        assert f'm.impl("{name}"' in cuda_source.read_text(), f"csrc/cuda/{name}.cu does not register {name}"
        assert name in _selfcheck.CASES, f"{name} has no self-check case (fastlt doctor, the CUDA first-use check)"
    assert (ROOT / "tests" / "ops" / f"test_{name}.py").is_file(), f"no tests/ops/test_{name}.py"
    benchmarks = "\n".join(path.read_text() for path in (ROOT / "bench").glob("*.py"))
    assert re.search(rf"\bops\.{name}\b", benchmarks), f"no benchmark row calls fastlt.ops.{name} (bench/*.py)"
    assert re.search(rf"\b{name}\b", (ROOT / "BENCHMARKS.md").read_text()), f"BENCHMARKS.md has no figure of {name}"


@pytest.mark.parametrize("name", sorted(OPS))
def test_triton_overload_takes_the_compiled_ops_arguments(name):
    if OPS[name] in _library.CPU_ONLY_OPS:  # the op or its backward
        assert "triton" not in _overload_names(name), f"fastlt::{name} is CPU-only (_library.CPU_ONLY_OPS): no .triton"
        return
    packet = getattr(torch.ops.fastlt, name)
    assert "triton" in packet.overloads(), f"fastlt::{name} has no triton overload"
    if not _extension.AVAILABLE:
        return
    compiled, triton = str(packet.default._schema), str(packet.triton._schema)
    assert triton == compiled.replace(f"fastlt::{name}(", f"fastlt::{name}.triton(", 1)


@needs_cpp
@pytest.mark.parametrize("name", sorted(OPS))
def test_compiled_kernels_are_registered_for_each_built_device(name):
    assert torch._C._dispatch_has_kernel_for_dispatch_key(f"fastlt::{name}", "CPU")
    has_cuda = torch._C._dispatch_has_kernel_for_dispatch_key(f"fastlt::{name}", "CUDA")
    assert has_cuda == (_extension.HAS_CUDA and OPS[name] not in _library.CPU_ONLY_OPS)


def _overloads(name):
    """Every registered overload of ``fastlt::<name>``: the compiled one (with the extension), triton, torch (none
    for a CPU-only op without the extension)."""
    packet = getattr(torch.ops.fastlt, name, None)
    return [getattr(packet, overload) for overload in _overload_names(name)
            if overload != "default" or _extension.AVAILABLE]


def _placeholder_arguments(op):
    """Arguments of ``op`` from its schema alone: one-element CPU tensors of each argument's dtype
    (fastlt.ops._library.TENSOR_DTYPES), plain values of each scalar type."""
    scalars = {"float": 1.0, "int": 1, "bool": True, "str": "mean"}
    arguments = {}
    for argument in op._schema.arguments:
        kind = argument.type
        kind = str(kind.getElementType() if isinstance(kind, torch.OptionalType) else kind)
        if kind == "Tensor":
            dtype = _library.TENSOR_DTYPES.get(argument.name, (torch.float32,))[0]
            arguments[argument.name] = torch.zeros(1, dtype=dtype)
        else:
            arguments[argument.name] = scalars[kind]
    return arguments


@pytest.mark.parametrize("name", sorted(OPS))
def test_raw_overloads_refuse_a_tensor_on_another_device(name):
    """Every overload of every op, a tensor argument on the meta device (which the dispatcher sends to the fake
    implementation): a ValueError naming that argument, not uninitialised memory."""
    for op in _overloads(name):
        arguments = _placeholder_arguments(op)
        tensors = [key for key, value in arguments.items() if isinstance(value, torch.Tensor)]
        for moved in tensors[1:]:
            call = dict(arguments, **{moved: arguments[moved].to("meta")})
            with pytest.raises(ValueError, match=rf"fastlt\.{name}: {moved} is on meta but {tensors[0]} is on cpu"):
                op(*call.values())


@pytest.mark.parametrize("name", sorted(OPS))
def test_raw_overloads_refuse_a_tensor_of_the_wrong_dtype_on_the_meta_device(name):
    """Shape inference (meta tensors, the fake implementation) checks each tensor argument's dtype as the kernels do
    (fastlt.ops._library.TENSOR_DTYPES)."""
    for op in _overloads(name):
        arguments = {key: value.to("meta") if isinstance(value, torch.Tensor) else value
                     for key, value in _placeholder_arguments(op).items()}
        for key, value in arguments.items():
            if isinstance(value, torch.Tensor):
                wrong = torch.float32 if value.dtype != torch.float32 else torch.int32
                with pytest.raises(ValueError, match=rf"fastlt\.{name}: {key} must be"):
                    op(*dict(arguments, **{key: value.to(wrong)}).values())
