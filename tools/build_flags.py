"""fastlt's own compiler and linker flags, in one place: setup.py builds the extension with them,
tools/nvcc_check.py compiles the CUDA kernels with them, CMakeLists.txt reads the C++ ones
(`python tools/build_flags.py cxx` prints them as a CMake list).

torch's BuildExtension adds its own on top (C++ standard, -fPIC, torch.utils.cpp_extension.COMMON_NVCC_FLAGS, the
GPU arch flags); nvcc_check.py takes those from torch too rather than copying them.
"""

import sys

CXX_FLAGS = ["-O3", "-fopenmp"]  # torch picks the C++ standard it needs
CUDA_DEFINES = ["-DFASTLT_WITH_CUDA"]  # on every translation unit of a CUDA build, C++ and CUDA
# --expt-relaxed-constexpr: device code calls the headers' constexpr host functions (torch's COMMON_NVCC_FLAGS
# carries it too today; fastlt needs it whatever torch passes).
NVCC_FLAGS = ["-O3", *CUDA_DEFINES, "--expt-relaxed-constexpr"]
# Python's CFLAGS compile with -g: the debug info is 95% of the module (20 MB -> 0.7 MB CPU-only, 21.9 -> 1.7 MB with
# CUDA); symbols stay for backtraces.
LINK_FLAGS = ["-fopenmp", "-Wl,--strip-debug"]

FLAG_SETS = {"cxx": CXX_FLAGS, "nvcc": NVCC_FLAGS, "link": LINK_FLAGS}

if __name__ == "__main__":
    if len(sys.argv) != 2 or sys.argv[1] not in FLAG_SETS:
        sys.exit(f"usage: python tools/build_flags.py {{{'|'.join(FLAG_SETS)}}}")
    print(";".join(FLAG_SETS[sys.argv[1]]))
