"""A small CNN for 28x28 digits (MNIST-LT): three conv-BN-ReLU blocks (32 / 64 / 128 channels), two 2x2 max-pools,
GAP, linear classifier. About 95k parameters; an epoch of MNIST-LT (n_max 500, ratio 100) takes seconds on 2 cores."""

from typing import Sequence

from torch import nn

from fastlt.models.base import BatchNorm2d, FeatureClassifier, GlobalAveragePool
from fastlt.models.registry import register_model

WIDTHS = (32, 64, 128)


def make_block(in_channels: int, out_channels: int, pool: bool) -> nn.Sequential:
    layers = [nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False), BatchNorm2d(out_channels), nn.ReLU()]
    if pool:
        layers.append(nn.MaxPool2d(2))
    return nn.Sequential(*layers)


def make_later_blocks(in_channels: int, widths: Sequence[int]) -> nn.Sequential:
    """Blocks 2 and 3 (the part RIDE experts own): 14x14 -> 7x7 feature map with widths[-1] channels."""
    return nn.Sequential(make_block(in_channels, widths[0], pool=True), make_block(widths[0], widths[1], pool=False))


def make_trunk(in_channels: int = 1, widths: Sequence[int] = WIDTHS) -> nn.Sequential:
    """The three blocks; returns the [B, widths[-1], 7, 7] feature map for 28x28 inputs."""
    return nn.Sequential(make_block(in_channels, widths[0], pool=True), make_later_blocks(widths[0], widths[1:]))


@register_model
def small_cnn(num_classes: int, in_channels: int = 1) -> FeatureClassifier:
    """The plain small CNN with a linear classifier on its 128-d pooled feature.

    >>> import torch
    >>> small_cnn(num_classes=10)(torch.zeros(2, 1, 28, 28)).logits.shape
    torch.Size([2, 10])
    """
    backbone = nn.Sequential(make_trunk(in_channels), GlobalAveragePool())
    return FeatureClassifier(backbone, nn.Linear(WIDTHS[-1], num_classes))
