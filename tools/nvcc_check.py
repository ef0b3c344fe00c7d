"""Compile every csrc/cuda/*.cu with nvcc for the given GPU archs (default sm_80 and sm_90), as CI does.

The CUDA kernels cannot run on a machine without a GPU; this proves they compile with the flags setup.py's build uses.
    python tools/nvcc_check.py --archs 80 90 [--jobs 2] [--unless-built] [csrc/cuda/<op>.cu ...]
--unless-built (what `make test` runs, right after its build): when the build record (fastlt/_build_info.json) says
the last build compiled every csrc/cuda/*.cu for every requested arch, after the sources last changed, that build
is the proof, and nothing is compiled twice.
"""

import argparse
import glob
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from build_flags import NVCC_FLAGS  # noqa: E402
from compile_check import ROOT, run_checks  # noqa: E402
from cuda_env import find_cuda_home, nvidia_wheel_dirs  # noqa: E402
TORCH_CXX_STANDARD = "-std=c++20"  # what torch.utils.cpp_extension adds to every nvcc command (it has no constant)


def nvcc_command(source, output, archs, cuda_home):
    """nvcc as torch's BuildExtension runs it for setup.py's build: torch's include paths and COMMON_NVCC_FLAGS,
    -fPIC and the C++ standard it adds, then fastlt's own flags (tools/build_flags.py) and the requested archs."""
    from torch.utils import cpp_extension

    includes = cpp_extension.include_paths(device_type="cuda") + [os.path.join(ROOT, "csrc"),
                                                                  os.path.join(ROOT, "csrc", "include")]
    includes += nvidia_wheel_dirs("include") + [os.path.join(cuda_home, "include")]
    gencode = [f"-gencode=arch=compute_{a},code=sm_{a}" for a in archs]
    return (
        [os.path.join(cuda_home, "bin", "nvcc"), "-c", source, "-o", output]
        + cpp_extension.COMMON_NVCC_FLAGS
        + ["--compiler-options", "-fPIC", TORCH_CXX_STANDARD]
        + NVCC_FLAGS
        + gencode
        + [f"-I{path}" for path in includes]
    )


def build_compiled_everything(archs):
    """Why the last build proves that every csrc/cuda/*.cu compiles for ``archs``, or None when it does not: it built
    CUDA, for every arch, from these very files (the record is newer than each of them)."""
    record_path = os.path.join(ROOT, "fastlt", "_build_info.json")
    sources = sorted(glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.cu")))
    if not sources or not os.path.exists(record_path):
        return None
    with open(record_path) as handle:
        record = json.load(handle)
    flags = set(record.get("cuda_arch_flags") or [])
    built_archs = all(f"-gencode=arch=compute_{arch},code=sm_{arch}" in flags for arch in archs)
    built_sources = sorted(record.get("cuda_sources") or []) == sorted(os.path.basename(s) for s in sources)
    dependencies = sources + glob.glob(os.path.join(ROOT, "csrc", "**", "*.h"), recursive=True) + glob.glob(
        os.path.join(ROOT, "csrc", "**", "*.cuh"), recursive=True) + [os.path.join(ROOT, "tools", "build_flags.py")]
    fresh = os.path.getmtime(record_path) >= max(os.path.getmtime(path) for path in dependencies)
    if not (record.get("with_cuda") and built_archs and built_sources and fresh):
        return None
    return (f"the build of {record.get('built_at', '?')} compiled all {len(sources)} .cu files for "
            f"sm_{', sm_'.join(archs)} with these flags (fastlt/_build_info.json)")


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--archs", nargs="+", default=["80", "90"])
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--unless-built", action="store_true",
                        help="pass without compiling when the last build compiled every .cu for these archs")
    parser.add_argument("sources", nargs="*", help="the .cu files to compile (default: every csrc/cuda/*.cu)")
    args = parser.parse_args()
    # `--archs 80 90 csrc/cuda/x.cu` puts the file among the archs (nargs="+"): take it back as a source
    args.sources += [arch for arch in args.archs if not arch.isdigit()]
    args.archs = [arch for arch in args.archs if arch.isdigit()] or ["80", "90"]
    if args.unless_built and not args.sources:
        proof = build_compiled_everything(args.archs)
        if proof:
            print(f"nvcc-check: {proof}; not compiling them again")
            return
    cuda_home = find_cuda_home()
    if cuda_home is None:
        sys.exit("nvcc-check: no CUDA toolkit found (set CUDA_HOME)")
    os.environ["CUDA_HOME"] = cuda_home  # before torch.utils.cpp_extension guesses it from the nvcc wrapper
    sources = [os.path.abspath(source) for source in args.sources] or sorted(
        glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.cu")))
    if not sources:
        sys.exit("nvcc-check: no .cu files found")
    out_dir = os.path.join(ROOT, "build", "nvcc-check")
    os.makedirs(out_dir, exist_ok=True)

    run_checks("nvcc-check", sources, lambda source: nvcc_command(
        source, os.path.join(out_dir, os.path.basename(source) + ".o"), args.archs, cuda_home), args.jobs,
        f"compiles for sm_{', sm_'.join(args.archs)}")


if __name__ == "__main__":
    main()
