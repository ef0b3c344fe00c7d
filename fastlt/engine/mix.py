"""Mixup and CutMix in the stage-1 training step, with the mixed loss of the official BalPoE code.

For each step, :class:`Mixup` decides whether to mix (probability ``prob``) and how: MixUp (``images * lam +
images[perm] * (1 - lam)``, lam ~ Beta(mixup_alpha, mixup_alpha)) or CutMix (a box of ``images[perm]`` pasted in,
lam ~ Beta(cutmix_alpha, cutmix_alpha), then set to the share of pixels kept). With both alphas > 0, CutMix is
chosen with probability ``switch_prob``. The option names, the box and its lam correction are timm's
(``timm.data.Mixup`` with ``mode="batch"``, ``correct_lam=True``: one lam per batch); the pairing is BalPoE's, a
random permutation of the batch (timm pairs each image with the reversed batch, ``x.flip(0)``).

The loss is the official form (BalPoE ``utils/combiner.py``; the same ``mixup_criterion`` sits unused in ResLT's
CIFAR script): ``lam * L(output, y_a) + (1 - lam) * L(output, y_b)``, the method's own loss called once per label
set (:meth:`MixedBatch.loss`), so every fused op (RIDE, ResLT, the prior-shifted CE of BalPoE / SADE / Balanced
Softmax, the fused heads) computes it as it computes the unmixed loss. For plain and prior-shifted cross-entropy that
equals the cross-entropy of the mixed one-hot targets; the margin (LDAM), DRW-weighted and group-masked (ResLT)
losses are not linear in the target, and the official form is what BalPoE trains with. A loss that also needs the
images (RIDE's distillation) gets the mixed images, as BalPoE's default ``mix_input`` teacher does.

Why not timm's or torchvision's class: neither is a required dependency of fastlt (timm: the ``examples`` extra,
torchvision: ``data``); both return soft targets, which the label-based fused kernels cannot take; timm refuses an
odd batch (fastlt's last batch may be one) and draws from NumPy's global generator.

Randomness: each step's draws come from a NumPy generator seeded with (seed, epoch, step), not from a global
generator, so a run resumed mid-epoch (``set_epoch(epoch, step)``, as the sampler's position) mixes exactly as the
uninterrupted run, and every DDP rank draws the same lam for a step (one lam per global batch, as the official
DataParallel code).

>>> mixup = Mixup(mixup_alpha=0.4, seed=0)
>>> mixup.set_epoch(0)
>>> images, targets = torch.rand(8, 3, 4, 4), torch.arange(8)
>>> mixed = mixup(images, targets)
>>> round(mixed.lam, 4), mixed.images.shape
(0.9911, torch.Size([8, 3, 4, 4]))
>>> torch.allclose(mixed.images, mixed.lam * images + (1 - mixed.lam) * images[mixed.target_b])
True
"""

import math
from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np
import torch

from fastlt.errors import ConfigError
from fastlt.ops import _checks

OPTIONS = ("mixup_alpha", "cutmix_alpha", "prob", "switch_prob")


@dataclass(frozen=True)
class MixedBatch:
    """A mixed batch: ``images`` mix the rows of labels ``target_a`` (weight ``lam``) with those of ``target_b``."""

    images: torch.Tensor
    target_a: torch.Tensor
    target_b: torch.Tensor
    lam: float

    def loss(self, loss_fn: Callable, output, *extra) -> torch.Tensor:
        """``lam * loss_fn(output, y_a, *extra) + (1 - lam) * loss_fn(output, y_b, *extra)``."""
        return (self.lam * loss_fn(output, self.target_a, *extra)
                + (1.0 - self.lam) * loss_fn(output, self.target_b, *extra))


class Mixup:
    """Per-step MixUp / CutMix of ``[B, C, H, W]`` batches (module docstring); ``__call__`` returns a
    :class:`MixedBatch`, or None for a step left unmixed (probability ``1 - prob``)."""

    def __init__(self, mixup_alpha: float = 0.0, cutmix_alpha: float = 0.0, prob: float = 1.0,
                 switch_prob: float = 0.5, seed: int = 0):
        owner = "mixup"
        self.mixup_alpha = _checks.number(owner, "mixup_alpha", mixup_alpha, low=0.0)
        self.cutmix_alpha = _checks.number(owner, "cutmix_alpha", cutmix_alpha, low=0.0)
        if self.mixup_alpha == 0 and self.cutmix_alpha == 0:
            raise ValueError("mixup: mixup_alpha or cutmix_alpha must be > 0 (both are 0: nothing would be mixed; "
                             "leave mixup out to train without it)")
        self.prob = _checks.number(owner, "prob", prob, low=0.0, high=1.0)
        self.switch_prob = _checks.number(owner, "switch_prob", switch_prob, low=0.0, high=1.0)
        if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            raise ValueError(f"mixup: seed must be an integer >= 0, got {seed!r}")
        self.seed = seed
        self.set_epoch(0)

    def set_epoch(self, epoch: int, step: int = 0) -> None:
        """The 0-based epoch and the step the next batch is (> 0 when a run resumes mid-epoch)."""
        self.epoch, self.step = int(epoch), int(step)

    def __call__(self, images: torch.Tensor, targets: torch.Tensor) -> Optional[MixedBatch]:
        if images.dim() != 4:
            raise ValueError(f"mixup: images must be [B, C, H, W], got shape {tuple(images.shape)}")
        rng = np.random.default_rng((self.seed, self.epoch, self.step))
        self.step += 1
        if rng.random() >= self.prob:
            return None
        if self.mixup_alpha > 0 and self.cutmix_alpha > 0:
            use_cutmix = bool(rng.random() < self.switch_prob)
        else:
            use_cutmix = self.cutmix_alpha > 0
        alpha = self.cutmix_alpha if use_cutmix else self.mixup_alpha
        lam = float(rng.beta(alpha, alpha))
        order = torch.from_numpy(rng.permutation(len(images))).to(images.device)
        partners = images.index_select(0, order)  # a copy; on CPU many times faster than images[order]
        if use_cutmix:
            top, bottom, left, right = cutmix_box(images.shape[-2:], lam, rng)
            mixed = images.clone()
            mixed[..., top:bottom, left:right] = partners[..., top:bottom, left:right]
            lam = 1.0 - (bottom - top) * (right - left) / (images.shape[-2] * images.shape[-1])
        else:
            mixed = images.mul(lam).add_(partners.mul_(1.0 - lam))
        if lam == 1.0:  # an empty box: the batch is unchanged
            return None
        return MixedBatch(mixed, targets, targets.index_select(0, order.to(targets.device)), lam)

    def __repr__(self) -> str:
        return (f"Mixup(mixup_alpha={self.mixup_alpha}, cutmix_alpha={self.cutmix_alpha}, prob={self.prob}, "
                f"switch_prob={self.switch_prob}, seed={self.seed})")


def cutmix_box(size, lam: float, rng: np.random.Generator):
    """(top, bottom, left, right) of timm's CutMix box (``rand_bbox``): sides ``int(H * sqrt(1 - lam))`` and
    ``int(W * sqrt(1 - lam))`` around a uniform centre, clipped to the image."""
    height, width = size
    ratio = math.sqrt(1.0 - lam)
    cut_h, cut_w = int(height * ratio), int(width * ratio)
    centre_y, centre_x = int(rng.integers(0, height)), int(rng.integers(0, width))
    top, bottom = max(centre_y - cut_h // 2, 0), min(centre_y + (cut_h + 1) // 2, height)
    left, right = max(centre_x - cut_w // 2, 0), min(centre_x + (cut_w + 1) // 2, width)
    return top, bottom, left, right


def build_mixup(options: dict, seed: int) -> Mixup:
    """A :class:`Mixup` from a recipe's ``train.mixup`` section (keys: ``OPTIONS``)."""
    if not isinstance(options, dict):
        raise ConfigError(f"train.mixup must be a section of {', '.join(OPTIONS)}, got {options!r}")
    unknown = sorted(set(options) - set(OPTIONS))
    if unknown:
        raise ConfigError(f"train.mixup: unknown option(s) {unknown}; expected some of {list(OPTIONS)} (timm's names)")
    try:
        return Mixup(**options, seed=seed)
    except ValueError as error:  # Mixup's own argument checks ("mixup: ..."), which read no data
        raise ConfigError(f"train.{error}") from None
