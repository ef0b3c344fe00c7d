"""What every fastlt model returns, and the plain "backbone -> classifier" model."""

from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn


@dataclass
class ModelOutput:
    """The result of a forward pass.

    logits: [B, C], the prediction (RIDE: mean over experts; ResLT: sum over branches).
    features: what the classifier(s) saw: [B, D], or [E, B, D] with one row block per expert / branch.
    expert_logits: [E, B, C] per-expert logits of a RIDE model, for its loss and router.
    branch_logits: [3, B, C] head / medium / tail branch logits of a ResLT model, for its loss ([E, 3, B, C]: per
        expert, for ResLT on RIDE's experts).

    DDP and torch.compile both accept dataclass outputs, so the trainer calls `model(x)` for every method.
    """

    logits: torch.Tensor
    features: Optional[torch.Tensor] = None
    expert_logits: Optional[torch.Tensor] = None
    branch_logits: Optional[torch.Tensor] = None


class FeatureClassifier(nn.Module):
    """A backbone that maps images to pooled features [B, D], followed by a swappable classifier head.

    Decoupling's stage 2 replaces `classifier` (cRT: a fresh nn.Linear; LWS, tau-norm, NCM: see fastlt.models.heads)
    and keeps the backbone.

    >>> model = FeatureClassifier(nn.Sequential(nn.Flatten(), nn.Linear(12, 4)), nn.Linear(4, 3))
    >>> model(torch.zeros(2, 3, 2, 2)).logits.shape
    torch.Size([2, 3])
    """

    def __init__(self, backbone: nn.Module, classifier: nn.Module):
        super().__init__()
        self.backbone = backbone
        self.classifier = classifier

    def forward_features(self, images: torch.Tensor) -> torch.Tensor:
        return self.backbone(images)

    def forward(self, images: torch.Tensor) -> ModelOutput:
        features = self.backbone(images)
        return ModelOutput(logits=self.classifier(features), features=features)

