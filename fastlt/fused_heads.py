"""Classifier heads fused with their long-tailed loss (:func:`fastlt.ops.linear_ride_loss`): for large class counts,
training never holds the [E, B, C] logits; inference still returns them."""

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from fastlt import class_shards, ops
from fastlt.losses import _counts_buffer
from fastlt.ops import _checks
from fastlt.ops.linear_ride_loss import OP, check_reduction, expert_logits
from fastlt.ops.ride_loss import validate_hyperparameters


class LinearRIDELoss(nn.Module):
    """RIDE's E cosine classifiers (NormedLinear x ``scale``) and RIDE's loss in one module, a drop-in for
    ``NormedLinear`` heads + :class:`fastlt.RIDELoss`: ``forward(features, target)`` is the loss of the logits
    ``scale * cos(x_k, w_kc)`` computed chunk by chunk (:func:`fastlt.ops.linear_ride_loss`), ``logits(features)``
    the [E, B, C] logits for inference.

    Holds ``weight`` [E, C, D] (one row per class; NormedLinear's is its transpose, [D, C]) and, with
    ``normalize=False``, a ``bias`` [E, C] (RIDE's nn.Linear heads). The DRW schedule is RIDELoss's: ``set_epoch``
    with the 0-based epoch, DRW on for ``epoch >= drw_epoch``. The loss arguments are RIDELoss's, with its ``scale``
    (LDAM's s) named ``margin_scale`` here; ``scale`` is the classifier's. ``reduction`` (``"mean"`` or ``"sum"``;
    ``"none"`` is refused, see :func:`fastlt.ops.linear_ride_loss`) and ``ignore_index`` are RIDELoss's.

    Distillation (RIDE's teacher, docs/methods.md 3.3, as :class:`fastlt.RIDEDistillLoss`): ``forward(features,
    target, teacher_logits)`` adds ``distill_factor * T^2 * KL(softmax(t / T) || softmax(mean_k z_k / T))``
    (``T = distill_temperature``; batchmean under "mean", summed under "sum", over every row: it needs no label) and
    multiplies the total by E with ``distill_scale_by_experts``. The students' mean logits come from one GEMM over
    the experts' concatenated features (:meth:`mean_logits`): [B, C], as big as the teacher's, never [E, B, C].

    Class-parallel (docs/methods.md 8.6): with a ``process_group`` of W ranks the module holds this rank's contiguous
    shard of the classes (``weight`` [E, n, D], ``fastlt.ops.class_shard``) and ``forward(features, target)`` takes
    this rank's rows and returns the whole batch's loss (``fastlt.ops.linear_ride_loss(process_group=...)``;
    ``ddp_trunk=True`` when the features come from a DistributedDataParallel trunk). Its state dict holds the whole
    [E, C, D] weight (gathered on the group's first rank: ``state_dict()`` is a collective) and it loads a whole
    weight on any number of ranks; :meth:`logits` and :meth:`topk` give every rank the prediction over all classes of
    the same rows. Distillation needs one process.

    >>> head = fastlt.LinearRIDELoss(torch.linspace(500, 5, 1000).floor(), num_experts=3, in_features=16)
    >>> features = torch.randn(3, 8, 16)                 # [E, B, D], one feature row per expert
    >>> head(features, torch.randint(0, 1000, (8,))).backward()
    >>> head.logits(features).shape
    torch.Size([3, 8, 1000])
    """

    def __init__(self, class_counts, num_experts: int, in_features: int, *, normalize: bool = True,
                 scale: float = 30.0, margin_scale: float = 30.0, max_margin: float = 0.5,
                 diversity_factor: float = -0.45, temperature_factor: float = 0.05, base_temperature: float = 1.0,
                 drw_beta: float = 0.9999, drw_epoch: int = 160, chunk_size: Optional[int] = None,
                 reduction: str = "mean", ignore_index: int = _checks.DEFAULT_IGNORE_INDEX,
                 distill_temperature: float = 1.5, distill_factor: float = 1.0, distill_scale_by_experts: bool = True,
                 process_group=None, ddp_trunk: bool = False):
        super().__init__()
        check_reduction(reduction)
        _checks.number(OP, "scale", scale, low=0.0, low_open=True)
        validate_hyperparameters(scale=margin_scale, max_margin=max_margin, diversity_factor=diversity_factor,
                                 temperature_factor=temperature_factor, base_temperature=base_temperature,
                                 drw_beta=drw_beta, op=OP, scale_name="margin_scale")
        _checks.chunk_size(OP, chunk_size)
        self.distill_temperature = _checks.number(OP, "distill_temperature", distill_temperature, low=0.0,
                                                  low_open=True)
        self.distill_factor = _checks.number(OP, "distill_factor", distill_factor)
        self.distill_scale_by_experts = bool(distill_scale_by_experts)
        self.reduction, self.ignore_index = reduction, _checks.ignore_index(OP, ignore_index)
        self.register_buffer("class_counts", _counts_buffer(class_counts), persistent=False)
        num_classes = self.class_counts.numel()
        self.process_group, self.ddp_trunk = process_group, bool(ddp_trunk)
        shard = None if process_group is None else class_shards.ClassShard.of_group(OP, process_group, num_classes, 1)
        held = num_classes if shard is None else shard.stop - shard.start  # this rank's classes
        self.normalize, self.scale, self.margin_scale, self.max_margin = normalize, scale, margin_scale, max_margin
        self.diversity_factor, self.temperature_factor = diversity_factor, temperature_factor
        self.base_temperature, self.drw_beta, self.drw_epoch, self.chunk_size = (base_temperature, drw_beta,
                                                                                 drw_epoch, chunk_size)
        self.weight = nn.Parameter(torch.empty(num_experts, held, in_features))
        if normalize:  # NormedLinear's init: uniform(-1, 1), each class's row renormalised to unit norm
            self.weight.data.uniform_(-1, 1).renorm_(2, 1, 1e-5).mul_(1e5)
            self.bias = None
        else:  # nn.Linear's init
            bound = 1 / math.sqrt(in_features)
            self.weight.data.uniform_(-bound, bound)
            self.bias = nn.Parameter(torch.empty(num_experts, held).uniform_(-bound, bound))
        if shard is not None:
            sharded = [name for name in ("weight", "bias") if getattr(self, name) is not None]
            for name in sharded:
                class_shards.mark(getattr(self, name), shard)
            class_shards.register_state_dict_hooks(self, sharded)
        self.set_epoch(0)

    def set_epoch(self, epoch: int) -> None:
        """Set the current 0-based epoch; DRW is on for ``epoch >= drw_epoch``."""
        self.epoch = int(epoch)
        self.drw = self.epoch >= self.drw_epoch

    def forward(self, features: torch.Tensor, target: torch.Tensor,
                teacher_logits: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The loss of features [E, B, D] (or [B, D] shared by the experts) and labels [B]; with the teacher's
        ``teacher_logits`` [B, C] (taken as constants), RIDE's distillation loss (see the class docstring)."""
        loss = self._ride_loss(features, target)
        if teacher_logits is None:
            return loss
        if self.process_group is not None:
            raise ValueError(f"{OP}: distillation (teacher_logits) needs one process; this head is class-parallel")
        num_experts, num_classes = self.weight.shape[:2]
        batch = features.shape[-2]
        if not isinstance(teacher_logits, torch.Tensor) or tuple(teacher_logits.shape) != (batch, num_classes):
            raise ValueError(f"{OP}: teacher_logits must be a [B, C] = [{batch}, {num_classes}] tensor, got "
                             f"{getattr(teacher_logits, 'shape', type(teacher_logits).__name__)}")
        temperature = self.distill_temperature
        student = self.mean_logits(features).to(loss.dtype) / temperature
        teacher = teacher_logits.detach().to(student.dtype) / temperature
        kl = F.kl_div(F.log_softmax(student, dim=1), F.log_softmax(teacher, dim=1), log_target=True,
                      reduction="batchmean" if self.reduction == "mean" else "sum")
        loss = loss + self.distill_factor * temperature ** 2 * kl
        return loss * num_experts if self.distill_scale_by_experts else loss

    def mean_logits(self, features: torch.Tensor) -> torch.Tensor:
        """The experts' mean logits [B, C] of features [E, B, D] or [B, D]: sum_k x_k . w_kc / E is one GEMM of the
        experts' concatenated (normalised) features [B, E * D] and weights [C, E * D], so the [E, B, C] logits are
        never formed (class-parallel: of this rank's classes, [B, n])."""
        num_experts, num_classes, dim = self.weight.shape
        features = features.expand(num_experts, *features.shape[-2:])
        weight = self.weight
        if self.normalize:
            features, weight = F.normalize(features, dim=-1), F.normalize(weight, dim=-1)
        factor = (self.scale if self.normalize else 1.0) / num_experts
        logits = (features.transpose(0, 1).reshape(-1, num_experts * dim)
                  @ weight.transpose(0, 1).reshape(num_classes, num_experts * dim).t()) * factor
        return logits if self.bias is None else logits + self.bias.mean(0)

    def _ride_loss(self, features, target):
        return ops.linear_ride_loss(
            features, self.weight, target, self.class_counts, normalize=self.normalize, scale=self.scale,
            bias=self.bias, margin_scale=self.margin_scale, max_margin=self.max_margin,
            diversity_factor=self.diversity_factor, temperature_factor=self.temperature_factor,
            base_temperature=self.base_temperature, drw=self.drw, drw_beta=self.drw_beta,
            chunk_size=self.chunk_size, reduction=self.reduction, ignore_index=self.ignore_index,
            process_group=self.process_group, ddp_trunk=self.ddp_trunk)

    def logits(self, features: torch.Tensor, expert: Optional[int] = None) -> torch.Tensor:
        """[E, B, C] logits of features [E, B, D] or [B, D] (inference: the training loss never forms them);
        with ``expert``: that expert's [B, C] logits of its features [B, D]. Class-parallel: every rank passes the
        same rows and gets their logits over all classes (its shard's, all-gathered)."""
        if expert is None:
            logits = expert_logits(features, self.weight, normalize=self.normalize, scale=self.scale, bias=self.bias)
        else:
            bias = None if self.bias is None else self.bias[expert:expert + 1]
            logits = expert_logits(features, self.weight[expert:expert + 1], normalize=self.normalize,
                                   scale=self.scale, bias=bias)[0]
        if self.process_group is None:
            return logits
        return class_shards.class_shard_of(self.weight).all_gather(logits, dim=-1)

    def topk(self, features: torch.Tensor, k: int) -> tuple:
        """(values, classes) [B, k] of the experts' mean logits' k largest (the prediction: k = 1), without the
        [E, B, C] logits; class-parallel, every rank passes the same rows and only W x B x k candidates are
        exchanged."""
        logits = self.mean_logits(features)
        if self.process_group is None:
            return logits.topk(k, dim=-1)
        return class_shards.class_shard_of(self.weight).topk(logits, k)

    def single_process_copy(self) -> "LinearRIDELoss":
        """This head for one process (no process group) with the whole [E, C, D] weight, freshly initialised: load a
        checkpoint into it (rank 0 evaluating after a class-parallel run, whose checkpoints hold whole weights). No
        collective."""
        copy = LinearRIDELoss(
            self.class_counts, self.weight.shape[0], self.weight.shape[2], normalize=self.normalize, scale=self.scale,
            margin_scale=self.margin_scale, max_margin=self.max_margin, diversity_factor=self.diversity_factor,
            temperature_factor=self.temperature_factor, base_temperature=self.base_temperature,
            drw_beta=self.drw_beta, drw_epoch=self.drw_epoch, chunk_size=self.chunk_size, reduction=self.reduction,
            ignore_index=self.ignore_index, distill_temperature=self.distill_temperature,
            distill_factor=self.distill_factor, distill_scale_by_experts=self.distill_scale_by_experts)
        copy.set_epoch(self.epoch)
        return copy.to(self.weight.device)

    def extra_repr(self) -> str:
        num_experts, held, in_features = self.weight.shape
        return (f"num_experts={num_experts}, num_classes={self.class_counts.numel()}, in_features={in_features}, "
                f"normalize={self.normalize}, scale={self.scale}, margin_scale={self.margin_scale}, "
                f"diversity_factor={self.diversity_factor}, drw_epoch={self.drw_epoch}, epoch={self.epoch}, "
                f"drw={self.drw}" + ("" if self.process_group is None else f", classes held here={held}"))
