"""ResLT (Cui et al., TPAMI 2022; docs/methods.md 4.4): beta * (per-branch cross-entropy, each branch on its class
group) + (1 - beta) * cross-entropy of the branches' summed logits, one fused `fastlt.ResLTLoss` call."""

from typing import Optional, Tuple

import torch

import fastlt
from fastlt.methods.options import Named, declared, default_of, option
from fastlt.methods.registry import register_method
from fastlt.methods.stage1 import Method


@declared
class ResLTOptions(Named):
    """ResLT's loss: its class groups, the mixing weight beta and optional label smoothing."""

    beta: float = option(0.995, "weight of the per-branch term (1 - beta: the summed logits' term)", low=0, high=1)
    cutoffs: Optional[Tuple[int, ...]] = option(
        None, "the papers' group cut-offs as label indices, e.g. [35, 70] (null: many / medium / few from the counts)",
        low=0)
    num_branches: int = option(3, "branches (class groups): all, medium + tail, tail", low=1)
    label_smoothing: float = option(0.0, "the official --lsm delta: 1 - delta on the label, delta / (C - 1) elsewhere",
                                    low=0, high=1, high_open=True)
    log_eps: float = option(default_of(fastlt.ResLTLoss, "log_eps"),
                            "the branch terms' -log(softmax_y + log_eps), as the official scripts", low=0)
    fused_log_eps: Optional[float] = option(default_of(fastlt.ResLTLoss, "fused_log_eps"),
                                            "the fused term's epsilon (null: log_eps; the CIFAR and iNat scripts: 0)",
                                            low=0)


@register_method("reslt", ResLTOptions)
def reslt(options: ResLTOptions, counts, model) -> Method:
    """ResLT: beta * (masked per-branch CE) + (1 - beta) * CE(sum of the branches' logits).

    Groups come from the counts (>100 / 20..100 / <20) or from the papers' rank cut-offs, e.g. `cutoffs: [35, 70]` on
    CIFAR-100. A multi-expert model (`reslt_ride_resnext50_32x4d`: branch_logits [E, K, B, C]) sums the loss over its
    experts, as the official RIDE + ResLT script. `label_smoothing: delta` (the official ImageNet-LT scripts' `--lsm`,
    0 by default and in every released run) smooths the target of every cross-entropy, branch and fused. `log_eps`
    and `fused_log_eps` are the branch and fused terms' epsilons (fastlt.ResLTLoss)."""
    groups = fastlt.ops.reslt_groups(torch.as_tensor(counts), cutoffs=options.cutoffs,
                                     num_branches=options.num_branches)
    loss = fastlt.ResLTLoss(groups, beta=options.beta, log_eps=options.log_eps,
                            fused_log_eps=options.fused_log_eps).to(counts.device)
    smoothing = options.label_smoothing
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
