"""fastlt: fused, exact long-tailed recognition ops, samplers and recipes for PyTorch."""

__version__ = "0.1.0"

from fastlt import ops  # noqa: E402,F401  (registers the torch.library ops)
from fastlt.losses import PriorShiftedCE, ResLTLoss, RIDEDistillLoss, RIDELoss  # noqa: E402
from fastlt.fused_heads import LinearRIDELoss  # noqa: E402

__all__ = ["ops", "RIDELoss", "RIDEDistillLoss", "ResLTLoss", "PriorShiftedCE", "LinearRIDELoss", "__version__"]
