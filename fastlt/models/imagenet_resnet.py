"""ImageNet-scale ResNet / ResNeXt trunks built from torchvision's blocks (docs/methods.md §2.1, §3.1, §4.2).

Module names match torchvision's ResNet (conv1, bn1, layer1, ...), so torchvision or Decoupling checkpoints load
into the trunk with `load_state_dict(..., strict=False)` (e.g. Places-LT's ImageNet-pretrained ResNet-152).
"""

from typing import Dict, NamedTuple

import torch
from torch import nn

from fastlt._optional import import_optional
from fastlt.models.base import FeatureClassifier, GlobalAveragePool
from fastlt.models.registry import register_model


def torchvision_resnet():
    """torchvision.models.resnet, imported when an ImageNet-scale model is built (torchvision is optional)."""
    return import_optional("torchvision.models.resnet", "the ImageNet-scale ResNet / ResNeXt models")


class Architecture(NamedTuple):
    block_name: str  # "BasicBlock" or "Bottleneck" of torchvision.models.resnet
    blocks_per_stage: tuple
    groups: int
    width_per_group: int

    @property
    def block(self):
        return getattr(torchvision_resnet(), self.block_name)


ARCHITECTURES: Dict[str, Architecture] = {
    "resnet10": Architecture("BasicBlock", (1, 1, 1, 1), 1, 64),
    "resnet50": Architecture("Bottleneck", (3, 4, 6, 3), 1, 64),
    "resnet152": Architecture("Bottleneck", (3, 8, 36, 3), 1, 64),
    "resnext50_32x4d": Architecture("Bottleneck", (3, 4, 6, 3), 32, 4),
    "resnext101_32x4d": Architecture("Bottleneck", (3, 4, 23, 3), 32, 4),
}


def architecture(name: str) -> Architecture:
    if name not in ARCHITECTURES:
        raise KeyError(f"architecture: unknown ImageNet trunk {name!r}; known: {', '.join(sorted(ARCHITECTURES))}")
    return ARCHITECTURES[name]


def make_stage(arch: Architecture, in_channels: int, planes: int, stride: int, num_blocks: int) -> nn.Sequential:
    """One torchvision ResNet stage (v1.5: stride on the 3x3 conv; 1x1 conv + BN projection shortcut)."""
    out_channels = planes * arch.block.expansion
    downsample = None
    if stride != 1 or in_channels != out_channels:
        downsample = nn.Sequential(
            nn.Conv2d(in_channels, out_channels, kernel_size=1, stride=stride, bias=False), nn.BatchNorm2d(out_channels)
        )
    blocks = [arch.block(in_channels, planes, stride, downsample, arch.groups, arch.width_per_group)]
    blocks += [
        arch.block(out_channels, planes, groups=arch.groups, base_width=arch.width_per_group)
        for _ in range(num_blocks - 1)
    ]
    return nn.Sequential(*blocks)


def init_like_torchvision(module: nn.Module) -> None:
    """conv ~ N(0, sqrt(2 / (k*k*C_out))) (kaiming fan_out), BN weight 1 and bias 0: torchvision's and the papers'."""
    for submodule in module.modules():
        if isinstance(submodule, nn.Conv2d):
            nn.init.kaiming_normal_(submodule.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(submodule, nn.BatchNorm2d):
            nn.init.ones_(submodule.weight)
            nn.init.zeros_(submodule.bias)


class ResNetTrunk(nn.Module):
    """Stem (7x7 conv s2, BN, ReLU, maxpool) and the first `num_stages` stages; returns the last feature map."""

    def __init__(self, arch_name: str, num_stages: int = 4):
        super().__init__()
        arch = architecture(arch_name)
        reference = torchvision_resnet().ResNet(arch.block, list(arch.blocks_per_stage), groups=arch.groups,
                           width_per_group=arch.width_per_group)
        self.conv1, self.bn1 = reference.conv1, reference.bn1
        self.relu, self.maxpool = reference.relu, reference.maxpool
        self.stage_names = [f"layer{index}" for index in range(1, num_stages + 1)]
        for name in self.stage_names:
            setattr(self, name, getattr(reference, name))
        self.arch_name = arch_name
        self.out_channels = 64 * 2 ** (num_stages - 1) * arch.block.expansion

    def extra_repr(self) -> str:
        return f"arch={self.arch_name!r}, num_stages={len(self.stage_names)}, out_channels={self.out_channels}"

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(images))))
        for name in self.stage_names:
            x = getattr(self, name)(x)
        return x


def _register_plain(arch_name: str) -> None:
    def builder(num_classes: int) -> FeatureClassifier:
        trunk = ResNetTrunk(arch_name)
        backbone = nn.Sequential(trunk, GlobalAveragePool())
        return FeatureClassifier(backbone, nn.Linear(trunk.out_channels, num_classes))

    builder.__name__ = arch_name
    builder.__doc__ = f"{arch_name} trunk + GAP + nn.Linear (Decoupling's stage-1 model; FC keeps the default init)."
    register_model(builder)


for _name in ARCHITECTURES:
    _register_plain(_name)
