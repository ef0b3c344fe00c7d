"""SADE: the three experts' losses against an eager reference from the formulas, the test-time aggregation on a
constructed case, and `fastlt train` + `fastlt stage2 sade` + `fastlt eval` end to end on Digits-LT."""

import json
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import fastlt
from conftest import DIGITS
from op_helpers import backend, needs_cpp, needs_cuda

from fastlt.cli import main
from fastlt.data.base import ArrayDataset
from fastlt.methods import build_method, load_config, sade
from fastlt.methods.builders import data_options
from fastlt.methods.options import ConfigError, parse
from fastlt.methods.stage2 import Stage2Context
from fastlt.methods.sade import (SADELoss, adapt_expert_weights, aggregate, reversed_prior, sade_logit_shifts,
                                 stops_adapting)
from fastlt.models import create_model

COUNTS = torch.tensor([40.0, 500, 15, 200, 5, 90])  # unsorted on purpose: pi_bar goes by rank, not by position


def eager_sade(expert_logits, targets, tau):
    """The official DiverseExpertLoss (without its 1e-9): CE(z1) + CE(z2 + log pi) + CE(z3 + log pi - tau log pi_bar),
    pi_bar[j] = the prior of the class whose frequency rank mirrors j's."""
    prior = COUNTS / COUNTS.sum()
    order = prior.argsort()
    mirrored = torch.empty_like(prior)
    mirrored[order] = prior[order.flip(0)]
    forward, uniform, backward = expert_logits
    return (F.cross_entropy(forward, targets) + F.cross_entropy(uniform + prior.log(), targets)
            + F.cross_entropy(backward + prior.log() - tau * mirrored.log(), targets))


def test_reversed_prior_gives_each_class_the_prior_of_its_mirrored_rank():
    prior = COUNTS.double() / COUNTS.sum()
    mirrored = reversed_prior(prior)
    assert mirrored[1] == prior[4] and mirrored[4] == prior[1]  # most frequent <-> rarest
    assert mirrored[0] == prior[5] and mirrored[3] == prior[2]
    assert torch.equal(mirrored.sort().values, prior.sort().values)


def test_on_an_exponential_profile_the_backward_shift_is_three_log_prior():
    counts = 500 * 0.01 ** (torch.arange(10, dtype=torch.float64) / 9)  # MNIST-LT's / CIFAR-LT's profile
    shifts = sade_logit_shifts(counts, tau=2.0)
    log_prior = (counts / counts.sum()).log()
    difference = shifts[2] - 3 * log_prior  # pi_bar is proportional to 1 / pi: a constant a softmax ignores
    assert torch.allclose(difference, difference[0].expand(10), atol=1e-9)
    assert torch.equal(shifts[0], torch.zeros(10)) and torch.allclose(shifts[1], log_prior)


@pytest.mark.parametrize("tau", [2.0, 1.0])
def test_loss_and_gradient_match_the_eager_reference(tau):
    logits = torch.randn(3, 16, len(COUNTS), requires_grad=True)
    targets = torch.arange(16) % len(COUNTS)
    fused = SADELoss(COUNTS, tau=tau)(logits, targets)
    (fused_grad,) = torch.autograd.grad(fused, logits)
    expected = eager_sade(logits, targets, tau)
    (expected_grad,) = torch.autograd.grad(expected, logits)
    assert torch.allclose(fused, expected, rtol=1e-5)
    assert torch.allclose(fused_grad, expected_grad, atol=1e-6)


@pytest.mark.parametrize("name", [pytest.param("cpp", marks=needs_cpp), "triton", "reference"])
def test_every_backend_matches_the_eager_reference(name):
    logits = torch.randn(3, 5, 1100, dtype=torch.float64, requires_grad=True)  # 1100 > one 1024-class block
    targets = torch.tensor([0, 3, 1099, 512, 7])
    counts = torch.linspace(1000, 2, 1100)
    shifts = sade_logit_shifts(counts)
    with backend(name):
        fused = fastlt.ops.shifted_ce(logits, targets, shifts)
        (fused_grad,) = torch.autograd.grad(fused, logits)
    expected = sum(F.cross_entropy(z + shift, targets) for z, shift in zip(logits, shifts))
    (expected_grad,) = torch.autograd.grad(expected, logits)
    assert torch.allclose(fused, expected, rtol=1e-10) and torch.allclose(fused_grad, expected_grad, atol=1e-12)


@pytest.mark.gpu
@needs_cuda
def test_cuda_loss_matches_the_eager_reference():
    logits = torch.randn(3, 64, 1000, device="cuda", requires_grad=True)
    targets = torch.randint(0, 1000, (64,), device="cuda")
    counts = torch.linspace(1280, 5, 1000)
    loss = SADELoss(counts).cuda()
    fused = loss(logits, targets)
    (fused_grad,) = torch.autograd.grad(fused, logits)
    expected = sum(F.cross_entropy(z + shift, targets) for z, shift in zip(logits, loss.logit_shifts.float()))
    (expected_grad,) = torch.autograd.grad(expected, logits)
    assert torch.allclose(fused, expected, rtol=1e-5) and torch.allclose(fused_grad, expected_grad, atol=1e-6)


def test_the_three_expert_losses_are_one_fused_call():
    loss = SADELoss(COUNTS)
    logits, targets = torch.randn(3, 8, len(COUNTS)), torch.arange(8) % len(COUNTS)
    with torch.autograd.profiler.profile() as profile:
        loss(logits, targets)
    names = [event.name for event in profile.function_events]
    assert names.count("fastlt::prior_shifted_ce") == 1
    assert not any("cross_entropy" in name or "log_softmax" in name for name in names)


def test_bad_inputs_are_refused_with_the_argument_named():
    targets = torch.arange(4) % len(COUNTS)
    with pytest.raises(ValueError, match=r"expert_logits must be \[3, B, C\]"):
        SADELoss(COUNTS)(torch.zeros(2, 4, len(COUNTS)), targets)
    with pytest.raises(ValueError, match="logit_shifts must be"):
        fastlt.ops.shifted_ce(torch.zeros(3, 4, len(COUNTS)), targets, torch.zeros(3, 5))
    with pytest.raises(ValueError, match="target must be in"):
        fastlt.ops.shifted_ce(torch.zeros(3, 4, len(COUNTS)), targets + 6, torch.zeros(3, len(COUNTS)))
    with pytest.raises(ValueError, match="3-expert model"):
        build_method({"name": "sade"}, COUNTS, create_model("ride_small_cnn", num_classes=6, num_experts=4))
    assert "tau=2.0" in repr(SADELoss(COUNTS))


def test_method_wiring_uses_the_model_expert_logits():
    model = create_model("ride_small_cnn", num_classes=len(COUNTS), num_experts=3)
    method = build_method({"name": "sade", "tau": 1.0}, COUNTS, model)
    output = model(torch.randn(4, 1, 28, 28))
    targets = torch.tensor([0, 1, 2, 5])
    assert torch.allclose(method.loss_fn(output, targets), eager_sade(output.expert_logits, targets, 1.0), rtol=1e-5)


def test_aggregation_weights_move_toward_the_stable_expert():
    """Expert 0 predicts the same class for both views of an image; experts 1 and 2 flip between two classes, so
    prediction stability is maximised by weighting expert 0 up."""
    torch.manual_seed(0)
    batches, batch, classes = 6, 32, 5
    stable = torch.randn(batches, batch, classes) * 3
    flip_a, flip_b = torch.randn(batches, batch, classes) * 3, torch.randn(batches, batch, classes) * 3
    # "images" are [B, E, C] expert logits here; the frozen model is the identity on them
    view_a = [(torch.stack([s, fa, fa], 1), None) for s, fa in zip(stable, flip_a)]
    view_b = [(torch.stack([s, fb, fb], 1), None) for s, fb in zip(stable, flip_b)]
    weights, history = adapt_expert_weights(lambda images: images.transpose(0, 1), (view_a, view_b), epochs=5,
                                            lr=0.1)
    assert weights[0] > 0.5 and weights[0] > weights[1] and weights[0] > weights[2], weights
    assert torch.isclose(weights.sum(), torch.tensor(1.0))
    assert history[-1]["stability"] > history[0]["stability"]
    # the aggregation is the softmax-weighted sum of the expert logits
    logits = torch.randn(3, 4, classes)
    expected = sum(w * z for w, z in zip(weights, logits))
    assert torch.allclose(aggregate(logits, weights.log()), expected, atol=1e-6)


def official_adaptation(views, epochs, lr):
    """The official test_training_*.py loop, transcribed: SGD on a 3-vector from 1/3, minus the mean cosine
    similarity of the two views' aggregated softmax predictions, and after each epoch the stop on the weights
    rounded to two decimals. Returns (weights, epochs run)."""
    raw = torch.nn.Parameter(torch.full((3,), 1 / 3))
    optimizer = torch.optim.SGD([raw], lr=lr, momentum=0.9, weight_decay=5e-4, nesterov=True)
    cosine = torch.nn.CosineSimilarity(dim=1, eps=1e-6)
    epochs_run = 0
    while epochs_run < epochs:
        epochs_run += 1
        for (view_a, _), (view_b, _) in zip(*views):
            weights = F.softmax(raw, dim=0)
            outputs = [sum(weights[k] * view[:, k] for k in range(3)) for view in (view_a, view_b)]
            loss = -cosine(F.softmax(outputs[0], dim=1), F.softmax(outputs[1], dim=1)).mean()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        record = np.round(F.softmax(raw, dim=0).detach().numpy(), decimals=2)
        if record[0] < 0.05 or record[1] < 0.05 or record[2] < 0.05:
            break
    return F.softmax(raw, dim=0).detach(), epochs_run


def test_adaptation_stops_as_the_official_loop_on_weights_rounded_to_two_decimals():
    """Here the flipping experts' weight is 0.048 after epoch 1: rounded, 0.05, so the official loop goes on (a
    stop on the unrounded weight would end there), and stops after epoch 2 at 0.016."""
    generator = torch.Generator().manual_seed(0)
    stable = torch.randn(6, 32, 5, generator=generator) * 3
    flip_a, flip_b = (torch.randn(6, 32, 5, generator=generator) * 3 for _ in range(2))
    views = ([(torch.stack([s, f, f], 1), None) for s, f in zip(stable, flip_a)],
             [(torch.stack([s, f, f], 1), None) for s, f in zip(stable, flip_b)])
    weights, history = adapt_expert_weights(lambda images: images.transpose(0, 1), views, epochs=30, lr=0.15)
    smallest = [min(record["weights"]) for record in history]
    assert 0.045 <= smallest[1] < 0.05 and len(history) == 3  # the premise: epoch 1 ends between 0.045 and 0.05
    official_weights, official_epochs = official_adaptation(views, epochs=30, lr=0.15)
    assert official_epochs == len(history)
    torch.testing.assert_close(weights, official_weights, atol=1e-6, rtol=0)
    assert not stops_adapting(torch.tensor(history[1]["weights"])) and stops_adapting(weights)


class RedSquares(ArrayDataset):
    """32 x 32 RGB images of one saturated colour, two classes, no normalisation: a grey pixel is a greyed image."""

    def __init__(self, size=128):
        self.images = np.zeros((size, 32, 32, 3), dtype=np.uint8)
        self.images[..., 0], self.images[..., 1:] = 200, 40
        self.targets = np.arange(size) % 2
        self.num_classes, self.train_class_counts = 2, np.bincount(self.targets)
        self.normalization = ((0.0, 0.0, 0.0), (1.0, 1.0, 1.0))


@pytest.mark.parametrize("views", [None, "cifar"])
def test_stage2_adapts_on_the_official_strong_views(views):
    """The two view loaders apply the official CIFAR view (RandomGrayscale 0.2 among others), not the training
    augmentation (which never greys an image), even with the recipe's rotation."""
    data = data_options({"name": "mnist_lt", "loader": "dali", "num_workers": 0, "augment_options": {"rotation": 15}})
    options = parse(sade.SADEAdaptOptions, {"name": "sade", "batch_size": 128, "views": views}, "stage2")
    model = create_model("ride_small_cnn", num_classes=2, num_experts=3, in_channels=3)
    stage = Stage2Context(model, {"test": RedSquares()}, data, seed=0, device=torch.device("cpu"), run=None,
                          plain_loaders={})
    for loader in sade.view_loaders(options, stage):
        images, _ = next(iter(loader))
        greyed = ((images[:, 0] - images[:, 1]).abs().amax((1, 2)) < 1e-6).float().mean()
        assert 0.08 < greyed < 0.35, greyed
    with pytest.raises(ConfigError, match="stage2.views must be one of cifar, imagenet, inaturalist or null"):
        parse(sade.SADEAdaptOptions, {"name": "sade", "views": "cifar10"}, "stage2")


def test_sade_recipes_name_their_official_views():
    for recipe, views in (("mnist_lt_sade", "cifar"), ("cifar100_lt_r100_sade", "cifar"),
                          ("imagenet_lt_x50_sade", "imagenet"), ("inat18_r50_sade", "inaturalist")):
        assert load_config(recipe)["stage2"]["views"] == views, recipe


def test_train_then_stage2_sade_then_eval_on_digits(tmp_path, capsys):
    run = str(tmp_path / "sade")
    quick = DIGITS + ["train.epochs=1", "train.schedule.milestones=[1]", "train.schedule.warmup_epochs=0"]
    main(["train", "--config", "mnist_lt_sade", *quick, "stage2.epochs=1", f"out={run}", "--no-progress"])
    with open(os.path.join(run, "stage2_sade", "stage2.json")) as handle:
        chosen = json.load(handle)
    assert chosen["adapted_on"] == "test" and len(chosen["weights"]) == 3
    assert sum(chosen["weights"]) == pytest.approx(1.0)
    assert "learned on unlabeled test images" in capsys.readouterr().out
    # the stage2 command on the finished run, then eval reproduces the stage-2 test figure
    main(["stage2", "sade", run, "stage2.epochs=1", "stage2.batch_size=64", "--no-progress"])
    with open(os.path.join(run, "stage2_sade", "results.json")) as handle:
        overall = json.load(handle)["overall"]
    capsys.readouterr()
    main(["eval", "--run", os.path.join(run, "stage2_sade")])
    assert f"{overall:.1f}" in capsys.readouterr().out
