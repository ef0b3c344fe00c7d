"""ImageNet-scale RIDE / ResLT / plain trunks: parameter counts from the block formulas, shapes, ResLT test path."""

import pytest
import torch
import torchvision

from fastlt import ops
from fastlt.models import create_model


def parameter_count(module):
    return sum(parameter.numel() for parameter in module.parameters())


def bottleneck_params(in_channels, planes, groups, width_per_group, projection):
    """1x1 -> grouped 3x3 -> 1x1 (x4), three BNs, and a 1x1 conv + BN projection on the first block of a stage."""
    width = int(planes * width_per_group / 64) * groups
    out = 4 * planes
    count = in_channels * width + 9 * width * width // groups + width * out + 2 * (width + width + out)
    return count + (in_channels * out + 2 * out if projection else 0)


def stage_params(in_channels, planes, blocks, groups, width_per_group):
    first = bottleneck_params(in_channels, planes, groups, width_per_group, projection=True)
    return first + (blocks - 1) * bottleneck_params(4 * planes, planes, groups, width_per_group, projection=False)


def test_plain_trunks_match_torchvision():
    for name in ("resnet50", "resnext50_32x4d"):
        ours = create_model(name, num_classes=1000)
        reference = getattr(torchvision.models, name)()
        assert parameter_count(ours) == parameter_count(reference)
        missing, unexpected = ours.backbone[0].load_state_dict(reference.state_dict(), strict=False)
        assert missing == [] and sorted(unexpected) == ["fc.bias", "fc.weight"]


def test_ride_resnext50_parameter_count():
    # shared: torchvision ResNeXt-50 stem + layer1 + layer2; each expert: layer3 (planes 192, 6 blocks) and layer4
    # (planes 384, 3 blocks) with groups 32 x width 4, then NormedLinear(1536, C) with in*out weights.
    classes, experts = 100, 3
    reference = torchvision.models.resnext50_32x4d()
    shared = sum(parameter_count(getattr(reference, name)) for name in ("conv1", "bn1", "layer1", "layer2"))
    per_expert = stage_params(512, 192, 6, 32, 4) + stage_params(768, 384, 3, 32, 4) + 1536 * classes
    model = create_model("ride_resnext50_32x4d", num_classes=classes, num_experts=experts)
    assert parameter_count(model) == shared + experts * per_expert
    output = model(torch.randn(2, 3, 32, 32))
    assert output.expert_logits.shape == (3, 2, classes) and output.features.shape == (3, 2, 1536)


def test_ride_resnet50_and_resnet10_feature_dims():
    model = create_model("ride_resnet50", num_classes=7, num_experts=2)
    assert model(torch.randn(2, 3, 32, 32)).features.shape == (2, 2, 1536)
    model = create_model("ride_resnet10", num_classes=7, num_experts=4, use_norm=False)
    output = model(torch.randn(2, 3, 64, 64))
    assert output.features.shape == (4, 2, 384) and model.scale == 1.0


@pytest.fixture(scope="module")
def reslt_resnet10():
    torch.manual_seed(0)
    return create_model("reslt_resnet10", num_classes=11, test_tau=0.5, block_order="official")


def test_reslt_conv_branches_and_shared_classifier(reslt_resnet10):
    model = reslt_resnet10.train()
    # one 1x1 conv 512 -> 1536 (no bias) + BN(1536), ONE shared Linear(512, 11)
    assert parameter_count(model) == parameter_count(torchvision.models.resnet.ResNet(
        torchvision.models.resnet.BasicBlock, [1, 1, 1, 1], num_classes=11)) + 512 * 1536 + 2 * 1536
    output = model(torch.randn(4, 3, 64, 64))
    assert output.branch_logits.shape == (3, 4, 11) and output.features.shape == (3, 4, 512)
    torch.testing.assert_close(output.logits, output.branch_logits.sum(0))


def test_reslt_conv_eval_uses_tau_normalised_weights_without_bias(reslt_resnet10):
    model = reslt_resnet10.eval()
    images = torch.randn(3, 3, 64, 64)
    with torch.no_grad():
        output = model(images)
        pooled = model.trunk(images).mean(dim=(2, 3), keepdim=True)
        branches = model.branch_block(pooled).flatten(1).view(3, 3, 512).transpose(0, 1)
    weight = ops.tau_normalize(model.classifier.weight, 0.5)
    torch.testing.assert_close(output.branch_logits, branches @ weight.t())
    model.train()


def test_reslt_block_orders():
    torch.manual_seed(0)
    images = torch.randn(2, 3, 32, 32)
    model = create_model("reslt_resnet10", num_classes=5, test_tau=None, block_order="official")
    assert model.train().conv_before_pool() and not model.eval().conv_before_pool()
    model.block_order = "conv_first"
    assert model.eval().conv_before_pool()
    model.block_order = "pool_first"
    assert not model.train().conv_before_pool()
    with pytest.raises(ValueError, match="block_order"):
        create_model("reslt_resnet10", num_classes=5, block_order="sideways")
    assert create_model("reslt_resnext50_32x4d", num_classes=5)(images).features.shape == (3, 2, 2048)


def test_reslt_inat_predicts_with_head_and_medium_branches_only():
    model = create_model("reslt_resnet50", num_classes=5, summed_branches=2).eval()
    output = model(torch.randn(2, 3, 32, 32))
    torch.testing.assert_close(output.logits, output.branch_logits[0] + output.branch_logits[1])
    with pytest.raises(ValueError, match="summed_branches"):
        create_model("reslt_resnet50", num_classes=5, summed_branches=4)


def test_reslt_resnet152_is_torchvision_resnet152_plus_the_branch_block():
    classes = 365  # Places-LT
    torch.manual_seed(0)
    model = create_model("reslt_resnet152", num_classes=classes)
    reference = torchvision.models.resnet152(num_classes=classes)
    dim = reference.fc.in_features
    # one 1x1 conv dim -> 3 dim (no bias) + BN(3 dim); the ONE shared Linear(dim, C) is torchvision's fc in size
    assert parameter_count(model) == parameter_count(reference) + dim * 3 * dim + 2 * 3 * dim
    missing, unexpected = model.trunk.load_state_dict(reference.state_dict(), strict=False)  # an ImageNet init
    assert missing == [] and sorted(unexpected) == ["fc.bias", "fc.weight"]
    assert model.test_tau == 0.7 and model.block_order == "official"
    images = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        for mode in (True, False):  # official order: 1x1 conv before GAP in training, after it in eval
            output = model.train(mode)(images)
            assert output.branch_logits.shape == (3, 1, classes) and output.features.shape == (3, 1, dim)
            torch.testing.assert_close(output.logits, output.branch_logits.sum(0))
