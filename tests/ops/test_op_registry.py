"""Every op the C++ sources define has all of its pieces (docs/architecture.md 2 and 4): the public function and its
eager reference in fastlt.ops, the CPU kernel registered at the bottom of its own csrc/cpu/<op>.cpp, the CUDA kernel
registered at the bottom of csrc/cuda/<op>.cu, the Triton kernel in kernels/<op>.py as the op's ``triton`` overload
with the same schema, a test file, a benchmark row and a `fastlt doctor` case (which the CUDA self-check runs)."""

import pathlib
import re

import pytest
import torch
from op_helpers import needs_cpp

import fastlt
from fastlt import _extension, doctor

ROOT = pathlib.Path(__file__).resolve().parents[2]


def defined_ops():
    """{op name: the stem of the csrc/cpu file whose TORCH_LIBRARY_FRAGMENT defines it}, read from the sources."""
    ops = {}
    for source in sorted((ROOT / "csrc" / "cpu").glob("*.cpp")):
        for name in re.findall(r'm\.def\(\s*"(\w+)\(', source.read_text()):
            ops[name] = source.stem
    return ops


OPS = defined_ops()
PUBLIC_OPS = sorted(name for name in OPS if not name.endswith("_backward"))  # a backward belongs to its op


def test_the_sources_define_the_ops_fastlt_exports():
    assert {"expert_aggregate", "tau_normalize", "tau_sweep", "ride_loss", "reslt_loss", "prior_shifted_ce",
            "linear_ride_loss"} <= set(PUBLIC_OPS)
    assert all(OPS[f"{name}_backward"] == name for name in ("expert_aggregate", "tau_normalize"))


@pytest.mark.parametrize("name", PUBLIC_OPS)
def test_op_has_every_piece(name):
    stem = OPS[name]
    assert stem == name, f"{name} is defined in csrc/cpu/{stem}.cpp, not in its own file"
    assert callable(getattr(fastlt.ops, name, None)), f"fastlt.ops.{name} is not exported"
    assert callable(getattr(fastlt.ops, f"{name}_reference", None)), f"fastlt.ops.{name}_reference is not exported"
    assert (ROOT / "fastlt" / "ops" / f"{name}.py").is_file()
    assert (ROOT / "kernels" / f"{name}.py").is_file(), f"no Triton kernel kernels/{name}.py"
    cuda_source = ROOT / "csrc" / "cuda" / f"{name}.cu"
    assert cuda_source.is_file(), f"no CUDA kernel csrc/cuda/{name}.cu"
    assert f'm.impl("{name}"' in cuda_source.read_text(), f"csrc/cuda/{name}.cu does not register {name}"
    assert (ROOT / "tests" / "ops" / f"test_{name}.py").is_file(), f"no tests/ops/test_{name}.py"
    benchmarks = "\n".join(path.read_text() for path in (ROOT / "bench").glob("*.py"))
    assert re.search(rf"\bops\.{name}\b", benchmarks), f"no benchmark row calls fastlt.ops.{name} (bench/*.py)"
    assert name in doctor.CASES, f"fastlt doctor (and the CUDA self-check) has no case for {name}"


@pytest.mark.parametrize("name", sorted(OPS))
def test_triton_overload_takes_the_compiled_ops_arguments(name):
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
    assert torch._C._dispatch_has_kernel_for_dispatch_key(f"fastlt::{name}", "CUDA") == _extension.HAS_CUDA
