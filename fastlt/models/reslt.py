"""ResLT: one shared trunk, three branch views of its last features (head / medium / tail), ONE shared linear
classifier applied to each branch, prediction = sum of branch logits (docs/methods.md §4.2, §4.5)."""

import torch
from torch import nn

from fastlt import ops
from fastlt.models import imagenet_resnet, resnet_cifar, small_cnn
from fastlt.models.base import BatchNorm2d, ModelOutput, global_average_pool
from fastlt.models.registry import register_model

NUM_BRANCHES = 3


def _branch_output(branch_features: torch.Tensor, weight: torch.Tensor, bias, summed_branches: int) -> ModelOutput:
    """branch_features [3, B, D] -> logits of each branch with the shared classifier, and the sum of the first
    `summed_branches` of them (3; the official iNaturalist model predicts with z_H + z_M only)."""
    branch_logits = branch_features @ weight.t()
    if bias is not None:
        branch_logits = branch_logits + bias
    logits = ops.expert_aggregate(branch_logits[:summed_branches], reduce="sum")
    return ModelOutput(logits=logits, features=branch_features, branch_logits=branch_logits)


class ResLTBatchNorm(nn.Module):
    """CIFAR / MNIST ResLT: branch b = GAP(BatchNorm2d_b(trunk(x))) (affine BN, no ReLU after), shared nn.Linear.

    >>> model = reslt_resnet32(num_classes=100)
    >>> model(torch.zeros(2, 3, 32, 32)).branch_logits.shape
    torch.Size([3, 2, 100])
    """

    def __init__(self, trunk: nn.Module, feature_dim: int, num_classes: int):
        super().__init__()
        self.trunk = trunk
        self.branch_norms = nn.ModuleList(BatchNorm2d(feature_dim) for _ in range(NUM_BRANCHES))
        self.classifier = nn.Linear(feature_dim, num_classes)

    def extra_repr(self) -> str:
        return f"num_branches={len(self.branch_norms)}"

    def forward(self, images: torch.Tensor) -> ModelOutput:
        feature_map = self.trunk(images)
        branch_features = torch.stack([global_average_pool(norm(feature_map)) for norm in self.branch_norms])
        return _branch_output(branch_features, self.classifier.weight, self.classifier.bias, NUM_BRANCHES)


class ResLTConv(nn.Module):
    """ImageNet-scale ResLT: a 1x1 conv to 3*D channels (no bias) + BN + ReLU makes the three D-d branches.

    block_order:
      "official"   -- conv block before GAP in training, after GAP in eval (the released X50 / X101 / iNat code,
                      `--after_1x1conv`; the two orders are not numerically equivalent, issue #9);
      "pool_first" -- GAP then conv block in training and eval (the released ResNet-10 script);
      "conv_first" -- conv block then GAP in training and eval (a clean, consistent variant).
    In eval, logits use tau-normalised shared weights W / ||W_row||^test_tau with the bias dropped; test_tau=None
    keeps the trained linear layer (bias included), as the CIFAR code does. summed_branches=2 predicts with
    z_H + z_M, as the official iNaturalist model (its loss then uses two branches too).
    """

    BLOCK_ORDERS = ("official", "pool_first", "conv_first")

    def __init__(self, arch_name: str, num_classes: int, test_tau=None, block_order: str = "official",
                 summed_branches: int = NUM_BRANCHES):
        super().__init__()
        if block_order not in self.BLOCK_ORDERS:
            raise ValueError(f"ResLTConv: block_order must be one of {self.BLOCK_ORDERS}, got {block_order!r}")
        if not 1 <= summed_branches <= NUM_BRANCHES:
            raise ValueError(f"ResLTConv: summed_branches must be 1..{NUM_BRANCHES}, got {summed_branches}")
        self.trunk = imagenet_resnet.ResNetTrunk(arch_name)
        dim = self.trunk.out_channels
        self.branch_block = nn.Sequential(
            nn.Conv2d(dim, NUM_BRANCHES * dim, kernel_size=1, bias=False), BatchNorm2d(NUM_BRANCHES * dim), nn.ReLU()
        )
        imagenet_resnet.init_like_torchvision(self.branch_block)
        self.classifier = nn.Linear(dim, num_classes)
        self.test_tau = test_tau
        self.block_order = block_order
        self.summed_branches = summed_branches

    def extra_repr(self) -> str:
        return (f"num_branches={NUM_BRANCHES}, summed_branches={self.summed_branches}, test_tau={self.test_tau}, "
                f"block_order={self.block_order!r}")

    def conv_before_pool(self) -> bool:
        return self.block_order == "conv_first" or (self.block_order == "official" and self.training)

    def forward(self, images: torch.Tensor) -> ModelOutput:
        feature_map = self.trunk(images)
        if self.conv_before_pool():
            pooled = global_average_pool(self.branch_block(feature_map))
        else:
            pooled = self.branch_block(global_average_pool(feature_map, keepdim=True)).flatten(1)
        batch, dim = pooled.shape[0], self.classifier.in_features
        branch_features = pooled.view(batch, NUM_BRANCHES, dim).transpose(0, 1)  # channel blocks [H | M | T]
        if self.training or self.test_tau is None:
            return _branch_output(branch_features, self.classifier.weight, self.classifier.bias, self.summed_branches)
        weight = ops.tau_normalize(self.classifier.weight, self.test_tau)
        return _branch_output(branch_features, weight, None, self.summed_branches)


class RIDEResLT(nn.Module):
    """ResLT on RIDE's multi-expert ResNeXt (the ResLT README's "RIDE + ResLT", docs/methods.md §4.7): RIDE's shared
    trunk and E reduced-width experts (no cosine classifier, s = 1); each expert gets its own 1x1 branch block (as
    `ResLTConv`) and its own linear classifier shared by its three branches. Expert prediction = sum of its branch
    logits (tau-normalised weights without bias in eval); model prediction = mean over experts.

    forward: ModelOutput(logits [B, C], features [E, 3, B, D], expert_logits [E, B, C] (each expert's branch sum),
    branch_logits [E, 3, B, C]); the ResLT loss is summed over experts, as the official training script.
    """

    def __init__(self, ride: nn.Module, feature_dim: int, num_classes: int, test_tau=0.7,
                 block_order: str = "official"):
        super().__init__()
        if block_order not in ResLTConv.BLOCK_ORDERS:
            raise ValueError(f"RIDEResLT: block_order must be one of {ResLTConv.BLOCK_ORDERS}, got {block_order!r}")
        self.shared, self.experts = ride.shared, ride.experts
        self.branch_blocks = nn.ModuleList(
            nn.Sequential(nn.Conv2d(feature_dim, NUM_BRANCHES * feature_dim, kernel_size=1, bias=False),
                          BatchNorm2d(NUM_BRANCHES * feature_dim), nn.ReLU())
            for _ in self.experts)
        imagenet_resnet.init_like_torchvision(self.branch_blocks)
        self.classifiers = nn.ModuleList(nn.Linear(feature_dim, num_classes) for _ in self.experts)
        self.test_tau, self.block_order = test_tau, block_order

    @property
    def num_experts(self) -> int:
        return len(self.experts)

    def extra_repr(self) -> str:
        return f"num_experts={self.num_experts}, test_tau={self.test_tau}, block_order={self.block_order!r}"

    def forward(self, images: torch.Tensor) -> ModelOutput:
        shared = self.shared(images)
        conv_first = self.block_order == "conv_first" or (self.block_order == "official" and self.training)
        outputs = []
        for expert, block, classifier in zip(self.experts, self.branch_blocks, self.classifiers):
            feature_map = expert(shared)
            if conv_first:
                pooled = global_average_pool(block(feature_map))
            else:
                pooled = block(global_average_pool(feature_map, keepdim=True)).flatten(1)
            branch_features = pooled.view(pooled.shape[0], NUM_BRANCHES, -1).transpose(0, 1)
            if self.training or self.test_tau is None:
                outputs.append(_branch_output(branch_features, classifier.weight, classifier.bias, NUM_BRANCHES))
            else:
                weight = ops.tau_normalize(classifier.weight, self.test_tau)
                outputs.append(_branch_output(branch_features, weight, None, NUM_BRANCHES))
        expert_logits = torch.stack([output.logits for output in outputs])
        return ModelOutput(logits=ops.expert_aggregate(expert_logits, reduce="mean"),
                           features=torch.stack([output.features for output in outputs]),
                           expert_logits=expert_logits,
                           branch_logits=torch.stack([output.branch_logits for output in outputs]))


@register_model
def reslt_resnet32(num_classes: int) -> ResLTBatchNorm:
    """CIFAR ResLT; kaiming_normal_ on the trunk's convs only: the shared linear keeps PyTorch's default init."""
    trunk = resnet_cifar.make_trunk()
    resnet_cifar.kaiming_init_conv_and_linear(trunk)
    return ResLTBatchNorm(trunk, 64, num_classes)


@register_model
def reslt_resnet8(num_classes: int, in_channels: int = 3) -> ResLTBatchNorm:
    """ResLT on ResNet-8 (the Fashion-MNIST-LT model with in_channels=1), initialised as `reslt_resnet32`."""
    trunk = resnet_cifar.make_trunk(num_blocks=(1, 1, 1), in_channels=in_channels)
    resnet_cifar.kaiming_init_conv_and_linear(trunk)
    return ResLTBatchNorm(trunk, 64, num_classes)


@register_model
def reslt_small_cnn(num_classes: int, in_channels: int = 1) -> ResLTBatchNorm:
    return ResLTBatchNorm(small_cnn.make_trunk(in_channels), small_cnn.WIDTHS[-1], num_classes)


# Test-time tau (the papers' gamma) and block order of the released scripts (docs/methods.md §4.6).
@register_model
def reslt_resnet10(num_classes: int, test_tau=0.3, block_order: str = "pool_first") -> ResLTConv:
    return ResLTConv("resnet10", num_classes, test_tau, block_order)


@register_model
def reslt_resnext50_32x4d(num_classes: int, test_tau=0.7, block_order: str = "official") -> ResLTConv:
    return ResLTConv("resnext50_32x4d", num_classes, test_tau, block_order)


@register_model
def reslt_resnext101_32x4d(num_classes: int, test_tau=0.7, block_order: str = "official") -> ResLTConv:
    return ResLTConv("resnext101_32x4d", num_classes, test_tau, block_order)


@register_model
def reslt_resnet50(
    num_classes: int, test_tau=0.3, block_order: str = "official", summed_branches: int = NUM_BRANCHES
) -> ResLTConv:
    """The iNaturalist 2018 model; its recipe sets summed_branches=2 (docs/methods.md §4.3)."""
    return ResLTConv("resnet50", num_classes, test_tau, block_order, summed_branches)


@register_model
def reslt_resnet152(num_classes: int, test_tau=0.7, block_order: str = "official") -> ResLTConv:
    """The Places-LT model (docs/methods.md §4.8). No Places-LT code was released, so the defaults are the ImageNet-LT
    ResNeXt-50 script's, not a published setting. The trunk takes torchvision's ImageNet ResNet-152 weights with
    `model.trunk.load_state_dict(torchvision_state_dict, strict=False)` (only fc.* is left unused)."""
    return ResLTConv("resnet152", num_classes, test_tau, block_order)


@register_model
def reslt_ride_resnext50_32x4d(num_classes: int, num_experts: int = 3, test_tau=0.7,
                               block_order: str = "official") -> RIDEResLT:
    """The ResLT README's RIDE + ResLT ImageNet-LT model: RIDE ResNeXt-50 with reduced experts (1536-d features),
    plain linear classifiers; the official script hard-codes test-time tau (gamma) 0.7."""
    from fastlt.models.ride import ride_resnext50_32x4d

    ride = ride_resnext50_32x4d(num_classes, num_experts=num_experts, reduce_dimension=True, use_norm=False)
    return RIDEResLT(ride, ride.classifiers[0].in_features, num_classes, test_tau, block_order)
