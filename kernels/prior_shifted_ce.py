"""Triton kernel of fastlt.ops.prior_shifted_ce (formula in csrc/include/fastlt/prior_shifted_ce.h).

Same plan as csrc/cuda/prior_shifted_ce.cu: one program per sample row; per expert, online (max, sum) softmax
statistics of the shifted logits x = z + shift, then the row loss and d loss / d logits in the same launch.
"""

import torch
import triton
import triton.language as tl

from fastlt.kernels._softmax_stats import add_to_softmax_stats, merge_lanes
from fastlt._formulas import accumulate_dtype
from fastlt.kernels._common import TRITON_DTYPES, class_block


@triton.jit
def _prior_shifted_ce_kernel(logits_ptr, labels_ptr, shifts_ptr, row_losses_ptr, grad_ptr, stride_e, stride_b,
                             stride_c, E, B, C, ACC: tl.constexpr, WRITE_GRAD: tl.constexpr, BLOCK: tl.constexpr):
    b = tl.program_id(0)
    y = tl.load(labels_ptr + b)
    inverse_batch = 1.0 / (tl.zeros([], ACC) + B)  # not B.to: Triton passes a B of 1 as a constexpr
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
        loss += inverse_batch * (row_max + tl.log(row_sum) - target_logit)  # cross_entropy
        if WRITE_GRAD:
            grad_row_ptr = grad_ptr + (k * B + b) * C
            for start in range(0, C, BLOCK):
                offsets = start + lanes
                mask = offsets < C
                z = tl.load(expert_ptr + offsets * stride_c, mask=mask, other=0.0).to(ACC)
                x = z + tl.load(shift_ptr + offsets, mask=mask, other=0.0)
                probability = tl.exp(x - row_max) / row_sum
                # logit_gradient: (1/B) * (softmax(x)_c - [c == y])
                gradient = inverse_batch * (probability - tl.where(offsets == y, 1.0, 0.0))
                tl.store(grad_row_ptr + offsets, gradient.to(grad_ptr.dtype.element_ty), mask=mask)
    tl.store(row_losses_ptr + b, loss)


def forward(expert_logits, target, logit_shifts, compute_grad):
    """(loss, d loss / d expert_logits or an empty tensor), as the C++ op fastlt::prior_shifted_ce returns them."""
    num_experts, batch, num_classes = expert_logits.shape
    acc = accumulate_dtype(expert_logits.dtype)
    shifts = logit_shifts.to(acc).contiguous()
    grad = torch.empty(expert_logits.shape if compute_grad else (0,), dtype=expert_logits.dtype,
                       device=expert_logits.device)
    row_losses = torch.empty(batch, dtype=acc, device=expert_logits.device)
    block = class_block(num_classes)
    _prior_shifted_ce_kernel[(batch,)](
        expert_logits, target.contiguous(), shifts, row_losses, grad, *expert_logits.stride(), num_experts, batch,
        num_classes, ACC=TRITON_DTYPES[acc], WRITE_GRAD=compute_grad, BLOCK=block,
    )
    return row_losses.sum(), grad
