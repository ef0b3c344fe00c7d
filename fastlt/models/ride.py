"""RIDE: a shared early trunk feeding E experts, each owning the later stages at 3/4 width and a cosine
classifier scaled by s = 30; the prediction is the mean of expert logits (docs/methods.md §3.1)."""

from typing import List, Tuple

import torch
from torch import nn

from fastlt import ops
from fastlt.models import imagenet_resnet, resnet_cifar, small_cnn
from fastlt.models.base import ModelOutput, global_average_pool
from fastlt.models.heads import NormedLinear
from fastlt.models.registry import register_model


class RIDE(nn.Module):
    """shared(x) -> feature map; expert k: stages_k -> GAP -> classifier_k -> x scale.

    forward returns ModelOutput(logits=[B, C] mean over experts, features=[E, B, D], expert_logits=[E, B, C]).
    `forward_shared` and `forward_expert` let a router (stage 2) evaluate experts one at a time.

    >>> model = ride_resnet32(num_classes=100, num_experts=3)
    >>> model(torch.zeros(2, 3, 32, 32)).expert_logits.shape
    torch.Size([3, 2, 100])
    """

    def __init__(self, shared: nn.Module, experts: List[nn.Module], classifiers: List[nn.Module], scale: float):
        super().__init__()
        if len(experts) != len(classifiers):
            raise ValueError(f"RIDE: {len(experts)} experts but {len(classifiers)} classifiers")
        self.shared = shared
        self.experts = nn.ModuleList(experts)
        self.classifiers = nn.ModuleList(classifiers)
        self.scale = scale
        self.fused_head = None

    @property
    def num_experts(self) -> int:
        return len(self.experts)

    def extra_repr(self) -> str:
        return f"num_experts={self.num_experts}, scale={self.scale}"

    def forward_shared(self, images: torch.Tensor) -> torch.Tensor:
        return self.shared(images)

    def use_fused_head(self, head: nn.Module) -> None:
        """Replace the classifiers by `head` (fastlt.LinearRIDELoss, whose loss forms the logits chunk by chunk):
        in training mode forward then returns only the features [E, B, D] (logits None); eval mode, the logits."""
        self.classifiers = None
        self.fused_head = head

    def forward_expert(self, shared_features: torch.Tensor, index: int) -> Tuple[torch.Tensor, torch.Tensor]:
        """(pooled features [B, D], logits [B, C]) of expert `index`."""
        features = global_average_pool(self.experts[index](shared_features))
        if self.fused_head is not None:
            return features, self.fused_head.logits(features, expert=index)
        return features, self.classifiers[index](features) * self.scale

    def forward(self, images: torch.Tensor) -> ModelOutput:
        shared_features = self.forward_shared(images)
        if self.fused_head is not None and self.training:  # the loss reads the features and the head's weights
            features = [global_average_pool(expert(shared_features)) for expert in self.experts]
            return ModelOutput(logits=None, features=torch.stack(features))
        features, logits = zip(*(self.forward_expert(shared_features, index) for index in range(self.num_experts)))
        expert_logits = torch.stack(logits)
        return ModelOutput(
            logits=ops.expert_aggregate(expert_logits, reduce="mean"),
            features=torch.stack(features),
            expert_logits=expert_logits,
        )


def _classifiers(feature_dim: int, num_classes: int, num_experts: int, use_norm: bool) -> Tuple[list, float]:
    """NormedLinear x s = 30 in every RIDE config; plain nn.Linear (bias) with s = 1 when use_norm is off."""
    if use_norm:
        return [NormedLinear(feature_dim, num_classes) for _ in range(num_experts)], 30.0
    return [nn.Linear(feature_dim, num_classes) for _ in range(num_experts)], 1.0


def _ride_cifar(num_classes: int, blocks_per_stage: int, num_experts: int, reduce_dimension: bool, use_norm: bool,
                in_channels: int = 3) -> RIDE:
    """CIFAR RIDE: shared stem + layer1 (16 ch); experts own layer2 / layer3 at 24 / 48 channels (32 / 64 if not
    reduced); kaiming_normal_ on every conv and nn.Linear, as the official `_weights_init`."""
    layer2_width, layer3_width = (24, 48) if reduce_dimension else (32, 64)
    shared = nn.Sequential(resnet_cifar.make_stem(16, in_channels),
                           resnet_cifar.make_stage(16, 16, blocks_per_stage, stride=1))
    experts = [
        nn.Sequential(
            resnet_cifar.make_stage(16, layer2_width, blocks_per_stage, stride=2),
            resnet_cifar.make_stage(layer2_width, layer3_width, blocks_per_stage, stride=2),
        )
        for _ in range(num_experts)
    ]
    classifiers, scale = _classifiers(layer3_width, num_classes, num_experts, use_norm)
    model = RIDE(shared, experts, classifiers, scale)
    resnet_cifar.kaiming_init_conv_and_linear(model)
    return model


@register_model
def ride_resnet32(num_classes: int, num_experts: int = 3, reduce_dimension: bool = True, use_norm: bool = True) -> RIDE:
    """The official CIFAR RIDE ResNet-32 (BasicBlock [5, 5, 5]); see `_ride_cifar`."""
    return _ride_cifar(num_classes, 5, num_experts, reduce_dimension, use_norm)


@register_model
def ride_resnet8(num_classes: int, num_experts: int = 3, reduce_dimension: bool = True, use_norm: bool = True,
                 in_channels: int = 3) -> RIDE:
    """RIDE on ResNet-8 (one block per stage; the Fashion-MNIST-LT model with in_channels=1); see `_ride_cifar`."""
    return _ride_cifar(num_classes, 1, num_experts, reduce_dimension, use_norm, in_channels)


def _ride_imagenet(arch_name: str, num_classes: int, num_experts: int, reduce_dimension: bool, use_norm: bool) -> RIDE:
    """Shared stem + layer1 + layer2 (torchvision modules); experts own layer3 / layer4 at 192 / 384 planes
    (256 / 512 if not reduced), i.e. a 1536-d feature for Bottleneck trunks."""
    arch = imagenet_resnet.architecture(arch_name)
    shared = imagenet_resnet.ResNetTrunk(arch_name, num_stages=2)
    layer3_planes, layer4_planes = (192, 384) if reduce_dimension else (256, 512)
    experts = [
        nn.Sequential(
            imagenet_resnet.make_stage(arch, shared.out_channels, layer3_planes, 2, arch.blocks_per_stage[2]),
            imagenet_resnet.make_stage(
                arch, layer3_planes * arch.block.expansion, layer4_planes, 2, arch.blocks_per_stage[3]
            ),
        )
        for _ in range(num_experts)
    ]
    for expert in experts:
        imagenet_resnet.init_like_torchvision(expert)
    classifiers, scale = _classifiers(layer4_planes * arch.block.expansion, num_classes, num_experts, use_norm)
    return RIDE(shared, experts, classifiers, scale)


@register_model
def ride_resnet10(num_classes: int, num_experts: int = 3, reduce_dimension: bool = True, use_norm: bool = True) -> RIDE:
    return _ride_imagenet("resnet10", num_classes, num_experts, reduce_dimension, use_norm)


@register_model
def ride_resnet50(num_classes: int, num_experts: int = 3, reduce_dimension: bool = True, use_norm: bool = True) -> RIDE:
    return _ride_imagenet("resnet50", num_classes, num_experts, reduce_dimension, use_norm)


@register_model
def ride_resnext50_32x4d(
    num_classes: int, num_experts: int = 3, reduce_dimension: bool = True, use_norm: bool = True
) -> RIDE:
    return _ride_imagenet("resnext50_32x4d", num_classes, num_experts, reduce_dimension, use_norm)


@register_model
def ride_small_cnn(num_classes: int, num_experts: int = 3, in_channels: int = 1, use_norm: bool = True) -> RIDE:
    """MNIST-LT RIDE: the small CNN's first block is shared; each expert owns blocks 2-3 at 3/4 width."""
    widths = [round(width * 3 / 4) for width in small_cnn.WIDTHS[1:]]
    shared = small_cnn.make_block(in_channels, small_cnn.WIDTHS[0], pool=True)
    experts = [small_cnn.make_later_blocks(small_cnn.WIDTHS[0], widths) for _ in range(num_experts)]
    classifiers, scale = _classifiers(widths[-1], num_classes, num_experts, use_norm)
    return RIDE(shared, experts, classifiers, scale)
