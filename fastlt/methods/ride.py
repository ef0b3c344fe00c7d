"""RIDE stage 1 (Wang et al., ICLR 2021; docs/methods.md 3.2, 3.3): per-expert LDAM-DRW plus the distribution-aware
diversity KL, optionally distilled from a trained teacher run, optionally with the classifiers and the loss fused into
one `fastlt.LinearRIDELoss` (`fused_head: true`). RIDE's stage 2, the expert router, is router.py.
"""

import os
from typing import Optional

import torch
import torch.distributed as dist
from torch import nn

import fastlt
from fastlt.engine import load_checkpoint
from fastlt.engine.trainer import recover_interrupted_run
from fastlt.errors import ConfigError, MissingFileError
from fastlt.methods.builders import build_model, selected_checkpoint
from fastlt.methods.config import read_recipe
from fastlt.methods.ldam_drw import LDAMDRWOptions
from fastlt.methods.options import declared, default_of, option
from fastlt.methods.registry import register_method
from fastlt.methods.stage1 import Method, build_method, epoch_hook, rebuild_options
from fastlt.models import NormedLinear


HEAD_PARALLEL = ("none", "class")  # how the fused head is split across torchrun's ranks


@declared
class RIDEOptions(LDAMDRWOptions):
    """RIDE's loss (LDAM-DRW per expert + diversity), its distillation and its fused head."""

    scale: float = option(default_of(fastlt.RIDELoss, "scale"), "the LDAM margins' logit scale s", low=0)
    diversity_factor: float = option(default_of(fastlt.RIDELoss, "diversity_factor"),
                                     "weight of the diversity KL (negative: experts pushed apart)")
    temperature_factor: float = option(default_of(fastlt.RIDELoss, "temperature_factor"),
                                       "how much the diversity temperature follows the class prior", low=0, high=1)
    base_temperature: float = option(default_of(fastlt.RIDELoss, "base_temperature"),
                                     "the diversity KL's base temperature", low=0, low_open=True)
    fused_head: bool = option(False, "fuse the experts' classifiers with the loss (never forms [E, B, C] logits)")
    chunk_size: Optional[int] = option(None, "fused head: classes per chunk (null: chosen by the op)", low=1)
    head_parallel: str = option("none", "fused head under torchrun: class shards its classes over the ranks "
                                "(docs/methods.md 8.6)", choices=HEAD_PARALLEL)
    teacher: Optional[str] = option(None, "a trained RIDE run folder (or a checkpoint in one) to distil from")
    teacher_train_mode: bool = option(True, "run the teacher with batch-statistics BN, as the official trainer")
    distill_temperature: float = option(default_of(fastlt.RIDEDistillLoss, "temperature"),
                                        "the distillation KL's temperature", low=0, low_open=True)
    distill_factor: float = option(default_of(fastlt.RIDEDistillLoss, "distill_factor"),
                                   "weight of the distillation KL")
    distill_scale_by_experts: bool = option(default_of(fastlt.RIDEDistillLoss, "scale_by_experts"),
                                            "multiply both terms by the number of experts (the official code)")

    def __post_init__(self):
        if self.head_parallel == "class" and not self.fused_head:
            raise ConfigError("method.head_parallel: class needs method.fused_head: true")
        if self.head_parallel == "class" and self.teacher is not None:
            raise ConfigError("method.head_parallel: class does not support a distillation teacher (one process only)")


@register_method("ride", RIDEOptions)
def ride(options: RIDEOptions, counts, model) -> Method:
    """RIDE: per-expert LDAM-DRW + distribution-aware diversity KL, optional distillation and fused head.

    DRW from 0-based epoch `drw_epoch` (the official 1-based `epoch > drw_epoch`). With `teacher` it is RIDE +
    distillation (docs/methods.md 3.3, `fastlt.RIDEDistillLoss`); the teacher runs under no_grad in train mode
    (batch-statistics BN) as in the official trainer, unless `teacher_train_mode: false`."""
    loss = fastlt.RIDELoss(counts, scale=options.scale, max_margin=options.max_margin,
                           diversity_factor=options.diversity_factor, temperature_factor=options.temperature_factor,
                           base_temperature=options.base_temperature, drw_beta=options.drw_beta,
                           drw_epoch=options.drw_epoch).to(counts.device)
    if options.fused_head:
        return _fused_head_ride(loss, options, model)
    if options.teacher is None:
        return Method("ride", lambda output, targets: loss(output.expert_logits, targets), epoch_hook(loss))
    distill = fastlt.RIDEDistillLoss(loss, temperature=options.distill_temperature,
                                     distill_factor=options.distill_factor,
                                     scale_by_experts=options.distill_scale_by_experts)
    return _distilled(options, counts.numel(), counts.device, epoch_hook(distill),
                      lambda output, targets, teacher_logits: distill(output.expert_logits, targets, teacher_logits))


def _distilled(options: RIDEOptions, num_classes, device, on_epoch_start, loss_with_teacher) -> Method:
    """RIDE's distillation method: the teacher run named by options.teacher gives its logits on each batch (no
    gradient) to ``loss_with_teacher(output, targets, teacher_logits)``."""
    teacher = load_teacher(options.teacher, num_classes=num_classes, device=device,
                           train_mode=options.teacher_train_mode)
    last = {}  # a mixed step calls the loss once per label set on the same images: one teacher pass

    def distill_loss(output, targets, images):
        if last.get("images") is not images:
            with torch.no_grad():
                last.update(images=images, logits=teacher(images).logits.float())
        return loss_with_teacher(output, targets, last["logits"])

    return Method("ride_distill", distill_loss, on_epoch_start, needs_images=True)


def _fused_head_ride(loss, options: RIDEOptions, model) -> Method:
    """`fused_head: true`: the RIDE model's classifiers and the loss become one fastlt.LinearRIDELoss (initialised
    from the classifiers' weights), whose loss never forms the [E, B, C] logits. With `teacher`, the head adds RIDE's
    distillation term from the students' [B, C] mean logits (fastlt.LinearRIDELoss.mean_logits), with the same keys
    and teacher as the unfused ride_distill.

    `head_parallel: class` (under torchrun with more than one rank) shards the head's classes across the ranks
    (docs/methods.md 8.6): each rank holds its classes' weights, the loss is the whole global batch's, and the trunk
    under DDP gets its gradient (checkpoints hold the whole weight; one process runs it as a plain fused head)."""
    if not hasattr(model, "use_fused_head"):
        raise ConfigError(f"ride: fused_head needs a RIDE model, got {type(model).__name__}")
    process_group = _class_parallel_group(options)
    classifiers = list(model.classifiers)
    normalize = isinstance(classifiers[0], NormedLinear)
    in_features = classifiers[0].weight.shape[0] if normalize else classifiers[0].in_features
    head = fastlt.LinearRIDELoss(
        loss.class_counts, len(classifiers), in_features, normalize=normalize,
        scale=model.scale if normalize else 1.0, margin_scale=loss.scale, max_margin=loss.max_margin,
        diversity_factor=loss.diversity_factor, temperature_factor=loss.temperature_factor,
        base_temperature=loss.base_temperature, drw_beta=loss.drw_beta, drw_epoch=loss.drw_epoch,
        chunk_size=options.chunk_size, distill_temperature=options.distill_temperature,
        distill_factor=options.distill_factor, distill_scale_by_experts=options.distill_scale_by_experts,
        process_group=process_group, ddp_trunk=process_group is not None,
    ).to(classifiers[0].weight.device)  # moves with the model from here
    start = 0 if process_group is None else fastlt.ops.class_shard(len(loss.class_counts),
                                                                    dist.get_world_size(process_group),
                                                                    dist.get_rank(process_group))[0]
    held = slice(start, start + head.weight.shape[1])  # this rank's classes (all of them in one process)
    with torch.no_grad():
        for index, classifier in enumerate(classifiers):
            head.weight[index].copy_((classifier.weight.t() if normalize else classifier.weight)[held])
            if not normalize:
                head.bias[index].copy_(classifier.bias[held])
    model.use_fused_head(head)
    if options.teacher is None:
        return Method("ride", lambda output, targets: head(output.features, targets), epoch_hook(head))
    return _distilled(options, head.weight.shape[1], head.weight.device, epoch_hook(head),
                      lambda output, targets, teacher_logits: head(output.features, targets, teacher_logits))


def _class_parallel_group(options: RIDEOptions):
    """The process group to shard the fused head's classes over: the default group under `head_parallel: class`
    when torch.distributed runs more than one rank, else None."""
    if options.head_parallel == "none" or not dist.is_initialized() or dist.get_world_size() == 1:
        return None
    return dist.group.WORLD


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
    teacher = build_model(recipe["model"], num_classes)
    # The teacher recipe's own head adaptations (a fused head, LDAM's cosine classifier), so its weights fit. Its loss
    # is never used: any positive class counts will do.
    build_method(rebuild_options(recipe["method"]), torch.ones(num_classes), teacher)
    load_checkpoint(checkpoint, model=teacher, restore_rng=False)
    teacher.requires_grad_(False)
    return teacher.to(device).train(train_mode)
