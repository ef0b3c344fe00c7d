"""Classifier heads fused with their long-tailed loss (:func:`fastlt.ops.linear_ride_loss`): for large class counts,
training never holds the [E, B, C] logits; inference still returns them."""

import math
from typing import Optional

import torch
from torch import nn

from fastlt import ops
from fastlt.losses import _counts_buffer
from fastlt.ops.linear_ride_loss import expert_logits


class LinearRIDELoss(nn.Module):
    """RIDE's E cosine classifiers (NormedLinear x ``scale``) and RIDE's loss in one module, a drop-in for
    ``NormedLinear`` heads + :class:`fastlt.RIDELoss`: ``forward(features, target)`` is the loss of the logits
    ``scale * cos(x_k, w_kc)`` computed chunk by chunk (:func:`fastlt.ops.linear_ride_loss`), ``logits(features)``
    the [E, B, C] logits for inference.

    Holds ``weight`` [E, C, D] (one row per class; NormedLinear's is its transpose, [D, C]) and, with
    ``normalize=False``, a ``bias`` [E, C] (RIDE's nn.Linear heads). The DRW schedule is RIDELoss's: ``set_epoch``
    with the 0-based epoch, DRW on for ``epoch >= drw_epoch``. The loss arguments are RIDELoss's, with its ``scale``
    (LDAM's s) named ``margin_scale`` here; ``scale`` is the classifier's.

    >>> head = fastlt.LinearRIDELoss(torch.linspace(500, 5, 1000).floor(), num_experts=3, in_features=16)
    >>> features = torch.randn(3, 8, 16)                 # [E, B, D], one feature row per expert
    >>> head(features, torch.randint(0, 1000, (8,))).backward()
    >>> head.logits(features).shape
    torch.Size([3, 8, 1000])
    """

    def __init__(self, class_counts, num_experts: int, in_features: int, *, normalize: bool = True,
                 scale: float = 30.0, margin_scale: float = 30.0, max_margin: float = 0.5,
                 diversity_factor: float = -0.45, temperature_factor: float = 0.05, base_temperature: float = 1.0,
                 drw_beta: float = 0.9999, drw_epoch: int = 160, chunk_size: Optional[int] = None):
        super().__init__()
        self.register_buffer("class_counts", _counts_buffer(class_counts), persistent=False)
        num_classes = self.class_counts.numel()
        self.normalize, self.scale, self.margin_scale, self.max_margin = normalize, scale, margin_scale, max_margin
        self.diversity_factor, self.temperature_factor = diversity_factor, temperature_factor
        self.base_temperature, self.drw_beta, self.drw_epoch, self.chunk_size = (base_temperature, drw_beta,
                                                                                 drw_epoch, chunk_size)
        self.weight = nn.Parameter(torch.empty(num_experts, num_classes, in_features))
        if normalize:  # NormedLinear's init: uniform(-1, 1), each class's row renormalised to unit norm
            self.weight.data.uniform_(-1, 1).renorm_(2, 1, 1e-5).mul_(1e5)
            self.bias = None
        else:  # nn.Linear's init
            bound = 1 / math.sqrt(in_features)
            self.weight.data.uniform_(-bound, bound)
            self.bias = nn.Parameter(torch.empty(num_experts, num_classes).uniform_(-bound, bound))
        self.set_epoch(0)

    def set_epoch(self, epoch: int) -> None:
        """Set the current 0-based epoch; DRW is on for ``epoch >= drw_epoch``."""
        self.epoch = int(epoch)
        self.drw = self.epoch >= self.drw_epoch

    def forward(self, features: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """The loss of features [E, B, D] (or [B, D] shared by the experts) and labels [B]."""
        return ops.linear_ride_loss(
            features, self.weight, target, self.class_counts, normalize=self.normalize, scale=self.scale,
            bias=self.bias, margin_scale=self.margin_scale, max_margin=self.max_margin,
            diversity_factor=self.diversity_factor, temperature_factor=self.temperature_factor,
            base_temperature=self.base_temperature, drw=self.drw, drw_beta=self.drw_beta,
            chunk_size=self.chunk_size)

    def logits(self, features: torch.Tensor, expert: Optional[int] = None) -> torch.Tensor:
        """[E, B, C] logits of features [E, B, D] or [B, D] (inference: the training loss never forms them);
        with ``expert``: that expert's [B, C] logits of its features [B, D]."""
        if expert is None:
            return expert_logits(features, self.weight, normalize=self.normalize, scale=self.scale, bias=self.bias)
        bias = None if self.bias is None else self.bias[expert:expert + 1]
        return expert_logits(features, self.weight[expert:expert + 1], normalize=self.normalize, scale=self.scale,
                             bias=bias)[0]

    def extra_repr(self) -> str:
        num_experts, num_classes, in_features = self.weight.shape
        return (f"num_experts={num_experts}, num_classes={num_classes}, in_features={in_features}, "
                f"normalize={self.normalize}, scale={self.scale}, margin_scale={self.margin_scale}, "
                f"diversity_factor={self.diversity_factor}, drw_epoch={self.drw_epoch}, epoch={self.epoch}, "
                f"drw={self.drw}")
