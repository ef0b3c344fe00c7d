"""Decoupling stage 2 on a frozen stage-1 backbone (docs/methods.md §2.4-2.7): cRT, LWS, tau-norm and NCM.

All four keep `model.backbone` and replace `model.classifier` of a `fastlt.models.FeatureClassifier`:

- cRT: a freshly initialised nn.Linear trained with class-aware sampling (4 images per class);
- LWS: per-class scales on the frozen stage-1 logits (bias included), same sampling;
- tau-norm: W / ||w_j||^tau without bias, tau picked on the VALIDATION split with `fastlt.ops.tau_sweep`;
- NCM: nearest class mean of centred, L2-normalised training features.

cRT and LWS keep the backbone in train mode, so BatchNorm statistics keep updating on class-balanced batches as in
the official code; `freeze_bn=True` keeps them fixed instead.
"""

import math
from typing import Sequence

import torch
from torch import nn

from fastlt import ops
from fastlt.engine import build_schedule, build_sgd, fit, load_checkpoint
from fastlt.engine.loop import move_batch
from fastlt.models import LearnableWeightScaling, NearestClassMean, TauNormLinear
from fastlt.ops.tau_sweep import DEFAULT_TAUS


class FrozenBackbone(nn.Module):
    """backbone (no gradients) + trainable head, returning the model's ModelOutput.

    `freeze_bn` keeps the backbone in eval mode even while the module trains (BN statistics fixed).
    """

    def __init__(self, model: nn.Module, head: nn.Module, freeze_bn: bool = False):
        super().__init__()
        self.model = model
        self.freeze_bn = freeze_bn
        for parameter in model.backbone.parameters():
            parameter.requires_grad_(False)
        model.classifier = head

    def extra_repr(self) -> str:
        return f"freeze_bn={self.freeze_bn}"

    def train(self, mode: bool = True):
        super().train(mode)
        if self.freeze_bn:
            self.model.backbone.eval()
        return self

    def forward(self, images):
        return self.model(images)


@torch.no_grad()
def extract_features(model: nn.Module, loader, device: torch.device = torch.device("cpu")):
    """(pooled backbone features [N, D], targets [N]) in eval mode, in loader order."""
    model.eval()
    features, targets = [], []
    for images, labels in loader:
        images, labels = move_batch(images, labels, device, channels_last=False)
        features.append(model.backbone(images).float().cpu())
        targets.append(labels.cpu())
    return torch.cat(features), torch.cat(targets)


def retrain_classifier(model: nn.Module, head: nn.Module, train_loader, *, epochs: int, lr: float,
                       weight_decay: float, run, steps_per_epoch: int, sampler=None, val_loader=None,
                       class_counts=None, freeze_bn: bool = False, device=torch.device("cpu")) -> dict:
    """cRT / LWS training: SGD (momentum 0.9) on the head only, Decoupling's start-of-epoch cosine, one epoch =
    floor(N / B) steps whatever the sampler, best epoch on val when there is one. Leaves the selected weights in
    `model` and returns fit()'s summary."""
    wrapped = FrozenBackbone(model, head, freeze_bn=freeze_bn).to(device)
    optimizer = build_sgd(wrapped, lr=lr, momentum=0.9, weight_decay=weight_decay)
    schedule = build_schedule("decoupling_cosine", total_epochs=epochs)
    result = fit(wrapped, lambda output, targets: nn.functional.cross_entropy(output.logits, targets), optimizer,
                 schedule, train_loader, epochs=epochs, device=device, run=run, sampler=sampler,
                 val_loader=val_loader, class_counts=class_counts, steps_per_epoch=steps_per_epoch)
    load_checkpoint(result["selected_checkpoint"], model=wrapped, restore_rng=False)
    return result


def crt_head(model: nn.Module) -> nn.Linear:
    """cRT: a new nn.Linear (PyTorch default init, with bias) of the stage-1 classifier's shape."""
    old = model.classifier
    return nn.Linear(old.in_features, old.out_features)


def lws_head(model: nn.Module) -> LearnableWeightScaling:
    return LearnableWeightScaling.from_linear(model.classifier)


def select_tau(val_features: torch.Tensor, val_targets: torch.Tensor, weight: torch.Tensor, class_counts,
               taus: Sequence[float] = DEFAULT_TAUS):
    """Sweeps tau on a validation split; returns (best tau by overall class-mean accuracy, rows per tau).
    Ties go to the smaller tau (the smaller change to the stage-1 classifier)."""
    taus = list(taus)
    predictions = ops.tau_sweep(val_features, weight, taus)
    rows = ops.shot_accuracy_per_tau(predictions, val_targets, class_counts, taus)
    best = max(rows, key=lambda row: (row["overall"], -row["tau"]))
    return best["tau"], rows


def tau_norm_head(model: nn.Module, tau: float) -> TauNormLinear:
    return TauNormLinear.from_linear(model.classifier, tau)


def ncm_head(train_features: torch.Tensor, train_targets: torch.Tensor, num_classes: int,
             feature_transform: str = "cl2n", distance: str = "l2") -> NearestClassMean:
    """NCM from training features computed with test-time transforms (the official 'train_plain')."""
    head = NearestClassMean(train_features.shape[1], num_classes, feature_transform, distance)
    head.fit(train_features, train_targets)
    return head


def class_aware_steps(num_samples: int, batch_size: int) -> int:
    """Decoupling's epoch length with any sampler: floor(N / B) steps (at least one)."""
    return max(1, math.floor(num_samples / batch_size))
