"""What every fastlt model returns, the plain "backbone -> classifier" model, the global average pool, and the batch
norm the CIFAR-size models use."""

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from fastlt.ops import batch_norm_channels_last
from fastlt.ops.batch_norm_channels_last import uses_kernel as _batch_norm_uses_kernel


def global_average_pool(feature_map: torch.Tensor, keepdim: bool = False) -> torch.Tensor:
    """[B, C, H, W] -> [B, C] ([B, C, 1, 1] with keepdim): the mean over H x W, as one F.avg_pool2d window (the
    official CIFAR ResNets' form). Not `mean(dim=(2, 3))`: its backward hands back an NCHW gradient whatever the
    layout, and in a channels_last model every backward op after it then mixes layouts (strided loops, tens of
    times slower than matched ones); avg_pool2d's backward keeps the layout.

    >>> global_average_pool(torch.arange(8.0).view(1, 2, 2, 2))
    tensor([[1.5000, 5.5000]])
    """
    pooled = F.avg_pool2d(feature_map, feature_map.shape[-2:])
    return pooled if keepdim else pooled.flatten(1)


class GlobalAveragePool(nn.Module):
    """`global_average_pool` as a module, for nn.Sequential backbones: [B, C, H, W] -> [B, C]."""

    def forward(self, feature_map: torch.Tensor) -> torch.Tensor:
        return global_average_pool(feature_map)

    def extra_repr(self) -> str:
        return "[B, C, H, W] -> [B, C], avg_pool2d over H x W"


class BatchNorm2d(nn.BatchNorm2d):
    """nn.BatchNorm2d (same parameters, buffers, state_dict and results), followed by a ReLU with ``relu=True``,
    whose training step on a channels_last CPU batch (fp32, or bf16 under autocast) runs
    fastlt.ops.batch_norm_channels_last: torch's CPU kernel runs the channels past the last full vector scalar, 3-4x
    slower per element at the RIDE experts' 24 channels, and the fused ReLU saves its own pass each way. Evaluation,
    CUDA, fp16 and NCHW batches run nn.BatchNorm2d's own forward (then F.relu).

    >>> bn = BatchNorm2d(24, relu=True)
    >>> bn(torch.randn(8, 24, 4, 4).to(memory_format=torch.channels_last)).min() >= 0
    tensor(True)
    """

    def __init__(self, num_features: int, *args, relu: bool = False, **kwargs):
        super().__init__(num_features, *args, **kwargs)
        self.relu = relu

    def extra_repr(self) -> str:
        return super().extra_repr() + (", relu=True" if self.relu else "")

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if not (self.training and self.affine and self.track_running_stats and _batch_norm_uses_kernel(input)):
            output = super().forward(input)
            return F.relu(output) if self.relu else output
        self._check_input_dim(input)
        # nn.BatchNorm2d's running statistics: an exponential average with factor `momentum`, or the cumulative
        # average when momentum is None
        self.num_batches_tracked.add_(1)
        factor = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
        output, mean, _, unbiased_var = batch_norm_channels_last(input, self.weight, self.bias, self.eps, self.relu)
        with torch.no_grad():
            self.running_mean.lerp_(mean, factor)
            self.running_var.lerp_(unbiased_var, factor)
        return output


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

