"""Every stage-1 method's loss wiring: the right fused loss, on the right logits, with the right constants and the
DRW switch at the right epoch."""

import pytest
import torch
import torch.nn.functional as F

import fastlt
from fastlt.methods import build_method
from fastlt.models import NormedLinear, create_model

COUNTS = torch.tensor([500.0, 200, 90, 40, 15, 5])


def outputs(model_name, batch=8):
    model = create_model(model_name, num_classes=len(COUNTS))
    targets = torch.arange(batch) % len(COUNTS)
    return model, targets


def test_ce_is_cross_entropy_of_the_logits():
    model, targets = outputs("small_cnn")
    method = build_method({"name": "ce"}, COUNTS, model)
    output = model(torch.randn(8, 1, 28, 28))
    assert torch.allclose(method.loss_fn(output, targets), F.cross_entropy(output.logits, targets))
    assert method.on_epoch_start is None


def test_unknown_method_is_refused():
    with pytest.raises(ValueError, match="unknown method"):
        build_method({"name": "focal"}, COUNTS, create_model("small_cnn", num_classes=6))


def test_ldam_drw_swaps_in_a_cosine_classifier_and_switches_drw_after_drw_epoch():
    model, targets = outputs("small_cnn")
    method = build_method({"name": "ldam_drw", "drw_epoch": 3}, COUNTS, model)
    assert isinstance(model.classifier, NormedLinear) and model.classifier.scale == 30.0
    output = model(torch.randn(8, 1, 28, 28))
    for epoch, drw in ((0, False), (2, False), (3, True)):  # 0-based engine epoch 3 = official epoch 4 > 3
        method.on_epoch_start(epoch)
        expected = fastlt.ops.ride_loss(output.logits[None], targets, COUNTS, diversity_factor=0.0, drw=drw)
        assert torch.allclose(method.loss_fn(output, targets), expected, rtol=1e-5), epoch


def test_balanced_softmax_is_ce_of_prior_shifted_logits():
    model, targets = outputs("small_cnn")
    method = build_method({"name": "balanced_softmax"}, COUNTS, model)
    output = model(torch.randn(8, 1, 28, 28))
    expected = F.cross_entropy(output.logits + (COUNTS / COUNTS.sum()).log().float(), targets)
    assert torch.allclose(method.loss_fn(output, targets), expected, rtol=1e-5)


def test_ride_uses_every_expert_and_the_recipe_constants():
    model, targets = outputs("ride_small_cnn")
    config = {"name": "ride", "diversity_factor": -0.2, "temperature_factor": 0.02, "drw_epoch": 1}
    method = build_method(config, COUNTS, model)
    output = model(torch.randn(8, 1, 28, 28))
    for epoch, drw in ((0, False), (1, True)):
        method.on_epoch_start(epoch)
        expected = fastlt.ops.ride_loss(output.expert_logits, targets, COUNTS, diversity_factor=-0.2,
                                        temperature_factor=0.02, drw=drw)
        assert torch.allclose(method.loss_fn(output, targets), expected, rtol=1e-5), epoch


def test_reslt_masks_branches_by_group_and_mixes_with_beta():
    model, targets = outputs("reslt_small_cnn")
    method = build_method({"name": "reslt", "beta": 0.9}, COUNTS, model)
    output = model(torch.randn(8, 1, 28, 28))
    groups = fastlt.ops.reslt_groups(COUNTS)
    masks = groups[:, targets].float()
    per_branch = torch.stack([F.cross_entropy(z, targets, reduction="none") for z in output.branch_logits])
    individual = (masks * per_branch).sum() / masks.sum()
    expected = 0.9 * individual + 0.1 * F.cross_entropy(output.branch_logits.sum(0), targets)
    assert torch.allclose(method.loss_fn(output, targets), expected, rtol=1e-5)
