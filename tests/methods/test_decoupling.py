"""Decoupling stage 2: frozen backbone, BN statistics policy, heads, tau picked on val."""

import torch
from torch import nn

from fastlt.engine import RunFolder
from fastlt.methods import decoupling
from fastlt.models import LearnableWeightScaling, create_model


def toy_loader(num=32, classes=4, seed=0):
    generator = torch.Generator().manual_seed(seed)
    images = torch.randn(num, 1, 28, 28, generator=generator)
    labels = torch.arange(num) % classes
    loader = [(images[i: i + 8], labels[i: i + 8]) for i in range(0, num, 8)]
    return loader


def bn_means(model):
    return [module.running_mean.clone() for module in model.modules() if isinstance(module, nn.BatchNorm2d)]


def test_frozen_backbone_trains_only_the_head_and_updates_bn_unless_frozen(tmp_path):
    for freeze_bn in (False, True):
        model = create_model("small_cnn", num_classes=4)
        weights = [p.clone() for p in model.backbone.parameters()]
        means = bn_means(model)
        head = decoupling.crt_head(model)
        decoupling.retrain_classifier(model, head, toy_loader(), epochs=1, lr=0.1, weight_decay=5e-4,
                                      run=RunFolder(str(tmp_path / str(freeze_bn)), progress_bar=False),
                                      steps_per_epoch=4, freeze_bn=freeze_bn)
        assert all(torch.equal(a, b) for a, b in zip(weights, model.backbone.parameters()))
        bn_moved = any(not torch.equal(a, b) for a, b in zip(means, bn_means(model)))
        assert bn_moved != freeze_bn  # official behaviour: statistics keep updating on class-balanced batches
        assert model.classifier is head


def test_crt_head_is_fresh_and_lws_starts_from_the_stage1_logits():
    model = create_model("small_cnn", num_classes=4)
    head = decoupling.crt_head(model)
    assert head.weight.shape == model.classifier.weight.shape and not torch.equal(head.weight, model.classifier.weight)
    lws = decoupling.lws_head(model)
    features = torch.randn(3, 128)
    assert isinstance(lws, LearnableWeightScaling)
    assert torch.allclose(lws(features), model.classifier(features))


def test_tau_is_picked_on_the_validation_split():
    # class 0's weight row is 10x longer: tau 0 predicts class 0 everywhere, tau >= 1 removes the bias
    weight = torch.tensor([[10.0, 0.0], [0.0, 1.0]])
    features = torch.tensor([[1.0, 0.5], [0.2, 1.0], [1.0, 0.1], [0.1, 1.0]])
    targets = torch.tensor([0, 1, 0, 1])
    tau, rows = decoupling.select_tau(features, targets, weight, class_counts=[500, 5], taus=[0.0, 1.0, 2.0])
    assert tau == 1.0 and [row["tau"] for row in rows] == [0.0, 1.0, 2.0]
    assert rows[0]["overall"] == 50.0 and rows[1]["overall"] == 100.0


def test_ncm_predicts_the_nearest_class_mean():
    features = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.1, 0.9]])
    head = decoupling.ncm_head(features, torch.tensor([0, 0, 1, 1]), num_classes=2)
    assert head(features).argmax(1).tolist() == [0, 0, 1, 1]


def test_class_aware_epoch_is_floor_n_over_b():
    assert decoupling.class_aware_steps(115846, 512) == 226
    assert decoupling.class_aware_steps(10, 512) == 1


def test_stage2_refuses_the_wrong_kind_of_model():
    import pytest

    from fastlt.methods import load_config, run_stage2

    config = load_config("mnist_lt_ce", ["stage2.name=router"])
    with pytest.raises(ValueError, match="needs a RIDE"):
        run_stage2(config, create_model("small_cnn", num_classes=4), {}, device=torch.device("cpu"))
    config = load_config("mnist_lt_ride", ["stage2.name=tau"])
    with pytest.raises(ValueError, match="needs a FeatureClassifier"):
        run_stage2(config, create_model("ride_small_cnn", num_classes=4), {}, device=torch.device("cpu"))
