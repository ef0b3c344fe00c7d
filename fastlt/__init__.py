"""fastlt: fused, exact long-tailed recognition ops, samplers and recipes for PyTorch.

``import fastlt`` is light (it imports no torch, so that ``fastlt --help`` answers at once); ``fastlt.ops``, the
loss modules below, or any submodule are imported on first use. Importing ``fastlt.ops`` registers the
``torch.ops.fastlt`` ops.
"""

import importlib

__version__ = "0.1.0"

# public name -> the module that defines it, imported on first access (PEP 562)
_LAZY = {
    "ops": "fastlt.ops",
    "RIDELoss": "fastlt.losses",
    "RIDEDistillLoss": "fastlt.losses",
    "ResLTLoss": "fastlt.losses",
    "PriorShiftedCE": "fastlt.losses",
    "LinearRIDELoss": "fastlt.fused_heads",
}

__all__ = ["ops", "RIDELoss", "RIDEDistillLoss", "ResLTLoss", "PriorShiftedCE", "LinearRIDELoss", "__version__"]


def __getattr__(name):
    if name not in _LAZY:
        raise AttributeError(f"module 'fastlt' has no attribute {name!r}")
    module = importlib.import_module(_LAZY[name])
    value = module if module.__name__ == f"fastlt.{name}" else getattr(module, name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(_LAZY))
