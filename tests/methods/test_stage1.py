"""Every stage-1 method's loss wiring: the right fused loss, on the right logits, with the right constants and the
DRW switch at the right epoch."""

import pytest
import torch
import torch.nn.functional as F
import yaml

import fastlt
from fastlt.engine import save_checkpoint
from fastlt.engine.mix import Mixup
from fastlt.methods import build_method, load_config, ride
from fastlt.methods.ride import load_teacher
from fastlt.models import ModelOutput, NormedLinear, create_model

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


def _teacher_run(folder, num_experts=6):
    """A fastlt run folder holding a (randomly initialised) RIDE teacher: config.yaml + last.pt."""
    teacher = create_model("ride_small_cnn", num_classes=len(COUNTS), num_experts=num_experts)
    config = {"model": {"name": "ride_small_cnn", "num_experts": num_experts}, "method": {"name": "ride"}}
    (folder / "config.yaml").write_text(yaml.safe_dump(config))
    save_checkpoint(str(folder / "last.pt"), model=teacher, epoch=0, step=0)
    return teacher


def test_ride_with_a_teacher_distils_from_its_mean_logits(tmp_path):
    teacher = _teacher_run(tmp_path)
    model, targets = outputs("ride_small_cnn")
    method = build_method({"name": "ride", "teacher": str(tmp_path), "drw_epoch": 1}, COUNTS, model)
    assert method.needs_images and method.name == "ride_distill"
    images = torch.randn(8, 1, 28, 28)
    output = model(images)
    teacher.train()  # the official trainer never puts the teacher in eval mode: batch-statistics BN
    with torch.no_grad():
        teacher_logits = teacher(images).logits
    for epoch, drw in ((0, False), (1, True)):
        method.on_epoch_start(epoch)
        ride = fastlt.ops.ride_loss(output.expert_logits, targets, COUNTS, drw=drw)
        kl = F.kl_div(F.log_softmax(output.logits / 1.5, 1), F.softmax(teacher_logits / 1.5, 1), reduction="batchmean")
        expected = 3 * (ride + 1.5**2 * kl)  # the official code adds both terms once per student expert
        assert torch.allclose(method.loss_fn(output, targets, images), expected, rtol=1e-5), epoch
    # the teacher gets no gradient: only the student's parameters do
    method.loss_fn(output, targets, images).backward()
    assert all(parameter.grad is not None for parameter in model.parameters() if parameter.requires_grad)


def test_a_mixed_step_runs_the_teacher_once_on_the_mixed_images(tmp_path, monkeypatch):
    """Mixup calls the distillation loss once per label set on the same (mixed) images: one teacher pass, and the
    result is the official combination with the teacher's logits of the mixed images."""
    teacher = _teacher_run(tmp_path)
    forwards = []

    def counting_load_teacher(*args, **kwargs):
        loaded = load_teacher(*args, **kwargs)
        loaded.register_forward_hook(lambda module, inputs, result: forwards.append(inputs[0]))
        return loaded

    monkeypatch.setattr(ride, "load_teacher", counting_load_teacher)
    model, targets = outputs("ride_small_cnn")
    method = build_method({"name": "ride", "teacher": str(tmp_path)}, COUNTS, model)
    mixed = Mixup(mixup_alpha=0.4, seed=0)(torch.randn(8, 1, 28, 28), targets)
    output = model(mixed.images)
    teacher.train()
    with torch.no_grad():
        teacher_logits = teacher(mixed.images).logits
    distill = fastlt.RIDEDistillLoss(fastlt.RIDELoss(COUNTS))
    expected = mixed.loss(lambda out, y: distill(out.expert_logits, y, teacher_logits), output)
    torch.testing.assert_close(mixed.loss(method.loss_fn, output, mixed.images), expected, rtol=1e-5, atol=1e-6)
    assert len(forwards) == 1 and forwards[0] is mixed.images


def test_a_teacher_trained_with_a_fused_head_loads(tmp_path):
    """A fused-head run stores fused_head.weight, not classifiers.*: the teacher is rebuilt with its recipe's head."""
    trained = create_model("ride_small_cnn", num_classes=len(COUNTS), num_experts=4)
    build_method({"name": "ride", "fused_head": True}, COUNTS, trained)
    config = {"model": {"name": "ride_small_cnn", "num_experts": 4}, "method": {"name": "ride", "fused_head": True}}
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    save_checkpoint(str(tmp_path / "last.pt"), model=trained, epoch=0, step=0)
    teacher = load_teacher(str(tmp_path), num_classes=len(COUNTS), train_mode=False)
    images = torch.randn(4, 1, 28, 28)
    trained.eval()
    with torch.no_grad():
        torch.testing.assert_close(teacher(images).logits, trained(images).logits)


def test_ride_teacher_must_be_a_run_folder(tmp_path):
    model, _ = outputs("ride_small_cnn")
    with pytest.raises(FileNotFoundError, match="not a fastlt run folder"):
        build_method({"name": "ride", "teacher": str(tmp_path / "missing")}, COUNTS, model)


def test_compiled_ride_step_recompiles_only_at_the_drw_switch():
    """The engine's epoch hook tells the loss the 0-based epoch; forward only sees the DRW on/off bool, so a compiled
    loss over 12 epochs across the switch compiles twice (before and after DRW), not once per epoch."""
    from torch._dynamo.testing import CompileCounter

    torch._dynamo.reset()
    model, targets = outputs("ride_small_cnn")
    method = build_method({"name": "ride", "drw_epoch": 6}, COUNTS, model)
    output = model(torch.randn(8, 1, 28, 28))
    counter = CompileCounter()
    compiled_loss = torch.compile(method.loss_fn, backend=counter)
    for epoch in range(12):
        method.on_epoch_start(epoch)
        expected = fastlt.ops.ride_loss(output.expert_logits, targets, COUNTS, drw=epoch >= 6)
        assert torch.allclose(compiled_loss(output, targets), expected, rtol=1e-5), epoch
    assert counter.frame_count <= 2


def _official_reslt_loss(branch_logits, targets, groups, beta, smoothing, log_eps, fused_log_eps=None):
    """ResLT's training loss written as the official scripts: crossEntropy with a label-smoothed one-hot target,
    -(target * log(softmax + eps)).sum(1), weighted by group membership, one joint normaliser (ImageNet-LT: the same
    for the fused term; CIFAR / iNat, fused_log_eps 0: nn.CrossEntropyLoss on the summed logits)."""
    num_classes = branch_logits.shape[-1]
    target = F.one_hot(targets, num_classes).float()
    target = (1 - smoothing - smoothing / (num_classes - 1)) * target + smoothing / (num_classes - 1)

    def cross_entropy(logits, weight, eps):
        return -(weight * (target * torch.log(torch.softmax(logits, 1) + eps)).sum(1)).sum()

    weights = groups[:, targets].float()
    individual = sum(cross_entropy(z, w, log_eps) for z, w in zip(branch_logits, weights)) / weights.sum()
    if fused_log_eps == 0:
        fused = F.cross_entropy(branch_logits.sum(0), targets, label_smoothing=0.0)
    else:
        fused = cross_entropy(branch_logits.sum(0), weights[0], log_eps) / weights[0].sum()
    return beta * individual + (1 - beta) * fused


@pytest.mark.parametrize("recipe, fused_log_eps", [
    ("cifar100_lt_r100_reslt", 0.0), ("cifar10_lt_r10_reslt", 0.0), ("inat18_r50_reslt", 0.0),
    ("mnist_lt_reslt", 0.0), ("imagenet_lt_x50_reslt", 1e-7), ("imagenet_lt_x50_reslt_ride", 1e-7),
    ("places_lt_r152_reslt", 1e-7)])
def test_reslt_recipes_put_the_epsilon_where_their_official_script_does(recipe, fused_log_eps):
    """CIFAR and iNat scripts: 1e-7 in the branch terms, nn.CrossEntropyLoss for the fused term; ImageNet-LT: 1e-7
    in both (Places-LT follows ImageNet-LT; MNIST-LT the CIFAR protocol)."""
    method_config = {**load_config(recipe)["method"], "cutoffs": None}  # the shot rule on these 6 classes
    num_branches = method_config.get("num_branches", 3)
    method = build_method(method_config, COUNTS, create_model("reslt_small_cnn", num_classes=6))
    branch_logits, targets = torch.randn(num_branches, 8, 6, dtype=torch.float64) * 30, torch.arange(8) % 6
    output = ModelOutput(logits=branch_logits.sum(0), branch_logits=branch_logits)
    groups = fastlt.ops.reslt_groups(COUNTS, num_branches=num_branches)
    expected = _official_reslt_loss(branch_logits, targets, groups, method_config["beta"], 0.0, 1e-7, fused_log_eps)
    other = _official_reslt_loss(branch_logits, targets, groups, method_config["beta"], 0.0, 1e-7,
                                 1e-7 - fused_log_eps)
    torch.testing.assert_close(method.loss_fn(output, targets), expected, rtol=1e-10, atol=0)
    assert (expected - other).abs() > 1e-9  # at logit scale 30 the fused epsilon is visible


def test_reslt_label_smoothing_matches_the_official_smoothed_cross_entropy():
    torch.manual_seed(0)
    method = build_method({"name": "reslt", "beta": 0.99, "label_smoothing": 0.1}, COUNTS,
                          create_model("reslt_small_cnn", num_classes=6))
    branch_logits, targets = torch.randn(3, 8, 6) * 3, torch.randint(0, 6, (8,))
    output = ModelOutput(logits=branch_logits.sum(0), branch_logits=branch_logits)
    expected = _official_reslt_loss(branch_logits, targets, fastlt.ops.reslt_groups(COUNTS), 0.99, 0.1, 1e-7)
    assert torch.allclose(method.loss_fn(output, targets), expected, rtol=1e-5)
    # the ImageNet-LT recipe with label smoothing: the smoothed crossEntropy with 1e-7 in both terms
    smoothed = build_method({**load_config("imagenet_lt_x50_reslt_lsm")["method"], "cutoffs": None}, COUNTS,
                            create_model("reslt_small_cnn", num_classes=6))
    assert torch.allclose(smoothed.loss_fn(output, targets), expected, rtol=1e-5)
    with pytest.raises(ValueError, match="label_smoothing"):
        build_method({"name": "reslt", "label_smoothing": 1.5}, COUNTS, create_model("reslt_small_cnn", num_classes=6))


def test_reslt_on_ride_experts_sums_the_loss_over_experts():
    """RIDE + ResLT (branch_logits [E, 3, B, C]): the official script adds one ResLT loss per expert."""
    method = build_method({"name": "reslt", "beta": 0.99}, COUNTS, create_model("reslt_small_cnn", num_classes=6))
    branch_logits, targets = torch.randn(2, 3, 8, 6) * 3, torch.randint(0, 6, (8,))
    per_expert = [method.loss_fn(ModelOutput(logits=z.sum(0), branch_logits=z), targets) for z in branch_logits]
    output = ModelOutput(logits=branch_logits.sum(1).mean(0), branch_logits=branch_logits)
    assert torch.allclose(method.loss_fn(output, targets), per_expert[0] + per_expert[1])
