"""Stage-1 methods as loss wiring: each turns a config section into `loss_fn(output, targets)` for
`fastlt.engine.fit`, plus an optional per-epoch hook (RIDE's and LDAM's DRW switch).

The losses themselves are fastlt's fused ops (`fastlt.RIDELoss`, `fastlt.ResLTLoss`, `fastlt.PriorShiftedCE`);
nothing here re-implements them. Constants default to the CIFAR recipes of docs/methods.md §3.5 and §4.4.

>>> import torch
>>> from fastlt.models import create_model
>>> model = create_model("small_cnn", num_classes=10)
>>> method = build_method({"name": "ce"}, class_counts=[100] * 10, model=model)
>>> output = model(torch.zeros(4, 1, 28, 28))
>>> method.loss_fn(output, torch.zeros(4, dtype=torch.long)).shape
torch.Size([])
"""

import os
from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

import fastlt
from fastlt.engine import load_checkpoint
from fastlt.engine.trainer import recover_interrupted_run
from fastlt.errors import MissingFileError
from fastlt.methods.balpoe import BalPoELoss, limits_taus
from fastlt.methods.builders import build_model, selected_checkpoint
from fastlt.methods.config import ConfigError, read_recipe
from fastlt.methods.sade import SADELoss
from fastlt.models import FeatureClassifier, NormedLinear

LDAM_SCALE = 30.0  # the cosine classifier's s, as in LDAM-DRW and RIDE


@dataclass
class Method:
    """What the trainer needs from a method: the loss on a ModelOutput and a hook run at each 0-based epoch.
    needs_images: loss_fn(output, targets, images) (distillation runs its teacher on the batch)."""

    name: str
    loss_fn: Callable
    on_epoch_start: Optional[Callable[[int], None]] = None
    needs_images: bool = False


def stacked(output, field: str) -> torch.Tensor:
    """[E, B, C] logits of a multi-head output, or the single head's logits as a [1, B, C] view."""
    logits = getattr(output, field)
    return output.logits.unsqueeze(0) if logits is None else logits


def epoch_hook(loss_module: nn.Module) -> Callable[[int], None]:
    """The loss's DRW switch, told the engine's 0-based epoch (DRW from epoch drw_epoch: 160 is the official
    1-based 161)."""
    return loss_module.set_epoch


def use_cosine_classifier(model: nn.Module) -> None:
    """LDAM needs normalised logits x s: swap a plain model's nn.Linear for NormedLinear(scale=30)."""
    if isinstance(model, FeatureClassifier) and isinstance(model.classifier, nn.Linear):
        linear = model.classifier
        model.classifier = NormedLinear(linear.in_features, linear.out_features, scale=LDAM_SCALE)


def cross_entropy(config, counts, model) -> Method:
    return Method("ce", lambda output, targets: F.cross_entropy(output.logits, targets))


def ldam_drw(config, counts, model) -> Method:
    """LDAM-DRW = the RIDE loss with one head and no diversity term (diversity_factor 0 is individual LDAM-DRW in
    fastlt, not the official code's collaborative switch)."""
    use_cosine_classifier(model)
    loss = fastlt.RIDELoss(counts, scale=LDAM_SCALE, max_margin=config.get("max_margin", 0.5), diversity_factor=0.0,
                           drw_beta=config.get("drw_beta", 0.9999),
                           drw_epoch=config.get("drw_epoch", 160)).to(counts.device)
    return Method("ldam_drw", lambda output, targets: loss(stacked(output, "expert_logits"), targets),
                  epoch_hook(loss))


def balanced_softmax(config, counts, model) -> Method:
    """Balanced Softmax / logit adjustment: CE(z + tau log pi) with tau = 1 (PriorShiftedCE)."""
    loss = fastlt.PriorShiftedCE(counts, taus=[config.get("tau", 1.0)]).to(counts.device)
    return Method("balanced_softmax", lambda output, targets: loss(stacked(output, "expert_logits"), targets))


def ride(config, counts, model) -> Method:
    """RIDE stage 1: per-expert LDAM-DRW + distribution-aware diversity KL, DRW from 0-based epoch
    `drw_epoch` (the official 1-based `epoch > drw_epoch`).

    With `teacher: <fastlt run folder or a checkpoint in one>` (a RIDE model trained first, 6 experts in the official
    recipes) it is RIDE + distillation (docs/methods.md 3.3, `fastlt.RIDEDistillLoss`): `distill_temperature` (1.5),
    `distill_factor` (1.0), `distill_scale_by_experts` (true: the official x E). The teacher runs under no_grad in
    train mode (batch-statistics BN) as in the official trainer, unless `teacher_train_mode: false`."""
    loss = fastlt.RIDELoss(counts, scale=config.get("scale", LDAM_SCALE), max_margin=config.get("max_margin", 0.5),
                           diversity_factor=config.get("diversity_factor", -0.45),
                           temperature_factor=config.get("temperature_factor", 0.05),
                           base_temperature=config.get("base_temperature", 1.0),
                           drw_beta=config.get("drw_beta", 0.9999),
                           drw_epoch=config.get("drw_epoch", 160)).to(counts.device)
    if config.get("fused_head"):
        return _fused_head_ride(loss, config, model)
    if config.get("teacher") is None:
        return Method("ride", lambda output, targets: loss(output.expert_logits, targets), epoch_hook(loss))
    distill = fastlt.RIDEDistillLoss(loss, temperature=config.get("distill_temperature", 1.5),
                                     distill_factor=config.get("distill_factor", 1.0),
                                     scale_by_experts=config.get("distill_scale_by_experts", True))
    return _distilled(config, counts.numel(), counts.device, epoch_hook(distill),
                      lambda output, targets, teacher_logits: distill(output.expert_logits, targets, teacher_logits))


def _distilled(config, num_classes, device, on_epoch_start, loss_with_teacher) -> Method:
    """RIDE's distillation method: the teacher run named by config["teacher"] gives its logits on each batch (no
    gradient) to ``loss_with_teacher(output, targets, teacher_logits)``."""
    teacher = load_teacher(config["teacher"], num_classes=num_classes, device=device,
                           train_mode=config.get("teacher_train_mode", True))
    last = {}  # a mixed step calls the loss once per label set on the same images: one teacher pass

    def distill_loss(output, targets, images):
        if last.get("images") is not images:
            with torch.no_grad():
                last.update(images=images, logits=teacher(images).logits.float())
        return loss_with_teacher(output, targets, last["logits"])

    return Method("ride_distill", distill_loss, on_epoch_start, needs_images=True)


def _fused_head_ride(loss, config, model) -> Method:
    """`fused_head: true`: the RIDE model's classifiers and the loss become one fastlt.LinearRIDELoss (initialised
    from the classifiers' weights), whose loss never forms the [E, B, C] logits. With `teacher`, the head adds RIDE's
    distillation term from the students' [B, C] mean logits (fastlt.LinearRIDELoss.mean_logits), with the same keys
    and teacher as the unfused ride_distill."""
    if not hasattr(model, "use_fused_head"):
        raise ConfigError(f"ride: fused_head needs a RIDE model, got {type(model).__name__}")
    classifiers = list(model.classifiers)
    normalize = isinstance(classifiers[0], NormedLinear)
    in_features = classifiers[0].weight.shape[0] if normalize else classifiers[0].in_features
    head = fastlt.LinearRIDELoss(
        loss.class_counts, len(classifiers), in_features, normalize=normalize,
        scale=model.scale if normalize else 1.0, margin_scale=loss.scale, max_margin=loss.max_margin,
        diversity_factor=loss.diversity_factor, temperature_factor=loss.temperature_factor,
        base_temperature=loss.base_temperature, drw_beta=loss.drw_beta, drw_epoch=loss.drw_epoch,
        chunk_size=config.get("chunk_size"), distill_temperature=config.get("distill_temperature", 1.5),
        distill_factor=config.get("distill_factor", 1.0),
        distill_scale_by_experts=config.get("distill_scale_by_experts", True),
    ).to(classifiers[0].weight.device)  # moves with the model from here
    with torch.no_grad():
        for index, classifier in enumerate(classifiers):
            head.weight[index].copy_(classifier.weight.t() if normalize else classifier.weight)
            if not normalize:
                head.bias[index].copy_(classifier.bias)
    model.use_fused_head(head)
    if config.get("teacher") is None:
        return Method("ride", lambda output, targets: head(output.features, targets), epoch_hook(head))
    return _distilled(config, head.weight.shape[1], head.weight.device, epoch_hook(head),
                      lambda output, targets, teacher_logits: head(output.features, targets, teacher_logits))


def load_teacher(path: str, *, num_classes: int, device=None, train_mode: bool = True) -> nn.Module:
    """A trained fastlt run as a frozen teacher: the model its config.yaml describes, with the weights of `path`
    (a checkpoint) or of the run folder `path` (the weights the run selected)."""
    folder = path if os.path.isdir(path) else os.path.dirname(path)
    config_path = os.path.join(folder, "config.yaml")
    if not os.path.isfile(config_path):
        raise MissingFileError(f"ride: teacher {path!r} is not a fastlt run folder or a checkpoint in one "
                               f"(no {config_path}); train the teacher recipe first")
    recover_interrupted_run(folder)  # a teacher run killed between its last.pt and best.pt: the committed best
    checkpoint = selected_checkpoint(path) if os.path.isdir(path) else path
    if not os.path.isfile(checkpoint):
        raise MissingFileError(f"ride: teacher checkpoint {checkpoint!r} not found")
    recipe = read_recipe(config_path)
    teacher = build_model(recipe, num_classes)
    # The teacher recipe's own head adaptations (a fused head, LDAM's cosine classifier), so its weights fit. Its loss
    # is never used: any positive class counts will do.
    build_method({**recipe["method"], "teacher": None}, torch.ones(num_classes), teacher)
    load_checkpoint(checkpoint, model=teacher, restore_rng=False)
    teacher.requires_grad_(False)
    return teacher.to(device).train(train_mode)


def reslt(config, counts, model) -> Method:
    """ResLT: beta * (masked per-branch CE) + (1 - beta) * CE(sum). Groups come from the counts (>100 / 20..100 /
    <20) or from the papers' rank cut-offs, e.g. `cutoffs: [35, 70]` on CIFAR-100.

    A multi-expert model (`reslt_ride_resnext50_32x4d`: branch_logits [E, K, B, C]) sums the loss over its experts,
    as the official RIDE + ResLT script. `label_smoothing: delta` (the official ImageNet-LT scripts' `--lsm`, 0 by
    default and in every released run) smooths the target of every cross-entropy, branch and fused, to 1 - delta on
    the label and delta / (C - 1) on each other class. `log_eps` (1e-7) and `fused_log_eps` (default: log_eps) are
    the branch and fused terms' epsilons (fastlt.ResLTLoss; the CIFAR and iNat recipes set fused_log_eps 0)."""
    groups = fastlt.ops.reslt_groups(torch.as_tensor(counts), cutoffs=config.get("cutoffs"),
                                     num_branches=config.get("num_branches", 3))
    loss = fastlt.ResLTLoss(groups, beta=config.get("beta", 0.995),
                            log_eps=config.get("log_eps", fastlt.ResLTLoss.OFFICIAL_LOG_EPS),
                            fused_log_eps=config.get("fused_log_eps")).to(counts.device)
    smoothing = config.get("label_smoothing", 0.0)
    if not (isinstance(smoothing, (int, float)) and 0 <= smoothing < 1):
        raise ConfigError(f"reslt: label_smoothing must be a number in [0, 1), got {smoothing!r}")
    num_branches, num_classes = groups.shape

    def branch_loss(branch_logits, targets):
        value = loss(branch_logits, targets)
        if not smoothing:
            return value
        # the loss is linear in each sample's target: (1 - delta C / (C - 1)) * one-hot + delta / (C - 1) * ones
        uniform = _reslt_all_classes_term(branch_logits, targets, loss.group_masks, loss.beta, loss.log_eps,
                                          loss.fused_log_eps)
        return (1 - smoothing * num_classes / (num_classes - 1)) * value + smoothing / (num_classes - 1) * uniform

    def loss_fn(output, targets):
        logits = output.branch_logits
        if logits.dim() == 4:
            return sum(branch_loss(expert[:num_branches], targets) for expert in logits)
        return branch_loss(logits[:num_branches], targets)

    return Method("reslt", loss_fn)


def _reslt_all_classes_term(branch_logits, targets, group_masks, beta, log_eps, fused_log_eps):
    """The ResLT loss with every class as the target (sum over classes of -log(p_c + eps), eps = log_eps in the
    branch terms and fused_log_eps in the fused term): the label-smoothing part, in eager PyTorch (fp32)."""
    logits = branch_logits.float()

    def summed_nll(z, eps):
        if eps:
            return -torch.log(torch.softmax(z, dim=-1) + eps).sum(-1)
        return -torch.log_softmax(z, dim=-1).sum(-1)

    in_group = group_masks[:, targets].to(logits)  # [K, B]
    individual = (in_group * summed_nll(logits, log_eps)).sum() / in_group.sum().clamp_min(1)
    return beta * individual + (1 - beta) * summed_nll(logits.sum(0), fused_log_eps).mean()


def balpoe(config, counts, model) -> Method:
    """BalPoE: expert k trained with CE(z_k + tau_k log pi), the experts' losses averaged (one fused call).
    `taus` (default [0, 1, 2]), or `tau_min` / `tau_max` for E equidistant taus (the official 'limits')."""
    num_experts = getattr(model, "num_experts", None)
    if num_experts is None:
        raise ConfigError(f"balpoe: needs a multi-expert model (e.g. ride_small_cnn), got {type(model).__name__}")
    taus = config.get("taus")
    if taus is None:
        taus = limits_taus(num_experts, config.get("tau_min", 0.0), config.get("tau_max", 2.0))
    if len(taus) != num_experts:
        raise ConfigError(f"balpoe: taus has {len(taus)} values but the model has {num_experts} experts")
    loss = BalPoELoss(counts, taus).to(counts.device)
    return Method("balpoe", lambda output, targets: loss(output.expert_logits, targets))


def sade(config, counts, model) -> Method:
    """SADE: forward (CE), uniform (Balanced Softmax) and backward (log pi - tau log pi_bar) experts, summed."""
    if getattr(model, "num_experts", None) != 3:
        raise ConfigError(f"sade: needs a 3-expert model (forward, uniform, backward), got "
                          f"{getattr(model, 'num_experts', 'a single-head model')} experts")
    loss = SADELoss(counts, tau=config.get("tau", 2.0)).to(counts.device)
    return Method("sade", lambda output, targets: loss(output.expert_logits, targets))


METHODS = {"ce": cross_entropy, "ldam_drw": ldam_drw, "balanced_softmax": balanced_softmax, "ride": ride,
           "reslt": reslt, "balpoe": balpoe, "sade": sade}


def build_method(config: dict, class_counts, model: nn.Module, device=None) -> Method:
    """The method named by config["name"] (one of METHODS), its loss on `device`; may adapt `model` (LDAM's
    cosine classifier)."""
    name = config["name"]
    if name not in METHODS:
        raise ConfigError(f"method.name: unknown method {name!r}; expected one of {sorted(METHODS)}")
    counts = torch.as_tensor(class_counts, dtype=torch.float64, device=device)
    return METHODS[name]({key: value for key, value in config.items() if key != "name"}, counts, model)
