"""nn.Module wrappers of fastlt's fused long-tailed losses: RIDE, ResLT and the prior-shifted (Balanced Softmax /
logit-adjusted) cross-entropy.

Each module holds the per-class state (class counts, group masks) and the schedule (RIDE's DRW switch) and calls
the functional op in ``fastlt.ops``, so the module and the op give the same numbers. Inputs are the stacked
``[E, B, C]`` expert (branch) logits or a list of E ``[B, C]`` tensors; a list that came from one stacked buffer
(``torch.stack(...).unbind(0)``, ``linear_out.split(C, dim=-1)``, ...) is read in place (see :func:`stack_experts`).

>>> counts = torch.tensor([500.0, 120, 40, 8])
>>> criterion = fastlt.RIDELoss(counts, drw_epoch=160)
>>> criterion.set_epoch(160)                    # 0-based: DRW and per-class temperatures from epoch 160
>>> loss = criterion([torch.randn(6, 4) * 30 for _ in range(3)], torch.randint(0, 4, (6,)))
"""

from typing import Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import nn

from fastlt import ops
from fastlt.ops import _checks, _lt_constants
from fastlt.ops.prior_shifted_ce import validate_hyperparameters as _validate_prior_shifted_hyperparameters
from fastlt.ops.reslt_loss import validate_hyperparameters as _validate_reslt_hyperparameters
from fastlt.ops.ride_loss import validate_hyperparameters as _validate_ride_hyperparameters

ExpertLogits = Union[torch.Tensor, Sequence[torch.Tensor]]


def stack_experts(expert_logits: ExpertLogits) -> torch.Tensor:
    """The ``[E, B, C]`` tensor of E expert logits given stacked or as a list of ``[B, C]`` tensors.

    A list whose elements are views of one tensor with equal shapes and strides, at storage offsets a constant
    positive step apart, becomes an ``as_strided`` view of that tensor: no copy, and the gradient flows to the
    tensor they are views of. Any other list (and any list under torch.compile) is copied by ``torch.stack``.

    >>> stacked = torch.randn(3, 8, 10)
    >>> stack_experts(list(stacked)).data_ptr() == stacked.data_ptr()
    True
    """
    if isinstance(expert_logits, torch.Tensor):
        return expert_logits
    experts = list(expert_logits)
    if not experts or not all(isinstance(expert, torch.Tensor) for expert in experts):
        raise TypeError("stack_experts: expert_logits must be a tensor or a non-empty list of tensors")
    if torch.compiler.is_compiling():  # dynamo cannot trace storage offsets; the compiler plans the copy itself
        return torch.stack(experts)
    view = _view_of_common_base(experts)
    return torch.stack(experts) if view is None else view


def _view_of_common_base(experts):
    """The [E, ...] as_strided view over the experts' common base tensor, or None when they do not form one."""
    first = experts[0]
    if len(experts) == 1:
        return first.unsqueeze(0)
    base = first._base
    if base is None:
        return None
    step = experts[1].storage_offset() - first.storage_offset()
    for index, expert in enumerate(experts):
        same_layout = (expert._base is base and expert.shape == first.shape and expert.stride() == first.stride()
                       and expert.dtype == first.dtype and expert.requires_grad == base.requires_grad)
        if not same_layout or expert.storage_offset() != first.storage_offset() + index * step:
            return None
    if step <= 0:  # as_strided takes no negative strides; a zero step repeats one tensor
        return None
    return base.as_strided((len(experts), *first.shape), (step, *first.stride()), first.storage_offset())


def _counts_buffer(class_counts, *, allow_zero: bool = False) -> torch.Tensor:
    """Class counts as fp64 (exact for any count; the ops derive their [C] tables in fp64)."""
    counts = torch.as_tensor(class_counts, dtype=torch.float64)
    if not allow_zero:
        _lt_constants.check_class_counts("fastlt.losses", counts, counts.numel())
    elif not bool((torch.isfinite(counts) & (counts >= 0)).all()):
        raise ValueError(f"fastlt.losses: class_counts must be finite and >= 0, got {counts.tolist()}")
    return counts


def _reduction_arguments(owner: str, reduction, ignore_index):
    """``reduction`` and ``ignore_index`` checked when the module is built (as torch.nn.CrossEntropyLoss takes them)."""
    _checks.reduction(owner, reduction)
    return reduction, _checks.ignore_index(owner, ignore_index)


def _reduction_repr(module) -> str:
    """The non-default reduction arguments for extra_repr."""
    text = "" if module.reduction == "mean" else f", reduction={module.reduction!r}"
    if module.ignore_index != _checks.DEFAULT_IGNORE_INDEX:
        text += f", ignore_index={module.ignore_index}"
    return text


class RIDELoss(nn.Module):
    """RIDE's stage-1 loss (per-expert LDAM-DRW + distribution-aware diversity KL), :func:`fastlt.ops.ride_loss`.

    The deferred re-weighting phase follows the official schedule: call ``set_epoch(epoch)`` with the 0-based
    epoch before each epoch (torch's ``DistributedSampler.set_epoch`` and Lightning's convention); DRW class weights
    and per-class diversity temperatures are on for ``epoch >= drw_epoch``. With ``drw_epoch=160`` that is 0-based
    epochs 160..199, the official 1-based ``epoch > 160`` (161..200). Before the first ``set_epoch`` the loss is at
    epoch 0. Only the on/off state reaches ``forward``, so a ``torch.compile``-d step recompiles once, at the
    switch, not every epoch. ``diversity_factor=0`` gives (individual) LDAM-DRW. Arguments as in
    :func:`fastlt.ops.ride_loss`, including ``reduction`` ("mean", "sum", "none") and ``ignore_index``; call it with
    ``return_components=True`` for ``(loss, {"ce": [E], "diversity": [E]})`` (docs/methods.md 6.5).

    >>> criterion = fastlt.RIDELoss(torch.linspace(500, 5, 100).floor())
    >>> criterion.set_epoch(159); criterion.drw
    False
    >>> criterion.set_epoch(160); criterion.drw
    True
    >>> criterion
    RIDELoss(num_classes=100, scale=30.0, max_margin=0.5, diversity_factor=-0.45, temperature_factor=0.05,
             base_temperature=1.0, drw_beta=0.9999, drw_epoch=160, epoch=160, drw=True)
    >>> loss = criterion(torch.randn(3, 8, 100) * 30, torch.randint(0, 100, (8,)))
    """

    def __init__(self, class_counts, *, scale: float = 30.0, max_margin: float = 0.5,
                 diversity_factor: float = -0.45, temperature_factor: float = 0.05, base_temperature: float = 1.0,
                 drw_beta: float = 0.9999, drw_epoch: int = 160, reduction: str = "mean",
                 ignore_index: int = _checks.DEFAULT_IGNORE_INDEX):
        super().__init__()
        # Not persistent: the counts come from the dataset at construction, not from a checkpoint.
        self.register_buffer("class_counts", _counts_buffer(class_counts), persistent=False)
        self.reduction, self.ignore_index = _reduction_arguments("fastlt.RIDELoss", reduction, ignore_index)
        self.scale, self.max_margin, self.diversity_factor = scale, max_margin, diversity_factor
        self.temperature_factor, self.base_temperature = temperature_factor, base_temperature
        self.drw_beta, self.drw_epoch = drw_beta, drw_epoch
        _validate_ride_hyperparameters(scale=scale, max_margin=max_margin, diversity_factor=diversity_factor,
                                       temperature_factor=temperature_factor, base_temperature=base_temperature,
                                       drw_beta=drw_beta)
        self.set_epoch(0)

    def set_epoch(self, epoch: int) -> None:
        """Set the current 0-based epoch; DRW is on for ``epoch >= drw_epoch``."""
        self.epoch = int(epoch)
        self.drw = self.epoch >= self.drw_epoch  # forward reads only this bool (one recompile under torch.compile)

    def forward(self, expert_logits: ExpertLogits, target: torch.Tensor, *, return_components: bool = False):
        return ops.ride_loss(stack_experts(expert_logits), target, self.class_counts, scale=self.scale,
                             max_margin=self.max_margin, diversity_factor=self.diversity_factor,
                             temperature_factor=self.temperature_factor, base_temperature=self.base_temperature,
                             drw=self.drw, drw_beta=self.drw_beta, reduction=self.reduction,
                             ignore_index=self.ignore_index, return_components=return_components)

    def extra_repr(self) -> str:
        return (f"num_classes={self.class_counts.numel()}, scale={self.scale}, max_margin={self.max_margin}, "
                f"diversity_factor={self.diversity_factor}, temperature_factor={self.temperature_factor}, "
                f"base_temperature={self.base_temperature}, drw_beta={self.drw_beta}, drw_epoch={self.drw_epoch}, "
                f"epoch={self.epoch}, drw={self.drw}{_reduction_repr(self)}")


class RIDEDistillLoss(nn.Module):
    """RIDE with knowledge distillation from a trained teacher (docs/methods.md 3.3; the official
    ``RIDELossWithDistill``):

        loss = E * (RIDE(z_1..z_E) + distill_factor * T^2 * KL(softmax(t / T) || softmax(mean_k z_k / T)))

    with the KL averaged over the batch (``batchmean``), ``t`` the teacher's (mean) logits, taken as constants, and
    ``T = temperature`` (1.5 in every official config). The factor E reproduces the official code, which adds both
    terms once per student expert; ``scale_by_experts=False`` drops it (same minimum, E times smaller gradients,
    which interacts with weight decay: keep the default to match the papers' numbers). The KL is reduced as
    ``ride_loss.reduction`` says (``batchmean`` for "mean"); it needs no label, so rows whose label is
    ``ride_loss.ignore_index`` still learn from the teacher.

    >>> criterion = RIDEDistillLoss(RIDELoss(torch.tensor([50.0, 20, 5])))
    >>> student, teacher = torch.randn(3, 4, 3) * 30, torch.randn(4, 3) * 30
    >>> loss = criterion(student, torch.tensor([0, 1, 2, 0]), teacher)
    """

    def __init__(self, ride_loss: RIDELoss, *, temperature: float = 1.5, distill_factor: float = 1.0,
                 scale_by_experts: bool = True):
        super().__init__()
        _checks.number("RIDEDistillLoss", "temperature", temperature, low=0.0, low_open=True)
        _checks.number("RIDEDistillLoss", "distill_factor", distill_factor)
        self.ride_loss = ride_loss
        self.temperature, self.distill_factor, self.scale_by_experts = temperature, distill_factor, scale_by_experts

    def set_epoch(self, epoch: int) -> None:
        """The RIDE loss's DRW switch (0-based epoch, as :meth:`RIDELoss.set_epoch`)."""
        self.ride_loss.set_epoch(epoch)

    def forward(self, expert_logits: ExpertLogits, target: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
        stacked = stack_experts(expert_logits)
        if teacher_logits.shape != stacked.shape[1:]:
            raise ValueError(f"RIDEDistillLoss: teacher_logits must be [B, C] = {list(stacked.shape[1:])}, got "
                             f"{list(teacher_logits.shape)}")
        student = ops.expert_aggregate(stacked, reduce="mean") / self.temperature
        teacher = teacher_logits.detach().to(student.dtype) / self.temperature
        reduction = self.ride_loss.reduction  # the KL is reduced as the RIDE loss: batchmean, sum or per row
        kl = F.kl_div(F.log_softmax(student, dim=1), F.log_softmax(teacher, dim=1), log_target=True,
                      reduction="batchmean" if reduction == "mean" else "none")
        if reduction != "mean":
            kl = kl.sum(1) if reduction == "none" else kl.sum()
        loss = self.ride_loss(stacked, target) + self.distill_factor * self.temperature**2 * kl
        return loss * stacked.shape[0] if self.scale_by_experts else loss

    def extra_repr(self) -> str:  # the wrapped RIDELoss prints itself as a child module
        return (f"temperature={self.temperature}, distill_factor={self.distill_factor}, "
                f"scale_by_experts={self.scale_by_experts}")


class ResLTLoss(nn.Module):
    """ResLT's loss ``beta * L_ice + (1 - beta) * L_fce`` over K branches, :func:`fastlt.ops.reslt_loss`.

    ``groups`` is either the ``[K, C]`` bool group masks (row 0: all classes; then medium+tail, tail) or the class
    counts, from which :func:`fastlt.ops.reslt_groups` builds them (``cutoffs``, ``num_branches`` as there).

    The branch terms' cross-entropy is ``-log(softmax_y + log_eps)`` with the official code's ``log_eps = 1e-7`` by
    default (ResLT's ``crossEntropy``: ``torch.log(softmax(logit) + 1e-7)``), which caps a sample's loss at 16.1 and
    scales its gradient by ``p_y / (p_y + 1e-7)``; ``log_eps=0`` gives the exact log-softmax cross-entropy. The fused
    term's is ``-log(softmax_y + fused_log_eps)``, ``fused_log_eps=None`` taking ``log_eps`` (the official ImageNet-LT
    scripts); the official CIFAR and iNaturalist scripts compute it with the exact ``nn.CrossEntropyLoss``:
    ``fused_log_eps=0`` (docs/methods.md 4.4).
    ``reduction``, ``ignore_index`` and ``return_components=True`` (``(loss, {"branch": [K], "fused": []})``) as in
    :func:`fastlt.ops.reslt_loss` (docs/methods.md 6.5).

    >>> criterion = fastlt.ResLTLoss(torch.linspace(500, 5, 100).floor(), beta=0.995, cutoffs=[35, 70],
    ...                              fused_log_eps=0.0)          # the official CIFAR-100-LT script
    >>> loss = criterion(torch.randn(3, 8, 100), torch.randint(0, 100, (8,)))
    """

    OFFICIAL_LOG_EPS = 1e-7

    def __init__(self, groups, *, beta: float, cutoffs=None, num_branches: int = 3,
                 log_eps: float = OFFICIAL_LOG_EPS, fused_log_eps: Optional[float] = None, reduction: str = "mean",
                 ignore_index: int = _checks.DEFAULT_IGNORE_INDEX):
        super().__init__()
        self.reduction, self.ignore_index = _reduction_arguments("fastlt.ResLTLoss", reduction, ignore_index)
        groups = torch.as_tensor(groups)
        if groups.dtype != torch.bool:  # class counts; a class without samples belongs to the tail groups
            groups = ops.reslt_groups(_counts_buffer(groups, allow_zero=True), cutoffs=cutoffs,
                                      num_branches=num_branches)
        self.register_buffer("group_masks", groups, persistent=False)
        _validate_reslt_hyperparameters(beta=beta, log_eps=log_eps, fused_log_eps=fused_log_eps, op="fastlt.ResLTLoss")
        self.beta, self.log_eps = beta, log_eps
        self.fused_log_eps = log_eps if fused_log_eps is None else fused_log_eps

    def forward(self, branch_logits: ExpertLogits, target: torch.Tensor, *, return_components: bool = False):
        return ops.reslt_loss(stack_experts(branch_logits), target, self.group_masks, beta=self.beta,
                              log_eps=self.log_eps, fused_log_eps=self.fused_log_eps, reduction=self.reduction,
                              ignore_index=self.ignore_index, return_components=return_components)

    def extra_repr(self) -> str:
        num_branches, num_classes = self.group_masks.shape
        return (f"num_branches={num_branches}, num_classes={num_classes}, beta={self.beta}, log_eps={self.log_eps}, "
                f"fused_log_eps={self.fused_log_eps}{_reduction_repr(self)}")


class PriorShiftedCE(nn.Module):
    """Sum over experts of ``CE(z_k + tau_k * log(pi), y)`` (Balanced Softmax: one expert, tau = 1),
    :func:`fastlt.ops.prior_shifted_ce`. ``taus`` has one value per expert, or is one number for every expert.
    Single-head ``[B, C]`` logits, ``[B, C]`` probability targets (Mixup), ``label_smoothing``, ``reduction``,
    ``ignore_index`` and ``return_components=True`` (``(loss, {"ce": [E]})``) are taken as the op takes them
    (docs/methods.md 6.5).

    >>> criterion = fastlt.PriorShiftedCE(torch.linspace(500, 5, 100).floor(), taus=1.0)
    >>> loss = criterion(torch.randn(8, 100), torch.randint(0, 100, (8,)))
    """

    def __init__(self, class_counts, taus: Union[float, Sequence[float]], *, label_smoothing: float = 0.0,
                 reduction: str = "mean", ignore_index: int = _checks.DEFAULT_IGNORE_INDEX):
        super().__init__()
        self.reduction, self.ignore_index = _reduction_arguments("fastlt.PriorShiftedCE", reduction, ignore_index)
        self.register_buffer("class_counts", _counts_buffer(class_counts), persistent=False)
        _validate_prior_shifted_hyperparameters(taus=taus, label_smoothing=label_smoothing, op="fastlt.PriorShiftedCE")
        self.taus = float(taus) if isinstance(taus, (int, float)) else [float(tau) for tau in taus]
        self.label_smoothing = float(label_smoothing)

    def forward(self, expert_logits: ExpertLogits, target: torch.Tensor, *, return_components: bool = False):
        return ops.prior_shifted_ce(stack_experts(expert_logits), target, self.class_counts, taus=self.taus,
                                    label_smoothing=self.label_smoothing, reduction=self.reduction,
                                    ignore_index=self.ignore_index, return_components=return_components)

    def extra_repr(self) -> str:
        return (f"num_classes={self.class_counts.numel()}, taus={self.taus}, label_smoothing={self.label_smoothing}"
                f"{_reduction_repr(self)}")
