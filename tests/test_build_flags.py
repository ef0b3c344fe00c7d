"""One source of compiler flags: tools/build_flags.py, read by setup.py, tools/nvcc_check.py and CMakeLists.txt;
the CUDA compile check takes torch's own nvcc flags and include paths from torch.utils.cpp_extension."""

import json
import os
import pathlib
import subprocess
import sys
import time

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))

import build_flags  # noqa: E402
import nvcc_check  # noqa: E402


def test_nvcc_check_compiles_with_torchs_flags_and_include_paths_then_fastlts(tmp_path):
    from torch.utils import cpp_extension

    command = nvcc_check.nvcc_command("kernel.cu", str(tmp_path / "kernel.o"), ["80", "90"], str(tmp_path))
    torch_flags = cpp_extension.COMMON_NVCC_FLAGS
    start = command.index(torch_flags[0])
    assert command[start:start + len(torch_flags)] == torch_flags
    fastlt_start = command.index(build_flags.NVCC_FLAGS[0], start + len(torch_flags))
    assert command[fastlt_start:fastlt_start + len(build_flags.NVCC_FLAGS)] == build_flags.NVCC_FLAGS
    includes = [flag[2:] for flag in command if flag.startswith("-I")]
    assert all(path in includes for path in cpp_extension.include_paths(device_type="cuda"))
    assert {"-gencode=arch=compute_80,code=sm_80", "-gencode=arch=compute_90,code=sm_90"} <= set(command)


@pytest.mark.parametrize("flag_set", sorted(build_flags.FLAG_SETS))
def test_build_flags_prints_each_set_as_a_cmake_list(flag_set):
    result = subprocess.run([sys.executable, str(ROOT / "tools" / "build_flags.py"), flag_set], capture_output=True,
                            text=True, check=True)
    assert result.stdout.strip().split(";") == build_flags.FLAG_SETS[flag_set]


def test_build_flags_refuses_an_unknown_set():
    result = subprocess.run([sys.executable, str(ROOT / "tools" / "build_flags.py"), "fortran"], capture_output=True,
                            text=True)
    assert result.returncode != 0 and "usage" in result.stderr


def test_setup_py_and_cmake_take_their_flags_from_build_flags():
    setup_source = (ROOT / "setup.py").read_text()
    assert "from build_flags import" in setup_source
    for flag in build_flags.CXX_FLAGS + build_flags.NVCC_FLAGS + build_flags.LINK_FLAGS:
        assert f'"{flag}"' not in setup_source, f"setup.py spells {flag} itself"
    cmake = (ROOT / "CMakeLists.txt").read_text()
    assert "tools/build_flags.py cxx" in cmake and "PRIVATE ${FASTLT_CXX_FLAGS}" in cmake


def _fake_tree(root, record):
    """A source tree with two .cu files, a header, tools/build_flags.py and the build record ``record``."""
    for path in ("csrc/cuda/a.cu", "csrc/cuda/b.cu", "csrc/include/x.h", "tools/build_flags.py"):
        (root / path).parent.mkdir(parents=True, exist_ok=True)
        (root / path).write_text("")
    (root / "fastlt").mkdir()
    (root / "fastlt" / "_build_info.json").write_text(json.dumps(record))
    os.utime(root / "fastlt" / "_build_info.json", (time.time() + 10, time.time() + 10))


BUILT = dict(with_cuda=True, cuda_sources=["a.cu", "b.cu"], built_at="then",
             cuda_arch_flags=["-gencode=arch=compute_80,code=sm_80", "-gencode=arch=compute_90,code=sm_90"])


@pytest.mark.parametrize("change, proves", [
    ({}, True),
    (dict(with_cuda=False), False),
    (dict(cuda_sources=["a.cu"]), False),  # a .cu the build did not compile
    (dict(cuda_arch_flags=["-gencode=arch=compute_80,code=sm_80"]), False),  # no sm_90
    (dict(cuda_arch_flags=None), False),
])
def test_nvcc_check_takes_the_build_as_proof_only_when_it_compiled_everything(tmp_path, monkeypatch, change,
                                                                              proves):
    _fake_tree(tmp_path, dict(BUILT, **change))
    monkeypatch.setattr(nvcc_check, "ROOT", str(tmp_path))
    proof = nvcc_check.build_compiled_everything(["80", "90"])
    assert (proof is not None) == proves
    if proves:
        assert "compiled all 2 .cu files for sm_80, sm_90" in proof


@pytest.mark.parametrize("edited", ["csrc/cuda/b.cu", "csrc/include/x.h", "tools/build_flags.py"])
def test_nvcc_check_compiles_again_after_a_source_changes(tmp_path, monkeypatch, edited):
    _fake_tree(tmp_path, BUILT)
    monkeypatch.setattr(nvcc_check, "ROOT", str(tmp_path))
    assert nvcc_check.build_compiled_everything(["80", "90"]) is not None
    os.utime(tmp_path / edited, (time.time() + 20, time.time() + 20))  # edited after the build
    assert nvcc_check.build_compiled_everything(["80", "90"]) is None
    assert nvcc_check.build_compiled_everything(["80"]) is None
    (tmp_path / "fastlt" / "_build_info.json").unlink()
    assert nvcc_check.build_compiled_everything(["80"]) is None
