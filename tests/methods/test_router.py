"""RIDE's expert-assignment router: targets, loss, routed inference, FLOPs."""

import pytest
import torch
from conftest import DIGITS

from fastlt.methods.router import (ExpertRouter, count_macs, router_targets, routed_forward, routed_macs,
                                   routing_loss, train_router)
from fastlt.models import create_model


def logits_from_predictions(predictions, num_classes=3):
    """[E, B] predicted class per expert -> [E, B, C] logits whose running sums predict exactly that."""
    return torch.nn.functional.one_hot(torch.tensor(predictions), num_classes).float() * 10.0


def test_targets_ask_for_more_experts_only_when_a_larger_ensemble_is_right():
    # sample 0: expert 0 right -> no help wanted; sample 1: 0 wrong, 0+1 right; sample 2: only 0+1+2 right;
    # sample 3: always wrong -> never ask (more experts would not help)
    logits = torch.tensor([[[0, 5.0, 0], [1.0, 0, 0], [1.0, 0, 0], [1.0, 0, 0]],
                           [[0, 0, 0], [0, 3.0, 0], [0, 0.5, 0], [1.0, 0, 0]],
                           [[0, 0, 0], [0, 0, 0], [0, 1.0, 0], [1.0, 0, 0]]])
    targets = torch.tensor([1, 1, 1, 2])
    assert router_targets(logits, targets).tolist() == [[False, True, True, False], [False, False, True, False]]


def test_routing_loss_weights_positives_by_100():
    logits = torch.zeros(2, 4)
    positive = routing_loss(logits, torch.ones(2, 4, dtype=torch.bool))
    negative = routing_loss(logits, torch.zeros(2, 4, dtype=torch.bool))
    assert torch.isclose(positive / negative, torch.tensor(100.0))


def test_router_inputs_are_topk_of_running_mean_and_a_16d_feature_layer():
    router = ExpertRouter(num_experts=4, feature_dim=48, num_classes=100, top_k=30)
    assert len(router.hidden) == 3 and router.hidden[0].out_features == 16
    assert router.predict.in_features == 30 + 16
    out = router(torch.randn(4, 5, 48), torch.randn(4, 5, 100))
    assert out.shape == (3, 5)
    assert ExpertRouter(3, 8, num_classes=10, top_k=30).top_k == 10  # capped at C


def test_routed_inference_threshold_extremes():
    model = create_model("ride_small_cnn", num_classes=10, num_experts=3).eval()
    router = ExpertRouter(3, 96, 10)
    images = torch.randn(6, 1, 28, 28)
    with torch.no_grad():
        full = model(images)
    torch.nn.init.constant_(router.predict.bias, 50.0)  # every router says "go on"
    logits, used = routed_forward(model, router, images)
    assert used.tolist() == [3] * 6 and torch.allclose(logits, full.logits, atol=1e-5)
    torch.nn.init.constant_(router.predict.bias, -50.0)  # every router says "stop"
    logits, used = routed_forward(model, router, images)
    assert used.tolist() == [1] * 6 and torch.allclose(logits, full.expert_logits[0], atol=1e-5)


def test_flops_grow_with_the_experts_used():
    model = create_model("ride_small_cnn", num_classes=10, num_experts=3)
    one = routed_macs(model, (1, 28, 28), torch.ones(10, dtype=torch.long))
    three = routed_macs(model, (1, 28, 28), torch.full((10,), 3))
    assert one["share_per_num_experts"] == {1: 1.0, 2: 0.0, 3: 0.0}
    assert one["mflops_routed"] < three["mflops_routed"] == three["mflops_all_experts"]
    conv = torch.nn.Conv2d(2, 4, 3, padding=1)
    assert count_macs(lambda: conv(torch.zeros(1, 2, 5, 5)), conv) == 4 * 5 * 5 * 2 * 9


def test_train_router_changes_only_the_router():
    from fastlt.methods.builders import build_datasets, build_loader

    model = create_model("ride_small_cnn", num_classes=10, num_experts=3)
    before = {name: value.clone() for name, value in model.state_dict().items()}
    router = ExpertRouter(3, 96, 10)
    router_before = router.predict.weight.clone()
    data = dict(item.split("=", 1) for item in DIGITS)
    data = {key.split(".")[1]: (int(value) if value.isdigit() else value) for key, value in data.items()}
    loader = build_loader(build_datasets(data)["train"], data, 64, train=True)
    history = train_router(model, router, loader, epochs=1)
    assert len(history) == 1 and history[0]["router_loss"] > 0
    assert not torch.equal(router.predict.weight, router_before)
    for name, value in model.state_dict().items():
        assert torch.equal(value, before[name]), name  # weights AND BN statistics untouched


def test_kaiming_init_matches_the_official_cifar_router():
    """The official CIFAR EA ResNet-32 runs kaiming_normal_ over its router Linear layers (std sqrt(2 / fan_in));
    PyTorch's default init (ImageNet EA ResNets) has std 1 / sqrt(3 fan_in)."""
    torch.manual_seed(0)
    kaiming = ExpertRouter(num_experts=4, feature_dim=48, num_classes=100, top_k=30, init="kaiming")
    default = ExpertRouter(num_experts=4, feature_dim=48, num_classes=100, top_k=30)
    hidden = torch.cat([layer.weight.flatten() for layer in kaiming.hidden])
    assert abs(hidden.std().item() / (2 / 48) ** 0.5 - 1) < 0.1
    assert abs(kaiming.predict.weight.std().item() / (2 / 46) ** 0.5 - 1) < 0.35  # 46 weights only
    default_hidden = torch.cat([layer.weight.flatten() for layer in default.hidden])
    assert abs(default_hidden.std().item() / (1 / (3 * 48)) ** 0.5 - 1) < 0.1
    assert "init='kaiming'" in repr(kaiming)
    with pytest.raises(ValueError, match="init"):
        ExpertRouter(num_experts=3, feature_dim=8, num_classes=10, init="xavier")
