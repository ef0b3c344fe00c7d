"""Per-epoch learning-rate schedules of the three papers, each as a pure function of the 0-based epoch index.

`schedule.factor(epoch)` is the multiplier of the base lr for the whole of training epoch `epoch` (0, 1, ...);
each class folds in its paper's stepping convention (end-of-epoch LambdaLR, start-of-epoch cosine, ...), so
`schedule.apply(optimizer, epoch)` at the start of every epoch reproduces the official lr sequence. A schedule has
no state beyond its constructor arguments: resuming at epoch k is `apply(optimizer, k)`.

>>> schedule = build_schedule("ride_custom", total_epochs=200, warmup_epochs=5, milestones=(160, 180), gamma=0.01)
>>> [round(0.1 * schedule.factor(epoch), 8) for epoch in (0, 4, 159, 160, 180)]
[0.02, 0.1, 0.1, 0.001, 1e-05]
"""

import abc
import functools
import math
from typing import Sequence

import torch


class EpochSchedule(abc.ABC):
    """Base class: subclasses define factor(epoch)."""

    def __init__(self, total_epochs: int):
        self.total_epochs = total_epochs

    @abc.abstractmethod
    def factor(self, epoch: int) -> float:
        """The multiplier of the base learning rate at ``epoch`` (0-based)."""

    def apply(self, optimizer: torch.optim.Optimizer, epoch: int) -> float:
        """Sets every group's lr to its base lr x factor(epoch); the base lr is kept in group["initial_lr"]."""
        factor = self.factor(epoch)
        for group in optimizer.param_groups:
            group.setdefault("initial_lr", group["lr"])
            group["lr"] = group["initial_lr"] * factor
        return factor

    def state_dict(self) -> dict:
        return {"name": type(self).__name__, **vars(self)}


class WarmupMultiStepLR(EpochSchedule):
    """gamma^(number of milestones <= epoch), times a linear warmup over the first `warmup_epochs`:
    start + (1 - start) * (epoch + 1) / warmup_epochs.

    RIDE's CustomLR (LambdaLR stepped at epoch end, so epoch e uses lambda(e)) is warmup_start_factor = 0: lr/5,
    2lr/5, ... The ResLT CIFAR schedule warms up from a third: 1/3 (1 - f) + f with f = (e + 1)/5.
    """

    def __init__(self, total_epochs: int, milestones: Sequence[int], gamma: float, warmup_epochs: int = 0,
                 warmup_start_factor: float = 0.0):
        super().__init__(total_epochs)
        self.milestones = sorted(int(milestone) for milestone in milestones)
        self.gamma = gamma
        self.warmup_epochs = warmup_epochs
        self.warmup_start_factor = warmup_start_factor

    def factor(self, epoch: int) -> float:
        factor = self.gamma ** sum(epoch >= milestone for milestone in self.milestones)
        if epoch < self.warmup_epochs:
            fraction = (epoch + 1) / self.warmup_epochs
            factor *= self.warmup_start_factor * (1 - fraction) + fraction
        return factor


class CosineLR(EpochSchedule):
    """torch's CosineAnnealingLR(T_max=total_epochs, eta_min=0) stepped at epoch end: 1/2 (1 + cos(pi e / T)).

    RIDE's router stage (T = 5) and ResLT on iNaturalist (no warmup) use it; the first epoch runs at the peak lr.
    """

    def factor(self, epoch: int) -> float:
        return 0.5 * (1 + math.cos(math.pi * epoch / self.total_epochs))


class StartOfEpochCosineLR(EpochSchedule):
    """Decoupling (classifier-balancing `run_networks.py`): CosineAnnealingLR stepped at the START of each
    1-indexed epoch, so epoch e (0-based) trains at 1/2 (1 + cos(pi (e + 1) / T)) and the last epoch at lr 0."""

    def factor(self, epoch: int) -> float:
        return 0.5 * (1 + math.cos(math.pi * (epoch + 1) / self.total_epochs))


class WarmupCosineLR(EpochSchedule):
    """ResLT ImageNet-LT `adjust_learning_rate`: (e + 1)/W for e < W, then 1/2 (1 + cos(pi (e - W + 1)/(T - W + 1)))."""

    def __init__(self, total_epochs: int, warmup_epochs: int):
        super().__init__(total_epochs)
        self.warmup_epochs = warmup_epochs

    def factor(self, epoch: int) -> float:
        warmup = self.warmup_epochs
        if epoch < warmup:
            return (epoch + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * (epoch - warmup + 1) / (self.total_epochs - warmup + 1)))


class ConstantLR(EpochSchedule):
    def factor(self, epoch: int) -> float:
        return 1.0


# config name -> the schedule's class, with the arguments the name fixes
SCHEDULES = {
    "warmup_multistep": WarmupMultiStepLR,  # milestones, gamma, warmup_epochs, warmup_start_factor
    "ride_custom": functools.partial(WarmupMultiStepLR, warmup_start_factor=0.0),  # RIDE's CustomLR: warmup from 0
    "reslt_cifar": functools.partial(WarmupMultiStepLR, warmup_start_factor=1 / 3),  # warmup from 1/3
    "cosine": CosineLR,  # end-of-epoch cosine
    "decoupling_cosine": StartOfEpochCosineLR,  # start-of-epoch cosine
    "warmup_cosine": WarmupCosineLR,  # ResLT ImageNet-LT
    "constant": ConstantLR,
}


def build_schedule(name: str, total_epochs: int, **kwargs) -> EpochSchedule:
    """Schedule by config name (SCHEDULES): "warmup_multistep" (milestones, gamma, warmup_epochs,
    warmup_start_factor), "ride_custom" (RIDE's CustomLR: warmup from 0), "reslt_cifar" (warmup from 1/3), "cosine"
    (end-of-epoch cosine), "decoupling_cosine" (start-of-epoch cosine), "warmup_cosine" (ResLT ImageNet-LT),
    "constant"."""
    if name not in SCHEDULES:
        raise ValueError(f"build_schedule: unknown schedule {name!r}; expected one of {', '.join(SCHEDULES)}")
    return SCHEDULES[name](total_epochs, **kwargs)
