"""fastlt.ops.reslt_loss: ResLT's loss over K branches (main, medium+tail, tail), fused.

    L     = beta * L_ice + (1 - beta) * L_fce
    L_ice = sum_{b, i} g_b(y_i) * CE(z_b(x_i), y_i) / sum_{b, i} g_b(y_i)     (one joint normaliser)
    L_fce = (1 / B) * sum_i CE(sum_b z_b(x_i), y_i)

with g_b(y) = group_masks[b, y] (:func:`reslt_groups`) and CE(x, y) = -log(softmax(x)_y + log_eps): the official
code's ``-log(softmax + 1e-7)`` with ``log_eps=1e-7``, the exact log-softmax cross-entropy with ``log_eps=0`` (the
op's default). docs/methods.md 4.3, 4.4 and 6.4 give the definition. Per-row math:
csrc/include/fastlt/reslt_loss.h; kernels: csrc/cpu/reslt_loss.cpp, csrc/cuda/reslt_loss.cu, kernels/reslt_loss.py;
tests: tests/ops/test_reslt_loss.py, tests/ops/test_loss_backends.py; benchmark: bench/losses.py.

As ride_loss, the kernel computes the loss and d loss / d logits in one pass per row and the backward only scales
the saved gradient (second-order gradients and torch.func: the eager formula, fastlt/ops/_fused_loss.py).
"""

import torch
import torch.nn.functional as F

from fastlt import _extension
from fastlt.splits import shot_split
from fastlt.ops import _backend, _checks, _fused_loss

OP = "fastlt.reslt_loss"


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


def reslt_loss_reference(branch_logits, target, group_masks, *, beta, log_eps=0.0):
    """Eager PyTorch reference written from the formulas (docs/methods.md 6.4); fp32 math for fp16/bf16 inputs. With
    ``log_eps > 0`` it computes ``-log(softmax + log_eps)`` literally, as the official ResLT code does."""
    target, _ = _checks.loss_conveniences(target, None)
    _validate(branch_logits, target, group_masks, beta, log_eps)
    return _loss_formula(branch_logits, target, group_masks, beta, log_eps)


def _loss_formula(branch_logits, target, group_masks, beta, log_eps):
    """The loss from the fused op's arguments in eager PyTorch: the reference, and the fused ops' second-order path."""
    logits = branch_logits.to(_checks.accumulate_dtype(branch_logits.dtype))
    num_branches, batch, _ = logits.shape
    branch_ce = _cross_entropy(logits, target.expand(num_branches, batch), log_eps)
    in_group = group_masks[:, target]  # [K, B]: g_b(y_i)
    # where, not a product: a branch outside its group contributes nothing, even an infinite CE (0 * inf = NaN)
    in_group_ce = torch.where(in_group, branch_ce, torch.zeros_like(branch_ce))
    individual = in_group_ce.sum() / in_group.sum().clamp_min(1).to(logits)  # no pair in a group: L_ice = 0
    fused = _cross_entropy(logits.sum(0), target, log_eps).mean()
    return beta * individual + (1 - beta) * fused


def _cross_entropy(logits, target, log_eps):
    """Per-row -log(softmax(logits)_y + log_eps); log_eps = 0 takes the exact log-softmax."""
    if log_eps == 0:
        return -F.log_softmax(logits, dim=-1).gather(-1, target[..., None])[..., 0]
    return -torch.log(F.softmax(logits, dim=-1).gather(-1, target[..., None])[..., 0] + log_eps)


def reslt_loss(branch_logits: torch.Tensor, target: torch.Tensor, group_masks: torch.Tensor, *,
               beta: float, log_eps: float = 0.0) -> torch.Tensor:
    """ResLT's loss over K branches, computed with its gradient in one pass over the logits.

    Args:
        branch_logits: ``[K, B, C]`` logits of the K branches (main first), any strides; fp32/fp16/bf16 (accumulated
            in fp32) or fp64.
        target: ``[B]`` integer labels in ``[0, C)`` (int32 and narrower are widened to int64).
        group_masks: ``[K, C]`` bool, ``group_masks[b, c]``: class c belongs to branch b's group
            (:func:`reslt_groups`); every row must select a class.
        beta: weight of the branch loss L_ice in [0, 1] (the paper's alpha; 0.995 on CIFAR-100-LT r = 100).
        log_eps: every cross-entropy is ``-log(softmax_y + log_eps)``. ``0`` (default) is the exact cross-entropy;
            the official ResLT code uses ``1e-7`` (:class:`fastlt.ResLTLoss`' default), which caps a sample's loss
            at ``-log(1e-7)`` = 16.1 and scales its gradient by ``p_y / (p_y + 1e-7)``.

    Returns the scalar loss in the accumulation dtype (fp32 for fp16/bf16 inputs; the gradient keeps
    ``branch_logits.dtype``), differentiable in ``branch_logits``. L_ice is 0 when no label of the batch is in any
    group (impossible when row 0 selects every class, as in ResLT). A NaN logit makes the loss and the gradient of
    its row (every branch, through the fused logits) NaN.

    >>> counts = (500 * 0.01 ** (torch.arange(100) / 99)).floor()
    >>> groups = fastlt.ops.reslt_groups(counts, cutoffs=[35, 70])
    >>> loss = fastlt.ops.reslt_loss(torch.randn(3, 8, 100), torch.randint(0, 100, (8,)), groups, beta=0.995)
    """
    target, _ = _checks.loss_conveniences(target, None)
    _validate(branch_logits, target, group_masks, beta, log_eps)
    backend = _backend.resolve(branch_logits, OP)
    if backend == "reference" or _fused_loss.use_reference(branch_logits):
        return reslt_loss_reference(branch_logits, target, group_masks, beta=beta, log_eps=log_eps)
    compute_grad = branch_logits.requires_grad and torch.is_grad_enabled()
    fused_op = torch.ops.fastlt.reslt_loss_triton if backend == "triton" else torch.ops.fastlt.reslt_loss
    loss, _ = fused_op(branch_logits, target, group_masks, float(beta), float(log_eps), compute_grad)
    return loss


def _validate(branch_logits, target, group_masks, beta, log_eps):
    _checks.tensor(OP, "branch_logits", branch_logits, dims=3, floating=True)
    num_branches, batch, num_classes = branch_logits.shape
    if num_branches > _checks.MAX_EXPERTS:
        raise ValueError(
            f"{OP}: branch_logits has {num_branches} branches; at most {_checks.MAX_EXPERTS} are supported")
    _checks.labels(OP, "target", target, batch, num_classes)
    _checks.same_device(OP, "target", target, branch_logits, "branch_logits")
    _checks.tensor(OP, "group_masks", group_masks, dims=2)
    if group_masks.dtype != torch.bool:
        raise ValueError(f"{OP}: group_masks must be bool, got {group_masks.dtype}")
    if tuple(group_masks.shape) != (num_branches, num_classes):
        raise ValueError(f"{OP}: group_masks must be [K, C]=[{num_branches}, {num_classes}], got "
                         f"{tuple(group_masks.shape)}")
    _checks.same_device(OP, "group_masks", group_masks, branch_logits, "branch_logits")
    if not torch.compiler.is_compiling() and not bool(group_masks.any(1).all()):
        empty_row = int((~group_masks.any(1)).nonzero()[0])
        raise ValueError(f"{OP}: group_masks row {empty_row} selects no class")
    _checks.number(OP, "beta", beta, low=0.0, high=1.0)
    _checks.number(OP, "log_eps", log_eps, low=0.0)


if _extension.AVAILABLE:
    _fused_loss.register("fastlt::reslt_loss", _loss_formula)


@torch.library.custom_op("fastlt::reslt_loss_triton", mutates_args=())
def _reslt_loss_triton(branch_logits: torch.Tensor, target: torch.Tensor, group_masks: torch.Tensor, beta: float,
                       log_eps: float, compute_grad: bool) -> tuple[torch.Tensor, torch.Tensor]:
    from fastlt.kernels import reslt_loss as kernel

    _checks.fused_loss_inputs(OP, "branch_logits", branch_logits, target, _checks.MAX_EXPERTS)
    num_branches, _, num_classes = branch_logits.shape
    _checks.fused_loss_table(OP, "group_masks", group_masks, (num_branches, num_classes), branch_logits,
                             dtype=torch.bool)
    if not bool(group_masks.any(1).all()):
        raise ValueError(f"{OP}: every row of group_masks must select a class")
    _checks.number(OP, "beta", beta, low=0.0, high=1.0)
    _checks.number(OP, "log_eps", log_eps, low=0.0)
    return kernel.forward(branch_logits, target, group_masks, beta, log_eps, compute_grad)


_fused_loss.register("fastlt::reslt_loss_triton", _loss_formula)
