"""Shapes and exact parameter counts of the 32x32 (CIFAR) and 28x28 (MNIST) models."""

import torch

from fastlt.models import create_model


def parameter_count(module):
    return sum(parameter.numel() for parameter in module.parameters())


def basic_block_params(in_planes, planes):
    """Two bias-free 3x3 convs + two affine BNs; the option-A shortcut has no parameters."""
    return 9 * in_planes * planes + 9 * planes * planes + 2 * 2 * planes


def stage_params(in_planes, planes, blocks=5):
    return basic_block_params(in_planes, planes) + (blocks - 1) * basic_block_params(planes, planes)


STEM = 9 * 3 * 16 + 2 * 16  # conv3x3(3 -> 16) + BN(16) = 464


def test_resnet32_cifar100_parameter_count_and_shapes():
    # 464 stem + 23,360 layer1 + 88,192 layer2 + 351,488 layer3 = 463,504 trunk; + Linear(64, 100) 6,500 = 470,004.
    # (CIFAR-10 head: 464,154, the "0.46M" of the LDAM-DRW table; CIFAR-100: the "0.47M".)
    expected = STEM + stage_params(16, 16) + stage_params(16, 32) + stage_params(32, 64) + 64 * 100 + 100
    assert expected == 470_004
    model = create_model("resnet32", num_classes=100)
    assert parameter_count(model) == expected
    output = model(torch.randn(3, 3, 32, 32))
    assert output.logits.shape == (3, 100) and output.features.shape == (3, 64)


def test_ride_resnet32_three_experts_matches_official_parameter_count():
    # Official RIDE ResNet_s(BasicBlock, [5, 5, 5], num_experts=3, reduce_dimension=True, use_norm=True), §3.1:
    #   shared: stem 464 + layer1 (16 -> 16, 5 blocks) 23,360                                   =  23,824
    #   each expert: layer2 (16 -> 24, 5 blocks) 50,592 + layer3 (24 -> 48, 5 blocks) 197,952
    #                + NormedLinear(48, 100) 4,800 (in*out, no bias)                            = 253,344
    #   total 23,824 + 3 * 253,344                                                              = 783,856
    per_expert = stage_params(16, 24) + stage_params(24, 48) + 48 * 100
    shared = STEM + stage_params(16, 16)
    assert (shared, per_expert) == (23_824, 253_344)
    assert shared + 3 * per_expert == 783_856
    model = create_model("ride_resnet32", num_classes=100, num_experts=3)
    assert parameter_count(model) == 783_856
    for experts in (2, 4):
        assert parameter_count(create_model("ride_resnet32", num_classes=100, num_experts=experts)) == (
            shared + experts * per_expert
        )


def test_ride_resnet32_outputs_mean_of_experts_scaled_cosines():
    torch.manual_seed(0)
    model = create_model("ride_resnet32", num_classes=10, num_experts=3).eval()
    images = torch.randn(4, 3, 32, 32)
    output = model(images)
    assert output.expert_logits.shape == (3, 4, 10) and output.features.shape == (3, 4, 48)
    torch.testing.assert_close(output.logits, output.expert_logits.mean(0))
    assert output.expert_logits.abs().max() <= 30.0 + 1e-4  # 30 x cosine
    shared = model.forward_shared(images)
    features, logits = model.forward_expert(shared, 1)
    torch.testing.assert_close(logits, output.expert_logits[1])
    torch.testing.assert_close(features, output.features[1])


def test_option_a_shortcut_pads_half_the_width_difference_per_side():
    model = create_model("ride_resnet32", num_classes=10)
    first_block = model.experts[0][0][0]  # expert 0, layer2, block 0: 16 -> 24 channels, stride 2
    x = torch.randn(2, 16, 8, 8)
    shortcut = first_block.shortcut(x)
    assert shortcut.shape == (2, 24, 4, 4)
    assert shortcut[:, :4].abs().sum() == 0 and shortcut[:, 20:].abs().sum() == 0
    torch.testing.assert_close(shortcut[:, 4:20], x[:, :, ::2, ::2])


def test_reslt_resnet32_shares_one_linear_and_sums_branches():
    model = create_model("reslt_resnet32", num_classes=100)
    # trunk 463,504 + three BatchNorm2d(64) branches 3 * 128 + one shared Linear(64, 100) 6,500
    assert parameter_count(model) == 463_504 + 3 * 128 + 6_500
    output = model(torch.randn(3, 3, 32, 32))
    assert output.branch_logits.shape == (3, 3, 100) and output.features.shape == (3, 3, 64)
    torch.testing.assert_close(output.logits, output.branch_logits.sum(0))
    expected = output.features @ model.classifier.weight.t() + model.classifier.bias
    torch.testing.assert_close(output.branch_logits, expected)


def test_small_cnn_family_on_28x28_digits():
    images = torch.randn(5, 1, 28, 28)
    plain = create_model("small_cnn", num_classes=10)
    # convs 288 + 18,432 + 73,728, BNs 64 + 128 + 256, Linear(128, 10) 1,290
    assert parameter_count(plain) == 94_186
    assert plain(images).logits.shape == (5, 10)
    ride = create_model("ride_small_cnn", num_classes=10, num_experts=3)
    assert ride(images).expert_logits.shape == (3, 5, 10)
    reslt = create_model("reslt_small_cnn", num_classes=10)
    assert reslt(images).branch_logits.shape == (3, 5, 10)


def test_resnet8_family_on_28x28_grey_images():
    """The Fashion-MNIST-LT models: ResNet-8 (one BasicBlock per stage) with a 1-channel stem, 28 -> 14 -> 7 maps."""
    images = torch.randn(5, 1, 28, 28)
    stem = 9 * 1 * 16 + 2 * 16
    trunk = stem + stage_params(16, 16, 1) + stage_params(16, 32, 1) + stage_params(32, 64, 1)
    plain = create_model("resnet8", num_classes=10, in_channels=1)
    assert parameter_count(plain) == trunk + 64 * 10 + 10 == 75_002
    assert plain.backbone[0](images).shape == (5, 64, 7, 7)
    assert plain(images).logits.shape == (5, 10)
    ride = create_model("ride_resnet8", num_classes=10, num_experts=3, in_channels=1)
    # shared stem + layer1; each expert layer2 (16 -> 24) + layer3 (24 -> 48) + NormedLinear(48, 10)
    per_expert = stage_params(16, 24, 1) + stage_params(24, 48, 1) + 48 * 10
    assert parameter_count(ride) == stem + stage_params(16, 16, 1) + 3 * per_expert == 126_384
    output = ride(images)
    assert output.expert_logits.shape == (3, 5, 10) and output.features.shape == (3, 5, 48)
    assert create_model("ride_resnet8", num_classes=10, num_experts=6, in_channels=1).num_experts == 6
    reslt = create_model("reslt_resnet8", num_classes=10, in_channels=1)
    assert parameter_count(reslt) == trunk + 3 * 128 + 64 * 10 + 10
    assert reslt(images).branch_logits.shape == (3, 5, 10)
