"""Loads the compiled extension ``fastlt._C`` if it was built; the reference path takes over otherwise."""

import warnings

try:
    from fastlt import _C  # noqa: F401  (loading it registers the fastlt:: C++ ops)

    AVAILABLE = True
    HAS_CUDA = bool(_C.built_with_cuda())
    IMPORT_ERROR = None
except ImportError as error:  # not built (e.g. a plain source checkout): eager reference ops only
    _C = None
    AVAILABLE = False
    HAS_CUDA = False
    IMPORT_ERROR = error
    warnings.warn(
        f"fastlt: the compiled extension fastlt._C is not available ({error}); using the eager PyTorch reference "
        "ops. Build it with `pip install --no-build-isolation -e .`.",
        RuntimeWarning,
        stacklevel=2,
    )
