"""Exact learning rates of the papers' schedules (docs/methods.md §2.3, §3.4, §3.5, §4.6), against the tables and
against torch's own schedulers stepped the way the official code steps them."""

import math
import warnings

import pytest
import torch

from fastlt.engine.schedules import build_schedule


def lrs(schedule, base_lr, epochs):
    return [base_lr * schedule.factor(epoch) for epoch in epochs]


def torch_lrs(make_scheduler, epochs, step_at_start):
    """The lr each (0-based) epoch trains with under a torch scheduler stepped at epoch start or end."""
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    scheduler = make_scheduler(optimizer)
    values = []
    with warnings.catch_warnings():  # no optimizer.step() here: torch warns about the order, irrelevant to lrs
        warnings.simplefilter("ignore")
        for _ in range(epochs):
            if step_at_start:
                scheduler.step()
            values.append(optimizer.param_groups[0]["lr"])
            if not step_at_start:
                scheduler.step()
    return values


def test_ride_cifar_custom_lr_table():
    # lr 0.1, warmup 5, x0.01 at 160 and 180: 0.1 -> 1e-3 -> 1e-5 (docs/methods.md §3.5)
    schedule = build_schedule("ride_custom", 200, warmup_epochs=5, milestones=(160, 180), gamma=0.01)
    got = lrs(schedule, 0.1, [0, 1, 2, 3, 4, 5, 159, 160, 179, 180, 199])
    expected = [0.02, 0.04, 0.06, 0.08, 0.1, 0.1, 0.1, 1e-3, 1e-3, 1e-5, 1e-5]
    assert got == pytest.approx(expected, rel=1e-12)


def test_ride_custom_lr_matches_the_official_lambda_lr_stepped_at_epoch_end():
    def official_lambda(epoch, step1=60, step2=80, gamma=0.1, warmup=5):  # CustomLR as docs/methods.md §3.5 writes it
        factor = 1 if epoch < step1 else gamma if epoch < step2 else gamma * gamma
        return factor * (epoch + 1) / warmup if epoch < warmup else factor

    reference = torch_lrs(lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, official_lambda), 100, False)
    schedule = build_schedule("ride_custom", 100, warmup_epochs=5, milestones=(60, 80), gamma=0.1)
    assert lrs(schedule, 1.0, range(100)) == pytest.approx(reference, rel=1e-12)
    assert lrs(schedule, 0.1, [59, 60, 80]) == pytest.approx([0.1, 0.01, 0.001], rel=1e-12)


def test_reslt_cifar_schedule_table():
    # warmup 1/3 (1 - f) + f, f = (e + 1)/5: 0.467, 0.6, 0.733, 0.867, 1.0 x lr; then x0.1 at 160 and x0.01 at 180
    schedule = build_schedule("reslt_cifar", 200, warmup_epochs=5, milestones=(160, 180), gamma=0.1)
    warmup = [schedule.factor(epoch) for epoch in range(5)]
    assert [round(value, 3) for value in warmup] == [0.467, 0.6, 0.733, 0.867, 1.0]
    assert lrs(schedule, 0.1, [5, 159, 160, 179, 180, 199]) == pytest.approx([0.1, 0.1, 0.01, 0.01, 0.001, 0.001])


def test_decoupling_cosine_is_stepped_at_epoch_start_and_ends_at_zero():
    reference = torch_lrs(lambda opt: torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=90, eta_min=0), 90, True)
    schedule = build_schedule("decoupling_cosine", 90)
    assert lrs(schedule, 1.0, range(90)) == pytest.approx(reference, abs=1e-12)
    assert 0.2 * schedule.factor(0) == pytest.approx(0.1 * (1 + math.cos(math.pi / 90)))
    assert schedule.factor(89) == pytest.approx(0.0, abs=1e-15)


def test_cosine_stepped_at_epoch_end_as_ride_router_and_reslt_inat():
    reference = torch_lrs(lambda opt: torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=5, eta_min=0), 5, False)
    schedule = build_schedule("cosine", 5)
    assert lrs(schedule, 1.0, range(5)) == pytest.approx(reference, abs=1e-12)
    assert schedule.factor(0) == 1.0


def test_reslt_imagenet_warmup_cosine():
    schedule = build_schedule("warmup_cosine", 180, warmup_epochs=5)
    assert lrs(schedule, 0.1, range(5)) == pytest.approx([0.02, 0.04, 0.06, 0.08, 0.1])
    assert schedule.factor(5) == pytest.approx(0.5 * (1 + math.cos(math.pi / 176)))
    assert schedule.factor(179) == pytest.approx(0.5 * (1 + math.cos(math.pi * 175 / 176)))


def test_apply_scales_every_group_from_its_base_lr():
    backbone, classifier = torch.nn.Parameter(torch.zeros(1)), torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([{"params": [backbone], "lr": 0.01}, {"params": [classifier], "lr": 0.1}], lr=0.1)
    schedule = build_schedule("decoupling_cosine", 10)
    for epoch in (0, 3, 9, 4):  # any order: the lr depends on the epoch only (resume = apply(epoch))
        schedule.apply(optimizer, epoch)
        lrs_now = [group["lr"] for group in optimizer.param_groups]
        assert lrs_now == pytest.approx([0.01 * schedule.factor(epoch), 0.1 * schedule.factor(epoch)])
    assert build_schedule("constant", 3).factor(2) == 1.0
    with pytest.raises(ValueError, match="unknown schedule"):
        build_schedule("linear", 10)
