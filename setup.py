"""Builds fastlt and its compiled extension fastlt._C.

CPU kernels (OpenMP) are always built. CUDA kernels are built when torch is a CUDA build and a CUDA toolkit is
found; FASTLT_BUILD_CUDA=1 forces them (error if impossible), FASTLT_BUILD_CUDA=0 skips them. FASTLT_SKIP_EXTENSION=1
installs the pure-Python package (reference ops + Triton). Install with `pip install --no-build-isolation -e .`
so pip does not fetch a second torch into an isolated build environment.
"""

import glob
import os
import sys

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(ROOT, "tools"))
from cuda_env import find_cuda_home, nvidia_wheel_dirs  # noqa: E402


def log(message):
    print(f"[fastlt setup] {message}", flush=True)


def extension_modules():
    if os.environ.get("FASTLT_SKIP_EXTENSION") == "1":
        log("FASTLT_SKIP_EXTENSION=1: no compiled extension (reference + Triton ops only)")
        return [], {}
    want_cuda = os.environ.get("FASTLT_BUILD_CUDA")
    cuda_home = find_cuda_home() if want_cuda != "0" else None
    if cuda_home:
        os.environ["CUDA_HOME"] = cuda_home  # must be set before torch.utils.cpp_extension is imported
    import torch
    from torch.utils import cpp_extension

    build_cuda = want_cuda != "0" and torch.version.cuda is not None and cuda_home is not None
    if want_cuda == "1" and not build_cuda:
        raise RuntimeError(
            f"FASTLT_BUILD_CUDA=1 but CUDA cannot be built (torch.version.cuda={torch.version.cuda}, "
            f"CUDA toolkit={cuda_home})"
        )
    if want_cuda is None and not build_cuda:
        log(f"CUDA kernels skipped (torch.version.cuda={torch.version.cuda}, toolkit={cuda_home})")
    sources = ["csrc/bindings.cpp", "csrc/python_module.cpp"] + sorted(glob.glob("csrc/cpu/*.cpp"))
    include_dirs = [os.path.join(ROOT, "csrc"), os.path.join(ROOT, "csrc", "include")]
    cxx_flags = ["-O3", "-fopenmp"]  # torch picks the C++ standard it needs
    extra = {"cxx": cxx_flags}
    if build_cuda:
        if not os.environ.get("TORCH_CUDA_ARCH_LIST") and not torch.cuda.is_available():
            # No GPU to ask: Ampere (runs on Hopper too). `make nvcc-check` separately compiles every kernel for sm_90.
            os.environ["TORCH_CUDA_ARCH_LIST"] = "8.0"
        sources += sorted(glob.glob("csrc/cuda/*.cu"))
        include_dirs += nvidia_wheel_dirs("include")
        extra["cxx"] = cxx_flags + ["-DFASTLT_WITH_CUDA"]
        extra["nvcc"] = ["-O3", "-DFASTLT_WITH_CUDA", "--expt-relaxed-constexpr"]
        log(f"building CPU + CUDA kernels (CUDA_HOME={cuda_home}, archs={os.environ['TORCH_CUDA_ARCH_LIST']})")
        extension = cpp_extension.CUDAExtension
    else:
        log("building CPU kernels")
        extension = cpp_extension.CppExtension
    os.environ.setdefault("MAX_JOBS", "2")
    module = extension(
        name="fastlt._C",
        sources=sources,
        include_dirs=include_dirs,
        extra_compile_args=extra,
        extra_link_args=["-fopenmp"],
    )
    return [module], {"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = extension_modules()

setup(
    name="fastlt",
    version="0.1.0",
    description="Fused, exact long-tailed visual recognition for PyTorch (RIDE, ResLT, Decoupling)",
    long_description=open(os.path.join(ROOT, "README.md")).read() if os.path.exists("README.md") else "",
    long_description_content_type="text/markdown",
    python_requires=">=3.9",
    packages=find_packages(include=["fastlt", "fastlt.*"]) + ["fastlt.kernels", "fastlt.bench"],
    package_dir={"fastlt.kernels": "kernels", "fastlt.bench": "bench"},
    package_data={"fastlt": ["configs/*.yaml"]},
    install_requires=["torch>=2.4", "numpy>=1.24", "numba>=0.59", "tqdm>=4.60", "pyyaml>=6", "matplotlib>=3.7"],
    extras_require={
        "dali": ["nvidia-dali-cuda130>=2.4"],
        "data": ["pillow>=10", "torchvision>=0.19", "scikit-learn>=1.4"],  # JPEG torch loader, Digits-LT
        "examples": ["lightning>=2.4", "transformers>=4.46", "accelerate>=1.0", "timm>=1.0", "torchvision>=0.19"],
        "dev": ["pytest>=8", "pytest-benchmark>=5", "scikit-learn>=1.4", "pillow>=10", "ninja>=1.11"],
    },
    entry_points={"console_scripts": ["fastlt=fastlt.cli:main"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    zip_safe=False,
)
