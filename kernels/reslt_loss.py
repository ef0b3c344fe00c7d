"""Triton kernel of fastlt.ops.reslt_loss (formula in csrc/include/fastlt/reslt_loss.h).

Same plan as csrc/cuda/reslt_loss.cu: one program per sample row; online (max, sum) softmax statistics of the summed
logits s = sum_b z_b and of each branch whose group holds the label, then the row loss, its K + 1 row terms and
d loss / d logits in the same launch (the gradient pass writes every branch at a class block from that block's fused
probabilities). A row labelled ignore_index only writes zeros.
"""

import torch
import triton
import triton.language as tl

from fastlt.kernels._softmax_stats import add_to_softmax_stats, merge_lanes
from fastlt._formulas import REDUCTION_MEAN, REDUCTION_NONE, accumulate_dtype
from fastlt.kernels._common import TRITON_DTYPES, class_block, write_ignored_row


@triton.jit
def _fused_logits(row_ptr, offsets, mask, stride_k, stride_c, K, ACC: tl.constexpr):
    """s = sum_b z_b at `offsets`, branches in order as every backend adds them."""
    total = tl.zeros(offsets.shape, ACC)
    for k in range(K):
        total += tl.load(row_ptr + k * stride_k + offsets * stride_c, mask=mask, other=0.0).to(ACC)
    return total


@triton.jit
def _epsilon_cross_entropy(maximum, shifted_sum, target_logit, eps):
    """(CE_eps, its gradient factor r) of csrc/include/fastlt/reslt_loss.h: eps = 0 is the exact log-sum-exp form."""
    target_probability = tl.exp(target_logit - maximum) / shifted_sum
    exact = eps == 0.0
    loss = tl.where(exact, maximum + tl.log(shifted_sum) - target_logit, -tl.log(target_probability + eps))
    scale = tl.where(exact, 1.0, target_probability / (target_probability + eps))
    return loss, scale


@triton.jit
def _reslt_loss_kernel(logits_ptr, labels_ptr, masks_ptr, coefs_ptr, branch_stats_ptr, row_losses_ptr, terms_ptr,
                       grad_ptr, stride_k, stride_b, stride_c, K, B, C, ignore_index, ACC: tl.constexpr,
                       WRITE_GRAD: tl.constexpr, BLOCK: tl.constexpr):
    b = tl.program_id(0)
    y = tl.load(labels_ptr + b)
    if y == ignore_index:
        write_ignored_row(b, terms_ptr, K + 1, row_losses_ptr, grad_ptr, K, B, C, ACC, WRITE_GRAD, BLOCK)
    else:
        _kept_row(b, y, logits_ptr, masks_ptr, coefs_ptr, branch_stats_ptr, row_losses_ptr, terms_ptr, grad_ptr,
                  stride_k, stride_b, stride_c, K, B, C, ACC, WRITE_GRAD, BLOCK)


@triton.jit
def _kept_row(b, y, logits_ptr, masks_ptr, coefs_ptr, branch_stats_ptr, row_losses_ptr, terms_ptr, grad_ptr,
              stride_k, stride_b, stride_c, K, B, C, ACC: tl.constexpr, WRITE_GRAD: tl.constexpr,
              BLOCK: tl.constexpr):
    row_ptr = logits_ptr + b * stride_b
    lanes = tl.arange(0, BLOCK)
    ice_coef = tl.load(coefs_ptr)
    fused_coef = tl.load(coefs_ptr + 1)
    eps = tl.load(coefs_ptr + 2)  # the branch terms' epsilon
    fused_eps = tl.load(coefs_ptr + 3)  # the fused term's

    max_lanes = tl.full([BLOCK], float("-inf"), ACC)
    sum_lanes = tl.zeros([BLOCK], ACC)
    for start in range(0, C, BLOCK):
        offsets = start + lanes
        mask = offsets < C
        s = _fused_logits(row_ptr, offsets, mask, stride_k, stride_c, K, ACC)
        max_lanes, sum_lanes = add_to_softmax_stats(max_lanes, sum_lanes, s, mask)
    fused_max, fused_sum = merge_lanes(max_lanes, sum_lanes)
    fused_target = tl.full([], 0.0, ACC)
    for k in range(K):
        fused_target += tl.load(row_ptr + k * stride_k + y * stride_c).to(ACC)
    fused_ce, fused_scale = _epsilon_cross_entropy(fused_max, fused_sum, fused_target, fused_eps)
    loss = fused_coef * fused_ce
    tl.store(terms_ptr + b * (K + 1) + K, loss)

    # Each in-group branch's statistics and gradient coefficient, kept in a [B, K, 3] scratch for the gradient pass.
    for k in range(K):
        if tl.load(masks_ptr + k * C + y) != 0:  # outside its group a branch only feeds the fused term
            branch_ptr = row_ptr + k * stride_k
            max_lanes = tl.full([BLOCK], float("-inf"), ACC)
            sum_lanes = tl.zeros([BLOCK], ACC)
            for start in range(0, C, BLOCK):
                offsets = start + lanes
                mask = offsets < C
                z = tl.load(branch_ptr + offsets * stride_c, mask=mask, other=0.0).to(ACC)
                max_lanes, sum_lanes = add_to_softmax_stats(max_lanes, sum_lanes, z, mask)
            branch_max, branch_sum = merge_lanes(max_lanes, sum_lanes)
            branch_target = tl.load(branch_ptr + y * stride_c).to(ACC)
            branch_ce, branch_scale = _epsilon_cross_entropy(branch_max, branch_sum, branch_target, eps)
            branch_term = ice_coef * branch_ce
            loss += branch_term
            tl.store(terms_ptr + b * (K + 1) + k, branch_term)
            tl.store(branch_stats_ptr + (b * K + k) * 3, branch_max)
            tl.store(branch_stats_ptr + (b * K + k) * 3 + 1, branch_sum)
            tl.store(branch_stats_ptr + (b * K + k) * 3 + 2, ice_coef * branch_scale)
        else:
            tl.store(terms_ptr + b * (K + 1) + k, tl.full([], 0.0, ACC))
    tl.store(row_losses_ptr + b, loss)

    if WRITE_GRAD:
        tl.debug_barrier()  # the branch statistics stored above are read back below, possibly by other threads
        for start in range(0, C, BLOCK):
            offsets = start + lanes
            mask = offsets < C
            indicator = tl.where(offsets == y, 1.0, 0.0)
            s = _fused_logits(row_ptr, offsets, mask, stride_k, stride_c, K, ACC)
            fused_term = fused_coef * fused_scale * (tl.exp(s - fused_max) / fused_sum - indicator)
            for k in range(K):
                # logit_gradient: in_group * ice_coef * r_b * (softmax(z_b)_c - [c == y]) + the fused term
                gradient = fused_term
                if tl.load(masks_ptr + k * C + y) != 0:
                    branch_max = tl.load(branch_stats_ptr + (b * K + k) * 3)
                    branch_sum = tl.load(branch_stats_ptr + (b * K + k) * 3 + 1)
                    branch_coef = tl.load(branch_stats_ptr + (b * K + k) * 3 + 2)
                    z = tl.load(row_ptr + k * stride_k + offsets * stride_c, mask=mask, other=0.0).to(ACC)
                    gradient += branch_coef * (tl.exp(z - branch_max) / branch_sum - indicator)
                tl.store(grad_ptr + (k * B + b) * C + offsets, gradient.to(grad_ptr.dtype.element_ty), mask=mask)


def forward(branch_logits, target, group_masks, beta, log_eps, fused_log_eps, reduction, ignore_index, compute_grad):
    """(loss, d loss / d branch_logits or an empty tensor, [B, K + 1] row terms), as the C++ op fastlt::reslt_loss
    returns them."""
    num_branches, batch, num_classes = branch_logits.shape
    acc = accumulate_dtype(branch_logits.dtype)
    device = branch_logits.device
    masks = group_masks.contiguous()
    labels = target.contiguous()
    # ice_coefficient and fused_coefficient of csrc/include/fastlt/reslt_loss.h, on the device in the accumulation
    # dtype (no host sync): under mean, beta over G, the (branch, kept row) pairs whose group holds the label, and
    # (1 - beta) over N, the kept rows (0 when G or N is 0); beta and 1 - beta under sum and none. Then the branch
    # terms' and the fused term's epsilons.
    kept = labels != ignore_index
    in_group_total = (masks[:, labels.masked_fill(~kept, 0)] & kept).sum().to(acc)  # ignored labels: never an index
    kept_rows = kept.sum()
    if reduction == REDUCTION_MEAN:
        ice_coef = torch.where(in_group_total > 0, beta / in_group_total.clamp_min(1), 0.0)
        fused_coef = torch.where(kept_rows > 0, (1.0 - beta) / kept_rows.clamp_min(1).double(), 0.0).to(acc)
    else:
        ice_coef = torch.where(in_group_total > 0, torch.tensor(beta, dtype=acc, device=device), 0.0)
        fused_coef = torch.where(kept_rows > 0, torch.tensor(1.0 - beta, dtype=acc, device=device), 0.0)
    coefs = torch.stack([ice_coef, fused_coef, torch.tensor(log_eps, dtype=acc, device=device),
                         torch.tensor(fused_log_eps, dtype=acc, device=device)])
    branch_stats = torch.empty((batch, num_branches, 3), dtype=acc, device=device)
    grad = torch.empty(branch_logits.shape if compute_grad else (0,), dtype=branch_logits.dtype, device=device)
    row_losses = torch.empty(batch, dtype=acc, device=device)
    row_terms = torch.empty((batch, num_branches + 1), dtype=acc, device=device)
    block = class_block(num_classes)
    _reslt_loss_kernel[(batch,)](
        branch_logits, labels, masks, coefs, branch_stats, row_losses, row_terms, grad, *branch_logits.stride(),
        num_branches, batch, num_classes, ignore_index, ACC=TRITON_DTYPES[acc], WRITE_GRAD=compute_grad, BLOCK=block,
    )
    return (row_losses if reduction == REDUCTION_NONE else row_losses.sum()), grad, row_terms
