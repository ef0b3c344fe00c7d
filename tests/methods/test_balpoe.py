"""BalPoE: the loss against an eager per-expert reference from the formula, its wiring, a few training steps, and
the recipes' official mixup."""

import pytest
import torch
import torch.nn.functional as F
from conftest import DIGITS

from fastlt.engine import read_metrics
from fastlt.engine.mix import Mixup
from fastlt.methods import build_method, load_config, train
from fastlt.methods.balpoe import BalPoELoss, limits_taus
from fastlt.methods.builders import build_model
from fastlt.models import create_model

COUNTS = torch.tensor([500.0, 200, 90, 40, 15, 5])


def eager_balpoe(expert_logits, targets, taus):
    """mean_k CE(z_k + tau_k log pi, y), one expert at a time (the official BSExpertLoss without its 1e-9)."""
    log_prior = (COUNTS / COUNTS.sum()).log().float()
    return sum(F.cross_entropy(z + tau * log_prior, targets) for z, tau in zip(expert_logits, taus)) / len(taus)


@pytest.mark.parametrize("taus", [[0.0, 1.0, 2.0], [-1.0, 1.0, 3.0], [0.0, 0.5, 1.0, 1.5, 2.0]])
def test_loss_and_gradient_match_the_eager_per_expert_reference(taus):
    logits = torch.randn(len(taus), 16, len(COUNTS), requires_grad=True)
    targets = torch.arange(16) % len(COUNTS)
    fused = BalPoELoss(COUNTS, taus)(logits, targets)
    (fused_grad,) = torch.autograd.grad(fused, logits)
    expected = eager_balpoe(logits, targets, taus)
    (expected_grad,) = torch.autograd.grad(expected, logits)
    assert torch.allclose(fused, expected, rtol=1e-5)
    assert torch.allclose(fused_grad, expected_grad, atol=1e-6)


def test_the_training_loss_runs_the_fused_kernel_not_the_eager_reference():
    loss = BalPoELoss(COUNTS, [0.0, 1.0, 2.0])
    logits, targets = torch.randn(3, 8, len(COUNTS)), torch.arange(8) % len(COUNTS)
    with torch.autograd.profiler.profile() as profile:
        loss(logits, targets)
    names = {event.name for event in profile.function_events}
    assert "fastlt::prior_shifted_ce" in names  # one fused call for all experts ...
    assert not any("cross_entropy" in name or "log_softmax" in name for name in names)  # ... no per-expert CE


def test_limits_taus_are_equidistant_and_centred_on_their_mean():
    assert limits_taus(3, 0.0, 2.0) == [0.0, 1.0, 2.0]
    assert limits_taus(1, 0.0, 2.0) == [1.0]
    assert BalPoELoss(COUNTS, limits_taus(7, 0.0, 2.0)).mean_tau == pytest.approx(1.0)
    with pytest.raises(ValueError, match="num_experts"):
        limits_taus(0, 0.0, 2.0)


def test_method_wiring_and_its_errors():
    model = create_model("ride_small_cnn", num_classes=len(COUNTS), num_experts=5)
    method = build_method({"name": "balpoe", "tau_min": 0.0, "tau_max": 2.0}, COUNTS, model)  # 'limits' taus
    output = model(torch.randn(4, 1, 28, 28))
    targets = torch.tensor([0, 1, 2, 5])
    expected = eager_balpoe(output.expert_logits, targets, [0.0, 0.5, 1.0, 1.5, 2.0])
    assert torch.allclose(method.loss_fn(output, targets), expected, rtol=1e-5)
    with pytest.raises(ValueError, match="taus has 3 values but the model has 5 experts"):
        build_method({"name": "balpoe", "taus": [0, 1, 2]}, COUNTS, model)
    with pytest.raises(ValueError, match="multi-expert model"):
        build_method({"name": "balpoe"}, COUNTS, create_model("small_cnn", num_classes=len(COUNTS)))
    with pytest.raises(ValueError, match=r"\[E=3, B, C\]"):
        BalPoELoss(COUNTS, [0.0, 1.0, 2.0])(torch.zeros(2, 4, len(COUNTS)), targets)
    assert "taus=[0.0, 1.0, 2.0]" in repr(BalPoELoss(COUNTS, [0, 1, 2]))


def test_a_few_training_steps_lower_the_loss():
    torch.manual_seed(0)
    model = create_model("ride_small_cnn", num_classes=len(COUNTS), num_experts=3)
    loss_fn = build_method({"name": "balpoe"}, COUNTS, model).loss_fn
    images, targets = torch.randn(24, 1, 28, 28), torch.arange(24) % len(COUNTS)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    losses = []
    for _ in range(8):
        loss = loss_fn(model(images), targets)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0], losses


def test_recipes_hold_the_official_taus_and_mixup_and_build():
    """The official configs (configs/mixup/standard_training/*): mixup on every batch, alpha 0.4 / 0.3 / 0.2."""
    for recipe, taus, alpha in (("mnist_lt_balpoe", [0.0, 1.0, 2.0], None),
                                ("mnist_lt_balpoe_mixup", [0.0, 1.0, 2.0], 0.4),
                                ("cifar100_lt_r100_balpoe", [0.0, 1.0, 2.0], 0.4),
                                ("imagenet_lt_x50_balpoe", [0.0, 1.25, 2.5], 0.3),
                                ("inat18_r50_balpoe", [-1.0, 1.0, 3.0], 0.2)):
        config = load_config(recipe)
        assert config["method"] == {"name": "balpoe", "taus": taus} and config["model"]["num_experts"] == 3, recipe
        assert config["train"].get("mixup") == (None if alpha is None else {"mixup_alpha": alpha}), recipe
    for recipe in ("mnist_lt_balpoe", "cifar100_lt_r100_balpoe"):  # the ImageNet trunks take seconds to build
        config = load_config(recipe)
        model = build_model(config["model"], num_classes=len(COUNTS))
        assert build_method(config["method"], COUNTS, model).name == "balpoe"


def test_training_with_mixup_mixes_every_step_with_the_run_seed(tmp_path, monkeypatch):
    steps = []
    mix = Mixup.__call__

    def recorded(self, images, targets):
        mixed = mix(self, images, targets)
        steps.append((self.seed, self.epoch, mixed is not None))
        return mixed

    monkeypatch.setattr(Mixup, "__call__", recorded)
    quick = DIGITS + ["train.epochs=2", "train.schedule.milestones=[1]", "train.schedule.warmup_epochs=0", "seed=5"]
    summary = train(load_config("mnist_lt_balpoe_mixup", quick + [f"out={tmp_path}"]), progress_bar=False,
                    verbose=False)
    records = read_metrics(str(tmp_path / "metrics.jsonl"))
    assert len(steps) == sum(record["steps"] for record in records) > 0
    assert {(seed, epoch) for seed, epoch, _ in steps} == {(5, 0), (5, 1)} and all(mixed for *_, mixed in steps)
    assert 0 <= summary["stage1"]["overall"] <= 100
    with pytest.raises(ValueError, match="'train.mixup.alpha': did you mean train.mixup.mixup_alpha"):
        load_config("mnist_lt_balpoe", quick + [f"out={tmp_path / 'bad'}", "train.mixup={alpha: 0.4}"])
    with pytest.raises(ValueError, match="mixup_alpha or cutmix_alpha must be > 0"):
        train(load_config("mnist_lt_balpoe", quick + [f"out={tmp_path / 'bad'}", "train.mixup={prob: 0.5}"]))
