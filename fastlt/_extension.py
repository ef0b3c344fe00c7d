"""Loads the compiled extension ``fastlt._C`` if it was built; Triton (CUDA tensors) and the reference take over
otherwise, with one warning that says why and how to build it.

``BUILD_INFO`` is the build record setup.py writes beside the module (torch version, CUDA archs, CPU ISA clones).
The module is loaded only under the torch it was compiled against: another torch's C++ ABI differs, and loading it
fails with an undefined-symbol error or worse.
"""

import importlib.util
import json
import os
import warnings

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


def torch_mismatch(build_info: dict, running_version: str):
    """A message when the record says the module was built against another torch than ``running_version``."""
    built_with = build_info.get("torch")
    if built_with and built_with != running_version:
        return (
            f"fastlt._C was compiled against torch {built_with}, but torch {running_version} is running; a compiled "
            f"extension only works with the torch it was built against. Install torch=={built_with.split('+')[0]} "
            "or rebuild fastlt."
        )
    return None


def _load():
    global _C, AVAILABLE, HAS_CUDA, IMPORT_ERROR, BUILD_INFO
    if importlib.util.find_spec("fastlt._C") is None:
        IMPORT_ERROR = "fastlt was installed without its compiled kernels (fastlt._C is not built)"
    else:
        BUILD_INFO = read_build_info()
        IMPORT_ERROR = torch_mismatch(BUILD_INFO, torch.__version__)
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
