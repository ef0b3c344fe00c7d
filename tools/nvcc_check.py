"""Compile every csrc/cuda/*.cu with nvcc for the given GPU archs (default sm_80 and sm_90), as CI does.

The CUDA kernels cannot run on a machine without a GPU; this proves they compile with the flags setup.py's build uses.
    python tools/nvcc_check.py --archs 80 90 [--jobs 2] [csrc/cuda/<op>.cu ...]
"""

import argparse
import concurrent.futures
import glob
import os
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from build_flags import NVCC_FLAGS  # noqa: E402
from cuda_env import find_cuda_home, nvidia_wheel_dirs  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
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


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--archs", nargs="+", default=["80", "90"])
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("sources", nargs="*", help="the .cu files to compile (default: every csrc/cuda/*.cu)")
    args = parser.parse_args()
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

    def compile_one(source):
        output = os.path.join(out_dir, os.path.basename(source) + ".o")
        start = time.time()
        result = subprocess.run(nvcc_command(source, output, args.archs, cuda_home), capture_output=True, text=True)
        return source, result, time.time() - start

    failed = 0
    with concurrent.futures.ThreadPoolExecutor(args.jobs) as pool:
        for source, result, seconds in pool.map(compile_one, sources):
            name = os.path.relpath(source, ROOT)
            if result.returncode == 0:
                print(f"nvcc-check: {name} compiles for sm_{', sm_'.join(args.archs)} ({seconds:.0f} s)", flush=True)
            else:
                failed += 1
                print(f"nvcc-check: {name} FAILED\n{result.stderr[-4000:]}", flush=True)
    print(f"nvcc-check: {len(sources) - failed} passed, {failed} failed")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
