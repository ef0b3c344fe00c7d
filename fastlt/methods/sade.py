"""SADE (Zhang et al., NeurIPS 2022; docs/methods.md 8.3): three skill-diverse experts and test-time self-supervised
aggregation.

Training (`SADELoss`, the official `DiverseExpertLoss` of Vanint/SADE-AgnosticLT, model/loss.py), summed over the
three experts of a RIDE-style model:

- forward expert: CE(z_1, y) (long-tailed, like the training set);
- uniform expert: CE(z_2 + log pi, y) (Balanced Softmax);
- backward expert: CE(z_3 + log pi - tau * log pi_bar, y), where pi_bar is the prior reversed by rank (the most
  frequent class gets the rarest class's prior), tau = 2 (CIFAR-100-LT, ImageNet-LT), 1 (iNaturalist 2018).

The three shifted cross-entropies are one fused call, `fastlt.ops.shifted_ce` with an explicit [3, C] shift
table (the `prior_shifted_ce` kernel): `prior_shifted_ce` builds its shifts as tau_k * log(pi), and the backward
expert's shift is not of that form unless the class counts follow an exact exponential profile.

Test time (`adapt_expert_weights`, the official test_training_*.py): the model is frozen in eval mode; a 3-vector
w (initialised to 1/3) gives the aggregation softmax(w), the prediction is sum_k softmax(w)_k z_k
(`fastlt.ops.expert_aggregate(reduce="sum", weights=softmax(w))`), and w is trained on UNLABELED images by
maximising the cosine similarity of the softmax predictions of two augmented views of each image (SGD, 5 epochs,
stopping after an epoch at whose end some weight, rounded to two decimals, is below 0.05: `stops_adapting`). The
views are the official strong augmentation (`fastlt.data.transforms.SADE_VIEWS`). The official code adapts on the
test images themselves (transductive, labels never used); `fastlt stage2 sade` does the same by default and says so.

The backward expert's pi_bar differs from the official one where classes tie in count: the official
`inverse_prior` sorts the prior with the unstable `torch.sort`, `reversed_prior` with a stable sort, so tied classes
take their mirrored priors in another order (docs/methods.md 8.3).
"""

import dataclasses
from typing import Callable, Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from fastlt import ops
from fastlt.data.transforms import SADE_VIEWS
from fastlt.engine.loop import move_batch
from fastlt.errors import ConfigError
from fastlt.methods.builders import build_loader
from fastlt.methods.options import Named, declared, default_of, option
from fastlt.methods.registry import register_method
from fastlt.methods.stage1 import Method
from fastlt.methods.stage2 import SPLITS, Stage2Context, Stage2Result
from fastlt.models import RIDE
from fastlt.ops._lt_constants import class_prior

STOP_WEIGHT = 0.05  # the official loop stops once an expert's aggregation weight, rounded to 2 decimals, is below


def reversed_prior(prior: torch.Tensor) -> torch.Tensor:
    """pi_bar: the prior values reversed by rank (the official `inverse_prior`; tied values in the stable order,
    where the official unstable `torch.sort` may take another: docs/methods.md 8.3).

    >>> reversed_prior(torch.tensor([0.6, 0.1, 0.3], dtype=torch.float64)).tolist()
    [0.1, 0.6, 0.3]
    """
    values, order = torch.sort(prior, stable=True)
    rank = torch.empty_like(order)
    rank[order] = torch.arange(len(prior), device=prior.device)
    return values[len(prior) - 1 - rank]


def sade_logit_shifts(class_counts, tau: float = 2.0) -> torch.Tensor:
    """[3, C] fp64 shifts of the forward, uniform and backward experts: 0, log pi, log pi - tau * log pi_bar."""
    prior = class_prior(torch.as_tensor(class_counts, dtype=torch.float64))
    log_prior = prior.log()
    return torch.stack([torch.zeros_like(log_prior), log_prior, log_prior - tau * reversed_prior(prior).log()])


class SADELoss(nn.Module):
    """Sum of the forward / uniform / backward experts' shifted cross-entropies on [3, B, C] expert logits."""

    def __init__(self, class_counts, tau: float = 2.0):
        super().__init__()
        self.tau = float(tau)
        self.register_buffer("logit_shifts", sade_logit_shifts(class_counts, self.tau), persistent=False)

    def forward(self, expert_logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if expert_logits.dim() != 3 or expert_logits.shape[0] != 3:
            raise ValueError(f"SADELoss: expert_logits must be [3, B, C] (forward, uniform, backward experts), got "
                             f"shape {tuple(expert_logits.shape)}")
        return ops.shifted_ce(expert_logits, target, self.logit_shifts)

    def extra_repr(self) -> str:
        return f"num_classes={self.logit_shifts.shape[1]}, tau={self.tau}"


def aggregate(expert_logits: torch.Tensor, raw_weights: torch.Tensor) -> torch.Tensor:
    """sum_k softmax(w)_k * z_k: [E, B, C] -> [B, C], differentiable in w."""
    return ops.expert_aggregate(expert_logits, reduce="sum", weights=torch.softmax(raw_weights, dim=0))


def stability_loss(view_a: torch.Tensor, view_b: torch.Tensor, raw_weights: torch.Tensor) -> torch.Tensor:
    """- mean cosine similarity of the aggregated softmax predictions of two views ([E, B, C] expert logits each)."""
    probabilities_a = torch.softmax(aggregate(view_a, raw_weights), dim=1)
    probabilities_b = torch.softmax(aggregate(view_b, raw_weights), dim=1)
    return -F.cosine_similarity(probabilities_a, probabilities_b, dim=1, eps=1e-6).mean()


def adapt_expert_weights(expert_logits_of: Callable, view_loaders, *, epochs: int = 5, lr: float = 0.1,
                         weight_decay: float = 5e-4, num_experts: int = 3, on_epoch_end: Optional[Callable] = None,
                         device=torch.device("cpu")):
    """Learns the aggregation weights by prediction stability; returns (softmax weights [E], per-epoch records).

    `expert_logits_of(images)` gives the frozen model's [E, B, C] expert logits; `view_loaders` is a pair of loaders
    that yield the same images in the same order, each with its own random augmentation (labels are ignored).
    """
    raw_weights = torch.full((num_experts,), 1.0 / num_experts, device=device, requires_grad=True)
    optimizer = torch.optim.SGD([raw_weights], lr=lr, momentum=0.9, weight_decay=weight_decay, nesterov=True)
    history = []
    for epoch in range(epochs):
        for loader in view_loaders:
            if hasattr(loader, "set_epoch"):
                loader.set_epoch(epoch)
        total, seen = 0.0, 0
        for (images_a, _), (images_b, _) in zip(*view_loaders):
            with torch.no_grad():
                view_a = expert_logits_of(images_a).float()
                view_b = expert_logits_of(images_b).float()
            loss = stability_loss(view_a, view_b, raw_weights)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total, seen = total + loss.item() * len(images_a), seen + len(images_a)
        weights = torch.softmax(raw_weights.detach(), dim=0)
        record = {"epoch": epoch, "stability": -total / max(seen, 1), "weights": weights.cpu().tolist()}
        history.append(record)
        if on_epoch_end is not None:
            on_epoch_end(record)
        if stops_adapting(weights):
            break
    return torch.softmax(raw_weights.detach(), dim=0), history


def stops_adapting(weights: torch.Tensor) -> bool:
    """The official stop rule (test_training_*.py): after an epoch, the softmax weights (fp32) are rounded to two
    decimals with ``np.round`` and adaptation stops when one is below 0.05, i.e. when a weight is under about 0.045.

    >>> stops_adapting(torch.tensor([0.047, 0.5, 0.453])), stops_adapting(torch.tensor([0.044, 0.5, 0.456]))
    (False, True)
    """
    rounded = np.round(weights.detach().float().cpu().numpy(), decimals=2)
    return bool((rounded < STOP_WEIGHT).any())


def frozen_expert_logits(model: nn.Module, device) -> Callable:
    """images -> the eval-mode model's [E, B, C] expert logits on `device`."""
    model.eval()

    def expert_logits_of(images):
        images, _ = move_batch(images, torch.zeros(0, dtype=torch.long), device, channels_last=False)
        return model(images).expert_logits

    return expert_logits_of


@torch.no_grad()
def predict_experts(model: nn.Module, loader, device):
    """(expert logits [E, N, C] fp32 on the CPU, targets [N]) of the eval-mode model, in loader order."""
    expert_logits_of = frozen_expert_logits(model, device)
    logits, targets = [], []
    for images, labels in loader:
        logits.append(expert_logits_of(images).float().cpu())
        targets.append(labels)
    return torch.cat(logits, dim=1), torch.cat(targets)


@declared
class SADEOptions(Named):
    """The backward expert's prior inversion."""

    tau: float = option(default_of(SADELoss, "tau"), "backward expert: CE(z + log pi - tau * log pi_bar) (iNat: 1)")


@register_method("sade", SADEOptions)
def sade(options: SADEOptions, counts, model) -> Method:
    """SADE: forward (CE), uniform (Balanced Softmax) and backward (log pi - tau log pi_bar) experts, summed."""
    if getattr(model, "num_experts", None) != 3:
        raise ConfigError(f"sade: needs a 3-expert model (forward, uniform, backward), got "
                          f"{getattr(model, 'num_experts', 'a single-head model')} experts")
    loss = SADELoss(counts, tau=options.tau).to(counts.device)
    return Method("sade", lambda output, targets: loss(output.expert_logits, targets))


@declared
class SADEAdaptOptions(Named):
    """Test-time aggregation: the expert weights learned by prediction stability on unlabeled images."""

    adapt_on: str = option("test", "the unlabeled split the weights are learned on (the official code: test)",
                           choices=SPLITS)
    views: Optional[str] = option(None, "the official strong views (null: cifar for array data sets, imagenet for "
                                  "image files)", choices=tuple(SADE_VIEWS))
    epochs: int = option(default_of(adapt_expert_weights, "epochs"), "epochs (stops early once a weight < 0.05)",
                         low=1)
    batch_size: int = option(128, "batch size of each view", low=1)
    lr: float = option(default_of(adapt_expert_weights, "lr"), "SGD learning rate (Nesterov, momentum 0.9)", low=0)
    weight_decay: float = option(default_of(adapt_expert_weights, "weight_decay"), "SGD weight decay", low=0)


def reload_aggregated(chosen: dict, model: nn.Module, folder: str, loader, class_counts, device):
    expert_logits, targets = predict_experts(model, loader, device)
    return aggregate(expert_logits, torch.tensor(chosen["weights"]).log()), targets


def view_loaders(options: SADEAdaptOptions, stage: Stage2Context) -> list:
    """The two loaders of the `adapt_on` split: the same shuffled order, each drawing its own strong view (the
    official TwoCropsTransform); `views` defaults to cifar for array data sets, imagenet for image files."""
    dataset = stage.datasets[options.adapt_on]
    strong = SADE_VIEWS[options.views or ("cifar" if hasattr(dataset, "images") else "imagenet")]
    # the view replaces the training augmentation (its crop and flip settings kept): torch loader, always augmented
    view_data = dataclasses.replace(stage.data, loader="torch", augment=True)
    return [build_loader(dataset, view_data, options.batch_size, train=True, seed=stage.seed + view,
                         sampler=stage.sampler("instance_balanced", options.epochs, dataset=dataset), strong=strong)
            for view in range(2)]


@register_method("sade", SADEAdaptOptions, stage=2, needs_model=RIDE, reload=reload_aggregated)
def sade_aggregation(options: SADEAdaptOptions, stage: Stage2Context) -> Stage2Result:
    """SADE's test-time aggregation: expert weights learned on two strongly augmented views of unlabeled images."""
    split, model = options.adapt_on, stage.model
    if stage.datasets.get(split) is None:
        raise ConfigError(f"stage2 sade: no {split} split to adapt the expert weights on; set stage2.adapt_on")
    if model.num_experts != 3:
        raise ConfigError(f"stage2 sade: needs the 3-expert SADE model, got {model.num_experts} experts")
    weights, history = adapt_expert_weights(
        frozen_expert_logits(model, stage.device), view_loaders(options, stage), epochs=options.epochs, lr=options.lr,
        weight_decay=options.weight_decay, num_experts=model.num_experts, on_epoch_end=stage.run.log,
        device=stage.device)
    chosen = {"adapted_on": split, "weights": weights.tolist(), "history": history}
    expert_logits, targets = predict_experts(model, stage.plain_loaders["test"], stage.device)
    note = (" (expert weights " + ", ".join(f"{w:.2f}" for w in chosen["weights"])
            + f" learned on unlabeled {split} images)")
    return Stage2Result(chosen, aggregate(expert_logits, weights.cpu().log()), targets, note=note)
