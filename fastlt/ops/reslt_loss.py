"""fastlt.ops.reslt_loss: ResLT's loss over K branches (main, medium+tail, tail), fused.

    L     = beta * L_ice + (1 - beta) * L_fce
    L_ice = sum_{b, i} g_b(y_i) * CE(z_b(x_i), y_i) / sum_{b, i} g_b(y_i)     (one joint normaliser)
    L_fce = (1 / B) * sum_i CE(sum_b z_b(x_i), y_i)

with g_b(y) = group_masks[b, y] (:func:`reslt_groups`) and CE(x, y) = -log(softmax(x)_y + eps): the official
code's ``-log(softmax + 1e-7)`` with eps = 1e-7, the exact log-softmax cross-entropy with eps = 0 (the op's
default). eps is ``log_eps`` in L_ice and ``fused_log_eps`` in L_fce: the official CIFAR and iNaturalist scripts take
the exact ``nn.CrossEntropyLoss`` for L_fce and 1e-7 in L_ice only, the ImageNet-LT scripts 1e-7 in both.
docs/methods.md 4.3, 4.4 and 6.4 give the definition. That is ``reduction="mean"``; the sums run over
the kept rows (label != ``ignore_index``), ``"sum"`` drops both normalisers and ``"none"`` gives each row's sum of
terms (docs/methods.md 6.5). The K + 1 terms (K branch terms, the fused term) are the op's row terms, which
``return_components`` reports. Per-row math:
csrc/include/fastlt/reslt_loss.h; kernels: csrc/cpu/reslt_loss.cpp, csrc/cuda/reslt_loss.cu, kernels/reslt_loss.py;
tests: tests/ops/test_reslt_loss.py; benchmark: bench/losses.py.

As ride_loss, the kernel computes the loss, its row terms and d loss / d logits in one pass per row and the backward
only scales the saved gradient (second-order gradients and torch.func: the eager formula, fastlt/ops/_fused_loss.py).
"""

from typing import Optional

import torch
import torch.nn.functional as F

from fastlt import _extension
from fastlt.splits import shot_split
from fastlt.ops import _backend, _checks, _fused_loss, _library, _selfcheck

OP = "fastlt.reslt_loss"
# The arguments of fastlt::reslt_loss, as csrc/cpu/reslt_loss.cpp defines them (its Triton overload takes the same).
SCHEMA = ("(Tensor branch_logits, Tensor target, Tensor group_masks, float beta, float log_eps, float fused_log_eps, "
          "int reduction, int ignore_index, bool compute_grad) -> (Tensor, Tensor, Tensor)")
_MEAN = _checks.REDUCTIONS.index("mean")


def reslt_groups(class_counts, *, cutoffs=None, num_branches: int = 3) -> torch.Tensor:
    """ResLT's ``[K, C]`` bool group masks: row 0 every class, row 1 medium + tail, row 2 tail (K = num_branches).

    Without ``cutoffs`` the groups follow the many / medium / few rule (> 100 / 20..100 / < 20 training images,
    :func:`fastlt.splits.shot_split`). ``cutoffs`` (K - 1 label indices) reproduce the papers' hard-coded
    groups instead; the labels must be sorted by frequency and each group runs from its cut-off to the tail end:
    ``[35, 70]`` on CIFAR-100-LT (index order, tail at high labels: labels 35..99 and 70..99), ``[825, 220]`` on
    ImageNet-LT after the ascending-frequency remap (tail at low labels: labels 0..824 and 0..219), ``[6600]`` on
    iNaturalist with 2 branches.

    >>> counts = (500 * 0.01 ** (torch.arange(100) / 99)).floor()          # CIFAR-100-LT, r = 100
    >>> reslt_groups(counts, cutoffs=[35, 70]).sum(1).tolist()
    [100, 65, 30]
    """
    counts = torch.as_tensor(class_counts, dtype=torch.float64).cpu()
    num_classes = counts.numel()
    if num_branches < 1:
        raise ValueError(f"fastlt.reslt_groups: num_branches must be >= 1, got {num_branches}")
    if cutoffs is None:
        groups = _shot_groups(counts, num_branches)
    else:
        groups = _cutoff_groups(counts, list(cutoffs), num_branches)
    masks = torch.ones(num_branches, num_classes, dtype=torch.bool)
    for branch, group in enumerate(groups, start=1):
        masks[branch] = group
        if not group.any():
            raise ValueError(f"fastlt.reslt_groups: group {branch} selects no class (counts / cutoffs leave it empty)")
        if (group & ~masks[branch - 1]).any():
            raise ValueError(f"fastlt.reslt_groups: group {branch} is not inside group {branch - 1}; cutoffs must "
                             "move towards the tail")
    return masks


def _shot_groups(counts, num_branches):
    if num_branches > 3:
        raise ValueError(f"fastlt.reslt_groups: the shot rule gives at most 3 branches, got {num_branches}; pass "
                         "cutoffs")
    _, medium, few = shot_split(counts.numpy())
    groups = []
    for class_ids in (list(medium) + list(few), list(few))[: num_branches - 1]:
        group = torch.zeros(counts.numel(), dtype=torch.bool)
        group[torch.as_tensor(class_ids, dtype=torch.long)] = True
        groups.append(group)
    return groups


def _cutoff_groups(counts, cutoffs, num_branches):
    if len(cutoffs) != num_branches - 1:
        raise ValueError(f"fastlt.reslt_groups: {num_branches} branches need {num_branches - 1} cutoffs, got "
                         f"{cutoffs}")
    tail_at_high_labels = bool(counts[0] >= counts[-1])
    steps = counts.diff()
    if bool((steps > 0).any()) if tail_at_high_labels else bool((steps < 0).any()):
        raise ValueError("fastlt.reslt_groups: cutoffs need labels sorted by class frequency (remap the labels, or "
                         "omit cutoffs to group by the shot rule)")
    labels = torch.arange(counts.numel())
    return [labels >= cutoff if tail_at_high_labels else labels < cutoff for cutoff in cutoffs]


def reslt_loss_reference(branch_logits, target, group_masks, *, beta, log_eps=0.0, fused_log_eps=None,
                         reduction="mean", ignore_index=_checks.DEFAULT_IGNORE_INDEX, return_components=False):
    """Eager PyTorch reference written from the formulas (docs/methods.md 6.4 and 6.5); fp32 math for fp16/bf16
    inputs. With an epsilon > 0 it computes ``-log(softmax + eps)`` literally, as the official ResLT code does.
    The keywords are :func:`reslt_loss`'s."""
    target, _ = _checks.loss_conveniences(target, None)
    reduction = _checks.reduction(OP, reduction)
    ignore_index = _checks.ignore_index(OP, ignore_index)
    fused_log_eps = _validate(branch_logits, target, group_masks, beta, log_eps, fused_log_eps, ignore_index)
    terms = _row_terms(branch_logits, target, group_masks, beta, log_eps, fused_log_eps, reduction, ignore_index)
    loss = _fused_loss.reduce_row_terms(terms, reduction)
    if return_components:
        return loss, _fused_loss.components(terms, _component_names(branch_logits.shape[0]), reduction)
    return loss


def _component_names(num_branches):
    """Where each of ``return_components``' names sits in the ``[B, K + 1]`` row terms (docs/methods.md 6.5)."""
    return {"branch": slice(0, num_branches), "fused": num_branches}


def _row_terms(branch_logits, target, group_masks, beta, log_eps, fused_log_eps, reduction, ignore_index):
    """The ``[B, K + 1]`` row terms in eager PyTorch: column b < K is ``beta * g_b(y) * CE(z_b)``, column K is
    ``(1 - beta) * CE(sum_b z_b)``, each divided by its normaliser under mean (G, the kept (branch, row) pairs in a
    group, clamped to >= 1, and N, the kept rows); an ignored row's terms are 0."""
    logits = branch_logits.to(_checks.accumulate_dtype(branch_logits.dtype))
    num_branches, batch, _ = logits.shape
    kept = target != ignore_index
    labels = torch.where(kept, target, torch.zeros_like(target))  # an ignored row's label is never an index
    # an ignored row's logits are replaced, not only its terms: a zero gradient even for inf / NaN logits there
    logits = torch.where(kept[:, None], logits, torch.zeros((), dtype=logits.dtype, device=logits.device))
    branch_ce = _cross_entropy(logits, labels.expand(num_branches, batch), log_eps)
    in_group = group_masks[:, labels] & kept  # [K, B]: g_b(y_i) of the kept rows
    fused_ce = _cross_entropy(logits.sum(0), labels, fused_log_eps)
    # where, not a product: a branch outside its group (or an ignored row) contributes nothing, even an infinite CE
    # (0 * inf = NaN)
    branch_terms = beta * torch.where(in_group, branch_ce, torch.zeros_like(branch_ce))
    fused_terms = (1 - beta) * torch.where(kept, fused_ce, torch.zeros_like(fused_ce))
    if reduction == _MEAN:
        branch_terms = branch_terms / in_group.sum().clamp_min(1).to(logits)  # no pair in a group: L_ice = 0
        fused_terms = fused_terms / kept.sum().clamp_min(1).to(logits)  # every row ignored: 0
    return torch.cat([branch_terms.T, fused_terms[:, None]], 1)


def _loss_formula(branch_logits, target, group_masks, beta, log_eps, fused_log_eps, reduction, ignore_index):
    """The loss from the fused op's arguments in eager PyTorch: the fused ops' second-order path."""
    terms = _row_terms(branch_logits, target, group_masks, beta, log_eps, fused_log_eps, reduction, ignore_index)
    return _fused_loss.reduce_row_terms(terms, reduction)


def _cross_entropy(logits, target, log_eps):
    """Per-row -log(softmax(logits)_y + log_eps); log_eps = 0 takes the exact log-softmax."""
    if log_eps == 0:
        return -F.log_softmax(logits, dim=-1).gather(-1, target[..., None])[..., 0]
    return -torch.log(F.softmax(logits, dim=-1).gather(-1, target[..., None])[..., 0] + log_eps)


def reslt_loss(branch_logits: torch.Tensor, target: torch.Tensor, group_masks: torch.Tensor, *,
               beta: float, log_eps: float = 0.0, fused_log_eps: Optional[float] = None, reduction: str = "mean",
               ignore_index: int = _checks.DEFAULT_IGNORE_INDEX, return_components: bool = False):
    """ResLT's loss over K branches, computed with its gradient in one pass over the logits.

    Args:
        branch_logits: ``[K, B, C]`` logits of the K branches (main first), any strides; fp32/fp16/bf16 (accumulated
            in fp32) or fp64.
        target: ``[B]`` integer labels in ``[0, C)`` or equal to ``ignore_index`` (int32 and narrower are widened to
            int64).
        group_masks: ``[K, C]`` bool, ``group_masks[b, c]``: class c belongs to branch b's group
            (:func:`reslt_groups`); every row must select a class.
        beta: weight of the branch loss L_ice in [0, 1] (the paper's alpha; 0.995 on CIFAR-100-LT r = 100).
        log_eps: the branch terms' cross-entropy is ``-log(softmax_y + log_eps)``. ``0`` (default) is the exact
            cross-entropy; the official ResLT code uses ``1e-7`` (:class:`fastlt.ResLTLoss`' default), which caps a
            sample's loss at ``-log(1e-7)`` = 16.1 and scales its gradient by ``p_y / (p_y + 1e-7)``.
        fused_log_eps: the same epsilon for the fused term ``CE(sum_b z_b)``; ``None`` (default) takes
            ``log_eps``. The official CIFAR and iNaturalist scripts compute the fused term with the exact
            ``nn.CrossEntropyLoss`` (``fused_log_eps=0``, ``log_eps=1e-7``); the ImageNet-LT scripts use 1e-7 in
            both (docs/methods.md 4.4).
        reduction: ``"mean"`` (the paper's loss): the branch terms ``beta * g_b(y) * CE(z_b)`` summed over branches
            and kept rows and divided by G, the number of (branch, kept row) pairs whose group holds the label, plus
            the fused terms ``(1 - beta) * CE(sum_b z_b)`` summed over kept rows and divided by N, the number of kept
            rows. ``"sum"``: the same sums without the normalisers. ``"none"``: the ``[B]`` per-row sums of the terms
            (they add up to the ``"sum"`` loss). docs/methods.md 6.5.
        ignore_index: rows whose label equals it are skipped: they add nothing to any term or normaliser, their loss
            (``"none"``) is 0 and their logits get a zero gradient. With every row ignored the loss is 0 (where
            ``torch.nn.functional.cross_entropy`` gives NaN under ``"mean"``).
        return_components: also return ``{"branch": [K], "fused": []}``, the terms reduced as the loss is (a leading
            ``[B]`` dimension under ``"none"``), detached; they add up to the loss.

    Returns the loss (a scalar, or ``[B]`` under ``"none"``) in the accumulation dtype (fp32 for fp16/bf16 inputs;
    the gradient keeps ``branch_logits.dtype``), differentiable in ``branch_logits``; ``(loss, components)`` with
    ``return_components``. L_ice is 0 when no kept label of the batch is in any group (impossible when row 0 selects
    every class, as in ResLT). A NaN logit of a kept row makes the loss and the gradient of its row (every branch,
    through the fused logits) NaN.

    >>> counts = (500 * 0.01 ** (torch.arange(100) / 99)).floor()
    >>> groups = fastlt.ops.reslt_groups(counts, cutoffs=[35, 70])
    >>> loss = fastlt.ops.reslt_loss(torch.randn(3, 8, 100), torch.randint(0, 100, (8,)), groups, beta=0.995)
    """
    target, _ = _checks.loss_conveniences(target, None)
    reduction_code = _checks.reduction(OP, reduction)
    ignore_index = _checks.ignore_index(OP, ignore_index)
    fused_log_eps = _validate(branch_logits, target, group_masks, beta, log_eps, fused_log_eps, ignore_index)
    backend = _backend.resolve(OP, branch_logits)
    if backend == "reference":
        return reslt_loss_reference(branch_logits, target, group_masks, beta=beta, log_eps=log_eps,
                                    fused_log_eps=fused_log_eps, reduction=reduction, ignore_index=ignore_index,
                                    return_components=return_components)
    compute_grad = branch_logits.requires_grad and torch.is_grad_enabled()
    loss, _, terms = _library.overload("reslt_loss", backend)(branch_logits, target, group_masks, float(beta),
                                                               float(log_eps), float(fused_log_eps), reduction_code,
                                                               ignore_index, compute_grad)
    if return_components:
        return loss, _fused_loss.components(terms, _component_names(branch_logits.shape[0]), reduction_code)
    return loss


def _validate(branch_logits, target, group_masks, beta, log_eps, fused_log_eps, ignore_index):
    """Checks the arguments; returns the fused term's epsilon (``log_eps`` when ``fused_log_eps`` is None)."""
    _checks.tensor(OP, "branch_logits", branch_logits, dims=3, floating=True)
    num_branches, batch, num_classes = branch_logits.shape
    if num_branches > _checks.MAX_EXPERTS:
        raise ValueError(
            f"{OP}: branch_logits has {num_branches} branches; at most {_checks.MAX_EXPERTS} are supported")
    _checks.labels(OP, "target", target, batch, num_classes, ignore_index)
    _checks.same_device(OP, "target", target, branch_logits, "branch_logits")
    check_group_masks(OP, group_masks, num_branches, num_classes, branch_logits, "branch_logits")
    return validate_hyperparameters(beta=beta, log_eps=log_eps, fused_log_eps=fused_log_eps)


def validate_hyperparameters(*, beta, log_eps, fused_log_eps=None, op=OP):
    """ValueError naming the first hyper-parameter of ResLT's loss outside its domain: the one check of every op and
    module computing the loss (reslt_loss and its reference on every backend, linear_reslt_loss, ResLTLoss).
    Returns the fused term's epsilon (``log_eps`` when ``fused_log_eps`` is None)."""
    _checks.number(op, "beta", beta, low=0.0, high=1.0)
    log_eps = _checks.number(op, "log_eps", log_eps, low=0.0)
    if fused_log_eps is None:
        return log_eps
    return _checks.number(op, "fused_log_eps", fused_log_eps, low=0.0)


def check_group_masks(op, group_masks, num_branches, num_classes, reference, reference_name):
    """``group_masks`` must be a bool [K, C] tensor on ``reference``'s device whose every row selects a class;
    ValueError naming ``op`` otherwise (also for fastlt.ops.linear_reslt_loss)."""
    _checks.tensor(op, "group_masks", group_masks, dims=2)
    if group_masks.dtype != torch.bool:
        raise ValueError(f"{op}: group_masks must be bool, got {group_masks.dtype}")
    if tuple(group_masks.shape) != (num_branches, num_classes):
        raise ValueError(f"{op}: group_masks must be [K, C]=[{num_branches}, {num_classes}], got "
                         f"{tuple(group_masks.shape)}")
    _checks.same_device(op, "group_masks", group_masks, reference, reference_name)
    if not torch.compiler.is_compiling() and not bool(group_masks.any(1).all()):
        empty_row = int((~group_masks.any(1)).nonzero()[0])
        raise ValueError(f"{op}: group_masks row {empty_row} selects no class")


def _num_terms(branch_logits, *args):
    return branch_logits.shape[0] + 1  # K branch terms and the fused term


if _extension.AVAILABLE:
    _fused_loss.register("fastlt::reslt_loss", _loss_formula, _fused_loss.fake_loss_forward(_num_terms))


def _reslt_loss_triton(branch_logits, target, group_masks, beta, log_eps, fused_log_eps, reduction, ignore_index,
                       compute_grad):
    from fastlt.kernels import reslt_loss as kernel

    if reduction not in range(len(_checks.REDUCTIONS)):
        raise ValueError(f"{OP}: reduction must be 0 (none), 1 (mean) or 2 (sum), got {reduction}")
    _checks.fused_loss_inputs(OP, "branch_logits", branch_logits, target, _checks.MAX_EXPERTS, ignore_index)
    num_branches, _, num_classes = branch_logits.shape
    _checks.fused_loss_table(OP, "group_masks", group_masks, (num_branches, num_classes), branch_logits,
                             dtype=torch.bool)
    if not bool(group_masks.any(1).all()):
        raise ValueError(f"{OP}: every row of group_masks must select a class")
    validate_hyperparameters(beta=beta, log_eps=log_eps, fused_log_eps=fused_log_eps)
    return kernel.forward(branch_logits, target, group_masks, beta, log_eps, fused_log_eps, reduction, ignore_index,
                          compute_grad)


_library.define_triton("reslt_loss", SCHEMA, _reslt_loss_triton)
_fused_loss.register("fastlt::reslt_loss.triton", _loss_formula, _fused_loss.fake_loss_forward(_num_terms))


@_selfcheck.case(OP)
def selfcheck_case(device, dtype, tiny):
    """The op's self-check (`fastlt doctor`, the CUDA kernel's first use; fastlt/ops/_selfcheck.py): ``(call,
    inputs)``."""
    logits, target, counts = _selfcheck.loss_sample(device, dtype, tiny, scale=3)
    num_classes = counts.numel()
    groups = reslt_groups(counts.cpu(), cutoffs=[num_classes // 3, 2 * num_classes // 3]).to(device)
    return (lambda x: reslt_loss(x, target, groups, beta=0.5)), (logits,)
