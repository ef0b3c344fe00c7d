"""Where the CUDA toolkit and torch's CUDA wheels live: used by setup.py, CMakeLists.txt and the nvcc check.

`nvcc` on the PATH may be a wrapper script, so torch's guess of CUDA_HOME from its location can be wrong; and a
slim toolkit lacks headers (cublas_v2.h, ...) and libraries that torch's nvidia-* wheels ship.

    python tools/cuda_env.py --cmake   # prints KEY=VALUE;... hints for find_package(Torch)
"""

import glob
import importlib.util
import os
import re
import shutil
import sys


def find_cuda_home():
    """The CUDA toolkit root (contains bin/nvcc and include/cuda_runtime.h), or None."""
    candidates = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH")]
    nvcc = shutil.which("nvcc")
    if nvcc:
        real = os.path.realpath(nvcc)
        candidates.append(os.path.dirname(os.path.dirname(real)))
        try:
            with open(real, errors="ignore") as handle:
                match = re.search(r"(/\S+)/bin/nvcc", handle.read(4096))
            if match:
                candidates.append(match.group(1))
        except OSError:
            pass
    candidates += ["/usr/local/cuda"] + sorted(glob.glob("/usr/local/cuda-*"), reverse=True)
    for path in candidates:
        if path and os.path.isfile(os.path.join(path, "bin", "nvcc")) and os.path.isfile(
            os.path.join(path, "include", "cuda_runtime.h")
        ):
            return path
    return None


def nvidia_wheel_dirs(kind):
    """Existing ``include`` or ``lib`` folders of the installed nvidia-* wheels (cu13 first)."""
    spec = importlib.util.find_spec("nvidia")
    if spec is None or not spec.submodule_search_locations:
        return []
    found = []
    for base in spec.submodule_search_locations:
        found += sorted(glob.glob(os.path.join(base, "cu*", kind)))
        found += sorted(glob.glob(os.path.join(base, "*", kind)))
    return [path for path in dict.fromkeys(found) if os.path.isdir(path)]


def cmake_hints():
    hints = {}
    cuda_home = find_cuda_home()
    if cuda_home:
        hints["CUDA_TOOLKIT_ROOT_DIR"] = cuda_home
        hints["CUDAToolkit_ROOT"] = cuda_home
    for lib_dir in nvidia_wheel_dirs("lib"):
        runtimes = sorted(glob.glob(os.path.join(lib_dir, "libcudart.so*")))
        if runtimes:
            hints["CUDA_CUDART_LIBRARY"] = runtimes[0]
            hints["CUDA_INCLUDE_DIRS"] = os.path.join(os.path.dirname(lib_dir), "include")
            break
    return hints


if __name__ == "__main__":
    if "--cmake" in sys.argv:
        print(";".join(f"{key}={value}" for key, value in cmake_hints().items()))
    else:
        print(f"CUDA_HOME={find_cuda_home()}")
        print(f"nvidia include dirs={nvidia_wheel_dirs('include')}")
