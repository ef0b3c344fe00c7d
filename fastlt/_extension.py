"""Loads the compiled extension ``fastlt._C`` if it was built; Triton (CUDA tensors) and the reference take over
otherwise, with one warning that says why and how to build it (or which torch to install).

``BUILD_INFO`` is the build record setup.py writes beside the module (torch version, CUDA archs, CPU ISA clones).
The module is loaded only under a torch it can work with (`torch_mismatch`): another torch's C++ ABI differs, and
loading it fails with an undefined-symbol error or worse.
"""

import importlib.util
import json
import os
import warnings
from typing import Optional

import torch

BUILD_INFO_FILE = "_build_info.json"
HOW_TO_BUILD = (
    "To compile them against the installed torch: `pip install --no-build-isolation -v .` in a fastlt source folder "
    "(or `make build` in a checkout)."
)

_C = None
AVAILABLE = False
HAS_CUDA = False
IMPORT_ERROR = None
BUILD_INFO = {}


def read_build_info(package_dir=os.path.dirname(os.path.abspath(__file__))) -> dict:
    """The build record of the compiled module in ``package_dir`` ({} when there is none)."""
    try:
        with open(os.path.join(package_dir, BUILD_INFO_FILE)) as handle:
            return json.load(handle)
    except (OSError, ValueError):
        return {}


def torch_mismatch(build_info: dict, running_version: str, running_cuda: Optional[str]) -> Optional[str]:
    """A message saying which torch to install when the compiled module cannot work with the running torch
    (``running_version`` = ``torch.__version__``, ``running_cuda`` = ``torch.version.cuda``), else None.

    What has to match is what the module links against: the torch version (its C++ ABI) and, when the module holds
    CUDA kernels, a CUDA build of torch for the same CUDA major version (its CUDA libraries). The rest of the local
    label does not matter: a CPU-only module built against 2.14.1+cu130 runs under 2.14.1+cpu. The wheel requires
    ``torch==<version>`` (setup.py), which is the part pip can check: PyPI's CUDA torch and the CPU build of one
    version carry the same version number.
    """
    built_with = build_info.get("torch")
    if not built_with:
        return None  # no build record: nothing to compare
    version = built_with.split("+")[0]
    build_cuda = build_info.get("torch_cuda") if build_info.get("with_cuda") else None
    version_matches = running_version.split("+")[0] == version
    cuda_matches = build_cuda is None or (running_cuda or "").split(".")[0] == build_cuda.split(".")[0]
    if version_matches and cuda_matches:
        return None
    if build_cuda:
        needed = f"torch {version} built for CUDA {build_cuda.split('.')[0]}"
        install = (f"pip install torch=={version} --index-url https://download.pytorch.org/whl/"
                   f"cu{build_cuda.replace('.', '')}")
    else:
        needed, install = f"torch {version}", f"pip install torch=={version}"
    running = f"torch {running_version} ({f'CUDA {running_cuda}' if running_cuda else 'no CUDA'})"
    return (f"fastlt._C was compiled against torch {built_with}{' with CUDA kernels' if build_cuda else ''} and needs "
            f"{needed}, but {running} is running: `{install}`, or rebuild fastlt against the installed torch")


def _load():
    global _C, AVAILABLE, HAS_CUDA, IMPORT_ERROR, BUILD_INFO
    if importlib.util.find_spec("fastlt._C") is None:
        IMPORT_ERROR = "fastlt was installed without its compiled kernels (fastlt._C is not built)"
    else:
        BUILD_INFO = read_build_info()
        IMPORT_ERROR = torch_mismatch(BUILD_INFO, torch.__version__, torch.version.cuda)
        if IMPORT_ERROR is None:
            try:
                from fastlt import _C as module  # loading it registers the fastlt:: C++ ops
            except ImportError as error:  # e.g. a missing CUDA runtime library
                IMPORT_ERROR = f"fastlt._C failed to load: {error}"
            else:
                _C, AVAILABLE, HAS_CUDA = module, True, bool(module.built_with_cuda())
    if not AVAILABLE:
        warnings.warn(
            f"fastlt: no compiled kernels ({IMPORT_ERROR}); fastlt's ops run on the Triton kernels for CUDA "
            f"tensors and on the eager PyTorch reference otherwise. {HOW_TO_BUILD}",
            RuntimeWarning,
            stacklevel=3,
        )


_load()
