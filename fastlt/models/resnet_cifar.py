"""CIFAR ResNets (He et al. 2016): ResNet-32 for 32x32 inputs as in LDAM-DRW / RIDE / ResLT (BasicBlock [5, 5, 5],
option-A shortcuts, widths 16 / 32 / 64, 0.47M parameters with a 100-class linear classifier), and ResNet-8
(BasicBlock [1, 1, 1]), which also takes 28x28 grey images (Fashion-MNIST-LT)."""

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from fastlt.models.base import BatchNorm2d, FeatureClassifier, GlobalAveragePool
from fastlt.models.registry import register_model


class BasicBlockA(nn.Module):
    """3x3 conv -> BN -> ReLU -> 3x3 conv -> BN, plus a parameter-free "option A" shortcut.

    When the shape changes, the shortcut subsamples by 2 and zero-pads (planes - in_planes) // 2 channels on each
    side. This is RIDE's formula; it equals the usual planes // 4 only when the width doubles (16 -> 24 needs 4 + 4).
    """

    def __init__(self, in_planes: int, planes: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, kernel_size=3, stride=stride, padding=1, bias=False)
        self.bn1 = BatchNorm2d(planes, relu=True)  # conv -> BN -> ReLU, the ReLU fused into the batch norm
        self.conv2 = nn.Conv2d(planes, planes, kernel_size=3, stride=1, padding=1, bias=False)
        self.bn2 = BatchNorm2d(planes)
        self.shortcut_padding = (planes - in_planes) // 2 if (stride != 1 or in_planes != planes) else None

    def extra_repr(self) -> str:
        return f"shortcut_padding={self.shortcut_padding}"

    def shortcut(self, x: torch.Tensor) -> torch.Tensor:
        if self.shortcut_padding is None:
            return x
        pad = self.shortcut_padding
        # x[:, :, ::2, ::2] as a 1x1 pooling window: the slice's backward builds an NCHW gradient whatever the
        # layout (then every later op in a channels_last backward mixes layouts), avg_pool2d's keeps it
        return F.pad(F.avg_pool2d(x, kernel_size=1, stride=2), (0, 0, 0, 0, pad, pad))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.bn1(self.conv1(x))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


def make_stage(in_planes: int, planes: int, num_blocks: int, stride: int) -> nn.Sequential:
    """`num_blocks` BasicBlockA; the first one changes width and stride."""
    blocks = [BasicBlockA(in_planes, planes, stride)]
    blocks += [BasicBlockA(planes, planes, 1) for _ in range(num_blocks - 1)]
    return nn.Sequential(*blocks)


def make_stem(width: int = 16, in_channels: int = 3) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(in_channels, width, kernel_size=3, padding=1, bias=False),
                         BatchNorm2d(width, relu=True))


def make_trunk(widths: Sequence[int] = (16, 32, 64), num_blocks: Sequence[int] = (5, 5, 5),
               in_channels: int = 3) -> nn.Sequential:
    """stem + three stages; returns the post-ReLU feature map [B, widths[-1], 8, 8] for 32x32 inputs, 7x7 for 28x28."""
    layers = [make_stem(widths[0], in_channels)]
    in_planes = widths[0]
    for index, (planes, blocks) in enumerate(zip(widths, num_blocks)):
        layers.append(make_stage(in_planes, planes, blocks, stride=1 if index == 0 else 2))
        in_planes = planes
    return nn.Sequential(*layers)


def kaiming_init_conv_and_linear(module: nn.Module) -> None:
    """LDAM-DRW's `_weights_init`: kaiming_normal_ on every Conv2d and nn.Linear weight (biases keep the default).

    NormedLinear is not an nn.Linear and keeps its own init, as in the official code.
    """
    for submodule in module.modules():
        if isinstance(submodule, (nn.Conv2d, nn.Linear)):
            nn.init.kaiming_normal_(submodule.weight)


def cifar_resnet(num_classes: int, blocks_per_stage: int, widths: Sequence[int] = (16, 32, 64),
                 in_channels: int = 3) -> FeatureClassifier:
    """The 6n+2-layer CIFAR ResNet (n = `blocks_per_stage`) with a linear classifier (bias) on the pooled feature."""
    backbone = nn.Sequential(make_trunk(widths, (blocks_per_stage,) * 3, in_channels), GlobalAveragePool())
    model = FeatureClassifier(backbone, nn.Linear(widths[-1], num_classes))
    kaiming_init_conv_and_linear(model)
    return model


@register_model
def resnet32(num_classes: int, widths: Sequence[int] = (16, 32, 64)) -> FeatureClassifier:
    """ResNet-32 with a linear classifier (bias) on the 64-d pooled feature.

    >>> model = resnet32(num_classes=100)
    >>> model(torch.zeros(2, 3, 32, 32)).logits.shape
    torch.Size([2, 100])
    """
    return cifar_resnet(num_classes, 5, widths)


@register_model
def resnet8(num_classes: int, in_channels: int = 3) -> FeatureClassifier:
    """ResNet-8: one BasicBlock per stage (16 / 32 / 64 channels), 75k parameters with a 10-class head; the
    Fashion-MNIST-LT model with in_channels=1 (28x28 -> 28 / 14 / 7 feature maps).

    >>> resnet8(num_classes=10, in_channels=1)(torch.zeros(2, 1, 28, 28)).logits.shape
    torch.Size([2, 10])
    """
    return cifar_resnet(num_classes, 1, in_channels=in_channels)
