"""fastlt.engine.mix: the MixUp / CutMix draws (timm's box and lam correction, BalPoE's pairing), their seeding by
(seed, epoch, step), and the refusals. The mixed losses of every method: tests/test_mixed_losses.py."""

import numpy as np
import pytest
import torch

from fastlt.engine.mix import MixedBatch, Mixup, build_mixup, cutmix_box


def distinct_rows(batch=6, size=8):
    """Images whose rows are constants 0, 1, ..., B - 1: a pixel tells which row it came from."""
    return torch.arange(batch, dtype=torch.float32).view(batch, 1, 1, 1).expand(batch, 3, size, size).contiguous()


def test_mixup_blends_each_row_with_its_partner():
    images, targets = torch.rand(7, 3, 5, 5), torch.arange(7) * 10  # an odd batch is fine (timm refuses one)
    mixup = Mixup(mixup_alpha=0.4, seed=1)
    mixed = mixup(images, targets)
    order = mixed.target_b // 10
    assert sorted(order.tolist()) == list(range(7))  # a permutation of the batch
    assert torch.equal(mixed.target_a, targets)
    torch.testing.assert_close(mixed.images, mixed.lam * images + (1 - mixed.lam) * images[order], rtol=0, atol=1e-7)
    assert 0.0 < mixed.lam < 1.0


def test_cutmix_pastes_one_box_and_lam_is_the_share_of_pixels_kept():
    images = distinct_rows(batch=6, size=8)
    mixup = Mixup(cutmix_alpha=1.0, seed=2)
    for step in range(20):
        mixup.set_epoch(0, step)
        mixed = mixup(images, torch.arange(6))
        if mixed is None:  # an empty box
            continue
        changed = mixed.images != images  # where a row shows its partner (never itself: the rows differ)
        order = mixed.target_b
        for row in range(6):
            from_partner = mixed.images[row] == order[row].float()
            if order[row] != row:
                assert torch.equal(changed[row], from_partner)
                kept_share = 1 - from_partner[0].float().mean().item()
                assert kept_share == pytest.approx(mixed.lam, abs=1e-12)
        boxes = changed.any(1).any(0)  # every row uses the same box
        rows, cols = boxes.any(1).nonzero().flatten(), boxes.any(0).nonzero().flatten()
        if len(rows):
            assert boxes[rows.min():rows.max() + 1, cols.min():cols.max() + 1].all()


def test_cutmix_box_is_timms(monkeypatch):
    mixup_module = pytest.importorskip("timm.data.mixup")
    for height, width in [(8, 8), (28, 28), (7, 12)]:
        for lam in [0.05, 0.3, 0.5, 0.77, 0.999]:
            for centre_y in range(height):
                centre_x = (3 * centre_y + 1) % width
                centres = iter([centre_y, centre_x])
                monkeypatch.setattr(mixup_module.np.random, "randint", lambda low, high, size=None: next(centres))
                y_low, y_high, x_low, x_high = mixup_module.rand_bbox((3, height, width), lam)

                class Centre:
                    values = iter([centre_y, centre_x])

                    def integers(self, low, high):
                        return next(self.values)

                assert cutmix_box((height, width), lam, Centre()) == (y_low, y_high, x_low, x_high)


def test_draws_are_a_function_of_seed_epoch_and_step():
    images, targets = torch.rand(8, 1, 6, 6), torch.arange(8)

    def draw(seed, epoch, step):
        mixup = Mixup(mixup_alpha=0.4, cutmix_alpha=1.0, prob=0.9, seed=seed)
        mixup.set_epoch(epoch, step)
        mixed = mixup(images, targets)
        return None if mixed is None else (mixed.lam, mixed.target_b.tolist(), mixed.images)

    def same(first, second):
        if first is None or second is None:
            return first is second
        return first[:2] == second[:2] and torch.equal(first[2], second[2])

    assert same(draw(0, 3, 5), draw(0, 3, 5))
    # a resumed run: set_epoch(epoch, step) then the steps follow on
    running = Mixup(mixup_alpha=0.4, cutmix_alpha=1.0, prob=0.9, seed=0)
    running.set_epoch(3, 4)
    running(images, targets)
    following = running(images, targets)
    assert same(None if following is None else (following.lam, following.target_b.tolist(), following.images),
                draw(0, 3, 5))
    assert not same(draw(0, 3, 5), draw(0, 3, 6)) and not same(draw(0, 3, 5), draw(0, 4, 5))
    assert not same(draw(0, 3, 5), draw(1, 3, 5))


def test_prob_switch_prob_and_lam_follow_their_distributions():
    images, targets = torch.rand(2, 1, 16, 16), torch.arange(2)
    mixup = Mixup(mixup_alpha=0.4, cutmix_alpha=1.0, prob=0.6, switch_prob=0.25, seed=0)
    steps, mixed_steps, mixup_lams, cutmix_lams = 4000, 0, [], []
    for _ in range(steps):
        mixed = mixup(images, targets)
        if mixed is not None:
            mixed_steps += 1
            pixels_kept = mixed.lam * 256  # CutMix's lam is a share of the 16 x 16 pixels, MixUp's a Beta draw
            (cutmix_lams if abs(pixels_kept - round(pixels_kept)) < 1e-9 else mixup_lams).append(mixed.lam)
    assert abs(mixed_steps / steps - 0.6) < 0.03
    assert abs(len(cutmix_lams) / mixed_steps - 0.25) < 0.03
    lams = np.array(mixup_lams)  # Beta(0.4, 0.4): mean 1/2, variance 1 / (4 (2 alpha + 1)) = 0.139
    assert abs(lams.mean() - 0.5) < 0.03 and abs(lams.var() - 1 / 7.2) < 0.01


def test_mixed_loss_is_the_official_combination():
    calls = []

    def loss_fn(output, target, *extra):
        calls.append((target.tolist(), extra))
        return output * target.float().sum()

    batch = MixedBatch(torch.zeros(3), torch.tensor([1, 2, 3]), torch.tensor([3, 1, 2]), 0.25)
    assert batch.loss(loss_fn, torch.tensor(2.0), "images").item() == pytest.approx(0.25 * 12 + 0.75 * 12)
    assert calls == [([1, 2, 3], ("images",)), ([3, 1, 2], ("images",))]


def test_channels_last_batches_stay_channels_last():
    images = torch.rand(4, 3, 6, 6).contiguous(memory_format=torch.channels_last)
    for options in (dict(mixup_alpha=0.4), dict(cutmix_alpha=1.0)):
        mixup = Mixup(**options, seed=0)
        mixed = next(m for m in (mixup(images, torch.arange(4)) for _ in range(10)) if m is not None)
        assert mixed.images.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("options, message", [
    (dict(), "mixup_alpha or cutmix_alpha must be > 0"),
    (dict(mixup_alpha=-0.1), "mixup_alpha must be"),
    (dict(cutmix_alpha=float("nan")), "cutmix_alpha must be"),
    (dict(mixup_alpha=0.4, prob=1.5), "prob must be"),
    (dict(mixup_alpha=0.4, switch_prob=-0.5), "switch_prob must be"),
])
def test_bad_options_are_refused_naming_them(options, message):
    with pytest.raises(ValueError, match=message):
        Mixup(**options)


def test_build_mixup_takes_timms_names_only():
    assert repr(build_mixup({"mixup_alpha": 0.4}, seed=3)) == ("Mixup(mixup_alpha=0.4, cutmix_alpha=0.0, prob=1.0, "
                                                               "switch_prob=0.5, seed=3)")
    with pytest.raises(ValueError, match=r"unknown option\(s\) \['alpha'\]"):
        build_mixup({"alpha": 0.4}, seed=0)
    with pytest.raises(ValueError, match="train.mixup must be a section"):
        build_mixup(0.4, seed=0)
    with pytest.raises(ValueError, match="seed must be an integer >= 0"):
        Mixup(mixup_alpha=0.4, seed=-1)
    with pytest.raises(ValueError, match=r"images must be \[B, C, H, W\]"):
        Mixup(mixup_alpha=0.4)(torch.rand(4, 8), torch.arange(4))
