"""Triton kernel of fastlt.ops.prior_shifted_ce (formula in csrc/include/fastlt/prior_shifted_ce.h).

Same plan as csrc/cuda/prior_shifted_ce.cu: one program per sample row; per expert, online (max, sum) softmax
statistics of the shifted logits x = z + shift, then the row's term, the row loss and d loss / d logits in the same
launch. A row labelled ignore_index only writes zeros.
"""

import torch
import triton
import triton.language as tl

from fastlt.kernels._softmax_stats import add_to_softmax_stats, merge_lanes
from fastlt._formulas import REDUCTION_MEAN, REDUCTION_NONE, accumulate_dtype
from fastlt.kernels._common import TRITON_DTYPES, class_block, write_ignored_row


@triton.jit
def _prior_shifted_ce_kernel(logits_ptr, labels_ptr, shifts_ptr, coefficient_ptr, row_losses_ptr, terms_ptr, grad_ptr,
                             stride_e, stride_b, stride_c, E, B, C, ignore_index, ACC: tl.constexpr,
                             WRITE_GRAD: tl.constexpr, BLOCK: tl.constexpr):
    b = tl.program_id(0)
    y = tl.load(labels_ptr + b)
    if y == ignore_index:
        write_ignored_row(b, terms_ptr, E, row_losses_ptr, grad_ptr, E, B, C, ACC, WRITE_GRAD, BLOCK)
    else:
        _kept_row(b, y, logits_ptr, shifts_ptr, coefficient_ptr, row_losses_ptr, terms_ptr, grad_ptr, stride_e,
                  stride_b, stride_c, E, B, C, ACC, WRITE_GRAD, BLOCK)


@triton.jit
def _kept_row(b, y, logits_ptr, shifts_ptr, coefficient_ptr, row_losses_ptr, terms_ptr, grad_ptr, stride_e, stride_b,
              stride_c, E, B, C, ACC: tl.constexpr, WRITE_GRAD: tl.constexpr, BLOCK: tl.constexpr):
    coefficient = tl.load(coefficient_ptr)
    lanes = tl.arange(0, BLOCK)
    loss = tl.full([], 0.0, ACC)
    for k in range(E):
        expert_ptr = logits_ptr + k * stride_e + b * stride_b
        shift_ptr = shifts_ptr + k * C
        max_lanes = tl.full([BLOCK], float("-inf"), ACC)
        sum_lanes = tl.zeros([BLOCK], ACC)
        for start in range(0, C, BLOCK):
            offsets = start + lanes
            mask = offsets < C
            z = tl.load(expert_ptr + offsets * stride_c, mask=mask, other=0.0).to(ACC)
            x = z + tl.load(shift_ptr + offsets, mask=mask, other=0.0)
            max_lanes, sum_lanes = add_to_softmax_stats(max_lanes, sum_lanes, x, mask)
        row_max, row_sum = merge_lanes(max_lanes, sum_lanes)
        target_logit = tl.load(expert_ptr + y * stride_c).to(ACC) + tl.load(shift_ptr + y)
        term = coefficient * (row_max + tl.log(row_sum) - target_logit)  # coef * cross_entropy
        tl.store(terms_ptr + b * E + k, term)
        loss += term
        if WRITE_GRAD:
            grad_row_ptr = grad_ptr + (k * B + b) * C
            for start in range(0, C, BLOCK):
                offsets = start + lanes
                mask = offsets < C
                z = tl.load(expert_ptr + offsets * stride_c, mask=mask, other=0.0).to(ACC)
                x = z + tl.load(shift_ptr + offsets, mask=mask, other=0.0)
                probability = tl.exp(x - row_max) / row_sum
                # logit_gradient: coef * (softmax(x)_c - [c == y])
                gradient = coefficient * (probability - tl.where(offsets == y, 1.0, 0.0))
                tl.store(grad_row_ptr + offsets, gradient.to(grad_ptr.dtype.element_ty), mask=mask)
    tl.store(row_losses_ptr + b, loss)


def forward(expert_logits, target, logit_shifts, reduction, ignore_index, compute_grad):
    """(loss, d loss / d expert_logits or an empty tensor, [B, E] row terms), as the C++ op fastlt::prior_shifted_ce
    returns them."""
    num_experts, batch, num_classes = expert_logits.shape
    acc = accumulate_dtype(expert_logits.dtype)
    device = expert_logits.device
    shifts = logit_shifts.to(acc).contiguous()
    labels = target.contiguous()
    # row_coefficient of csrc/include/fastlt/prior_shifted_ce.h on the device (no host sync): 1 / N under mean (N the
    # kept rows), 1 under sum and none, 0 when no row is kept.
    kept_rows = (labels != ignore_index).sum()
    one = torch.ones((), dtype=acc, device=device)
    scale = one / kept_rows.clamp_min(1).to(acc) if reduction == REDUCTION_MEAN else one
    coefficient = torch.where(kept_rows > 0, scale, 0.0).reshape(1)
    grad = torch.empty(expert_logits.shape if compute_grad else (0,), dtype=expert_logits.dtype, device=device)
    row_losses = torch.empty(batch, dtype=acc, device=device)
    row_terms = torch.empty((batch, num_experts), dtype=acc, device=device)
    block = class_block(num_classes)
    _prior_shifted_ce_kernel[(batch,)](
        expert_logits, labels, shifts, coefficient, row_losses, row_terms, grad, *expert_logits.stride(), num_experts,
        batch, num_classes, ignore_index, ACC=TRITON_DTYPES[acc], WRITE_GRAD=compute_grad, BLOCK=block,
    )
    return (row_losses if reduction == REDUCTION_NONE else row_losses.sum()), grad, row_terms
