"""Decoupling stage 2 on a frozen stage-1 backbone (docs/methods.md §2.4-2.7): cRT, LWS, tau-norm and NCM.

All four keep `model.backbone` and replace `model.classifier` of a `fastlt.models.FeatureClassifier`:

- cRT: a freshly initialised nn.Linear trained with class-aware sampling (4 images per class);
- LWS: per-class scales on the frozen stage-1 logits (bias included), same sampling;
- tau-norm: W / ||w_j||^tau without bias, tau picked on the VALIDATION split with `fastlt.ops.tau_sweep`;
- NCM: nearest class mean of centred, L2-normalised training features.

cRT and LWS keep the backbone in train mode, so BatchNorm statistics keep updating on class-balanced batches as in
the official code; `freeze_bn=True` keeps them fixed instead. Each writes model.pt: the model with its new head.
"""

import math
import os
from typing import Callable, Optional, Sequence, Tuple

import torch
from torch import nn

from fastlt import ops
from fastlt.data import LongTailSampler
from fastlt.engine import build_schedule, build_sgd, fit, load_checkpoint, predict
from fastlt.engine.loop import move_batch
from fastlt.methods.builders import SamplerOptions
from fastlt.methods.options import Named, declared, default_of, option
from fastlt.methods.registry import register_method
from fastlt.methods.stage2 import SPLITS, Stage2Context, Stage2Result
from fastlt.models import FeatureClassifier, LearnableWeightScaling, NearestClassMean, TauNormLinear
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


def reload_head(make_head: Callable) -> Callable:
    """`fastlt eval` of a saved head: `make_head(model, chosen, num_classes)` puts the head's skeleton on the
    stage-1 model, model.pt fills it."""

    def reload(chosen: dict, model: nn.Module, folder: str, loader, class_counts, device):
        model.classifier = make_head(model, chosen, len(class_counts))
        model.load_state_dict(torch.load(os.path.join(folder, "model.pt"), map_location=device))
        return predict(model.to(device), loader, device=device)

    return reload


@declared
class RetrainOptions(Named):
    """cRT and LWS: the head's training on the frozen backbone."""

    epochs: int = option(10, "epochs of floor(N / batch_size) steps", low=1)
    batch_size: int = option(128, "batch size", low=1)
    lr: float = option(0.2, "SGD learning rate (momentum 0.9, start-of-epoch cosine)", low=0)
    weight_decay: float = option(5e-4, "SGD weight decay", low=0)
    sampler: SamplerOptions = option(SamplerOptions(name="class_aware"), "the sampler (class-aware: Decoupling's)")
    samples_per_class: int = option(default_of(LongTailSampler, "samples_per_class"),
                                    "class_aware: images of a class in a row (unless the sampler sets its own)", low=1)
    freeze_bn: bool = option(False, "keep BatchNorm statistics fixed (the official code lets them update)")


def _retrain(options: RetrainOptions, stage: Stage2Context, head: nn.Module) -> Stage2Result:
    sampler = stage.sampler(options.sampler, options.epochs, options.samples_per_class)
    loader = stage.loader(options.batch_size, sampler)
    fitted = retrain_classifier(
        stage.model, head.to(stage.device), loader, epochs=options.epochs, lr=options.lr,
        weight_decay=options.weight_decay, run=stage.run, sampler=sampler, val_loader=stage.plain_loaders["val"],
        class_counts=stage.class_counts, freeze_bn=options.freeze_bn, device=stage.device,
        steps_per_epoch=class_aware_steps(len(stage.train_set), options.batch_size))
    stage.save("model.pt", stage.model.state_dict())
    return Stage2Result({"best_epoch": fitted["best_epoch"]})


@register_method("crt", RetrainOptions, stage=2, needs_model=FeatureClassifier,
                 reload=reload_head(lambda model, chosen, num_classes: crt_head(model)))
def crt(options: RetrainOptions, stage: Stage2Context) -> Stage2Result:
    """cRT: a fresh linear classifier trained on the frozen backbone with class-aware sampling."""
    return _retrain(options, stage, crt_head(stage.model))


@register_method("lws", RetrainOptions, stage=2, needs_model=FeatureClassifier,
                 reload=reload_head(lambda model, chosen, num_classes: lws_head(model)))
def lws(options: RetrainOptions, stage: Stage2Context) -> Stage2Result:
    """LWS: per-class scales of the frozen stage-1 classifier, trained with class-aware sampling."""
    return _retrain(options, stage, lws_head(stage.model))


@declared
class TauNormOptions(Named):
    """tau-normalisation: a given tau, or the best of a sweep on a split."""

    tau: Optional[float] = option(None, "the classifier's W / ||w_j||^tau (null: picked on select_on)", low=0)
    select_on: str = option("val", "the split tau is picked on", choices=SPLITS)
    taus: Tuple[float, ...] = option(DEFAULT_TAUS, "the swept taus", low=0)


@register_method("tau", TauNormOptions, stage=2, needs_model=FeatureClassifier,
                 reload=reload_head(lambda model, chosen, num_classes: tau_norm_head(model, chosen["tau"])))
def tau_norm(options: TauNormOptions, stage: Stage2Context) -> Stage2Result:
    """tau-norm: the stage-1 classifier's weights divided by their norm^tau, no bias; tau picked on val."""
    chosen, tau = {}, options.tau
    if tau is None:
        loader = stage.selection_loader(options.select_on, "tau")
        features, labels = extract_features(stage.model, loader, stage.device)
        tau, rows = select_tau(features, labels, stage.model.classifier.weight.detach().cpu(), stage.class_counts,
                               options.taus)
        chosen.update(selected_on=options.select_on, sweep=rows)
    chosen["tau"] = tau
    stage.model.classifier = tau_norm_head(stage.model, tau)
    stage.save("model.pt", stage.model.state_dict())
    return Stage2Result(chosen, note=f" (tau {tau:.1f}, picked on {chosen.get('selected_on', 'config')})")


@declared
class NCMOptions(Named):
    """NCM: how features are compared with the class means."""

    feature_transform: str = option(default_of(NearestClassMean, "feature_transform"),
                                    "cl2n: centre and L2-normalise; l2n: normalise; none",
                                    choices=("cl2n", "l2n", "none"))
    distance: str = option(default_of(NearestClassMean, "distance"), "l2 (squared distance) or cos",
                           choices=("l2", "cos"))


def _ncm_skeleton(model: nn.Module, chosen: dict, num_classes: int) -> NearestClassMean:
    # model.pt holds the means, stage2.json how to compare with them (the head's defaults for runs that predate it)
    settings = {key: chosen[key] for key in ("feature_transform", "distance") if key in chosen}
    return NearestClassMean(model.classifier.in_features, num_classes, **settings)


@register_method("ncm", NCMOptions, stage=2, needs_model=FeatureClassifier, reload=reload_head(_ncm_skeleton))
def ncm(options: NCMOptions, stage: Stage2Context) -> Stage2Result:
    """NCM: the nearest class mean of the training features (evaluation transform)."""
    features, labels = extract_features(stage.model, stage.plain_loaders["train"], stage.device)
    stage.model.classifier = ncm_head(features, labels, stage.train_set.num_classes, options.feature_transform,
                                      options.distance)
    stage.model.to(stage.device)
    stage.save("model.pt", stage.model.state_dict())
    return Stage2Result({"feature_transform": options.feature_transform, "distance": options.distance})
