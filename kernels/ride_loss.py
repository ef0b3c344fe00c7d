"""Triton kernel of fastlt.ops.ride_loss (formula in fastlt/ops/ride_loss.py and csrc/include/fastlt/ride_loss.h).

Same plan as csrc/cuda/ride_loss.cu: one program per sample row; online (max, sum) softmax statistics of the
tempered expert mean v (kept in a [B, C] scratch) and, per expert, of its margin logits z' and tempered logits
u = z / T; then the row loss and d loss / d logits in the same launch. Triton cannot include the C++ headers, so the
few per-element formulas are restated here (and in _softmax_stats.py), each named after the header function it
mirrors.
"""

import torch
import triton
import triton.language as tl

from fastlt.kernels._softmax_stats import add_to_softmax_stats, merge_lanes
from fastlt._formulas import accumulate_dtype
from fastlt.kernels._common import TRITON_DTYPES, class_block, write_ignored_row


@triton.jit
def _ride_loss_kernel(logits_ptr, labels_ptr, margins_ptr, ce_coefs_ptr, inverse_temperature_ptr, div_coef_ptr,
                      mean_ptr, row_losses_ptr, row_terms_ptr, grad_ptr, stride_e, stride_b, stride_c, E, B, C,
                      ignore_index, ACC: tl.constexpr, DIVERSITY: tl.constexpr, WRITE_GRAD: tl.constexpr,
                      BLOCK: tl.constexpr):
    b = tl.program_id(0)
    y = tl.load(labels_ptr + b)
    if y == ignore_index:  # zero terms (2E of them), row loss and gradient rows; its label is never an index
        write_ignored_row(b, row_terms_ptr, 2 * E, row_losses_ptr, grad_ptr, E, B, C, ACC, WRITE_GRAD, BLOCK)
    else:
        _ride_loss_row(logits_ptr, y, b, margins_ptr, ce_coefs_ptr, inverse_temperature_ptr, div_coef_ptr, mean_ptr,
                       row_losses_ptr, row_terms_ptr, grad_ptr, stride_e, stride_b, stride_c, E, B, C, ACC, DIVERSITY,
                       WRITE_GRAD, BLOCK)


@triton.jit
def _ride_loss_row(logits_ptr, y, b, margins_ptr, ce_coefs_ptr, inverse_temperature_ptr, div_coef_ptr, mean_ptr,
                   row_losses_ptr, row_terms_ptr, grad_ptr, stride_e, stride_b, stride_c, E, B, C,
                   ACC: tl.constexpr, DIVERSITY: tl.constexpr, WRITE_GRAD: tl.constexpr, BLOCK: tl.constexpr):
    margin = tl.load(margins_ptr + y)
    ce_coef = tl.load(ce_coefs_ptr + b)
    row_ptr = logits_ptr + b * stride_b
    lanes = tl.arange(0, BLOCK)

    # Tempered expert mean v (the detached KL target p = softmax(v)) and its statistics.
    mean_max = tl.full([], float("-inf"), ACC)
    mean_sum = tl.full([], 0.0, ACC)
    div_coef = tl.full([], 0.0, ACC)
    if DIVERSITY:
        div_coef = tl.load(div_coef_ptr)
        inverse_experts = 1.0 / (tl.zeros([], ACC) + E)  # not E.to: Triton passes an E of 1 as a constexpr
        lane_max = tl.full([BLOCK], float("-inf"), ACC)
        lane_sum = tl.zeros([BLOCK], ACC)
        for start in range(0, C, BLOCK):
            offsets = start + lanes
            mask = offsets < C
            total = tl.zeros([BLOCK], ACC)
            for k in range(E):  # experts in order 0..E-1, as every backend sums them
                total += tl.load(row_ptr + k * stride_e + offsets * stride_c, mask=mask, other=0.0).to(ACC)
            inverse_temperature = tl.load(inverse_temperature_ptr + offsets, mask=mask, other=1.0)
            v = total * inverse_experts * inverse_temperature  # tempered_mean_logit
            tl.store(mean_ptr + b * C + offsets, v, mask=mask)
            lane_max, lane_sum = add_to_softmax_stats(lane_max, lane_sum, v, mask)
        mean_max, mean_sum = merge_lanes(lane_max, lane_sum)
        tl.debug_barrier()  # the stored v are read back below, possibly by other threads of the program

    loss = tl.full([], 0.0, ACC)
    for k in range(E):
        expert_ptr = row_ptr + k * stride_e
        ce_max_lanes = tl.full([BLOCK], float("-inf"), ACC)
        ce_sum_lanes = tl.zeros([BLOCK], ACC)
        expert_max_lanes = tl.full([BLOCK], float("-inf"), ACC)
        expert_sum_lanes = tl.zeros([BLOCK], ACC)
        gap_lanes = tl.zeros([BLOCK], ACC)
        for start in range(0, C, BLOCK):
            offsets = start + lanes
            mask = offsets < C
            z = tl.load(expert_ptr + offsets * stride_c, mask=mask, other=0.0).to(ACC)
            margin_z = tl.where(offsets == y, z - margin, z)  # margin_logit
            ce_max_lanes, ce_sum_lanes = add_to_softmax_stats(ce_max_lanes, ce_sum_lanes, margin_z, mask)
            if DIVERSITY:
                u = z * tl.load(inverse_temperature_ptr + offsets, mask=mask, other=1.0)  # tempered_logit
                expert_max_lanes, expert_sum_lanes = add_to_softmax_stats(expert_max_lanes, expert_sum_lanes, u, mask)
                v = tl.load(mean_ptr + b * C + offsets, mask=mask, other=0.0)
                gap_lanes += tl.where(mask, tl.exp(v - mean_max) * (v - u), 0.0)  # weighted_gap_term
        ce_max, ce_sum = merge_lanes(ce_max_lanes, ce_sum_lanes)
        target_logit = tl.load(expert_ptr + y * stride_c).to(ACC) - margin
        ce_term = ce_coef * (ce_max + tl.log(ce_sum) - target_logit)  # cross_entropy
        loss += ce_term
        tl.store(row_terms_ptr + b * 2 * E + k, ce_term)
        expert_max = tl.full([], 0.0, ACC)
        expert_sum = tl.full([], 1.0, ACC)
        diversity_term = tl.zeros([], ACC)
        if DIVERSITY:
            expert_max, expert_sum = merge_lanes(expert_max_lanes, expert_sum_lanes)
            gap = tl.sum(gap_lanes, axis=0)
            kl = gap / mean_sum + expert_max + tl.log(expert_sum) - (mean_max + tl.log(mean_sum))  # kl_to_mean
            diversity_term = div_coef * kl
            loss += diversity_term
        tl.store(row_terms_ptr + b * 2 * E + E + k, diversity_term)
        if WRITE_GRAD:
            grad_row_ptr = grad_ptr + (k * B + b) * C
            for start in range(0, C, BLOCK):
                offsets = start + lanes
                mask = offsets < C
                is_target = offsets == y
                z = tl.load(expert_ptr + offsets * stride_c, mask=mask, other=0.0).to(ACC)
                ce_probability = tl.exp(tl.where(is_target, z - margin, z) - ce_max) / ce_sum
                # logit_gradient: ce_coef * (p' - [c == y]) + div_coef * (softmax(u)_c - p_c) / T_c
                gradient = ce_coef * (ce_probability - tl.where(is_target, 1.0, 0.0))
                if DIVERSITY:
                    inverse_temperature = tl.load(inverse_temperature_ptr + offsets, mask=mask, other=1.0)
                    expert_probability = tl.exp(z * inverse_temperature - expert_max) / expert_sum
                    v = tl.load(mean_ptr + b * C + offsets, mask=mask, other=0.0)
                    mean_probability = tl.exp(v - mean_max) / mean_sum
                    gradient += div_coef * (expert_probability - mean_probability) * inverse_temperature
                tl.store(grad_row_ptr + offsets, gradient.to(grad_ptr.dtype.element_ty), mask=mask)
    tl.store(row_losses_ptr + b, loss)


def forward(expert_logits, target, target_margins, class_weights, temperatures, diversity_factor, reduction,
            ignore_index, compute_grad):
    """(loss, d loss / d expert_logits or an empty tensor, [B, 2E] row terms), as the C++ op fastlt::ride_loss returns
    them. The normalisers of docs/methods.md 6.5 (W: the kept rows' DRW weights, N: the kept rows) are computed here
    on the device and reach the kernel as coefficients: per-row CE coefficients and one diversity coefficient."""
    num_experts, batch, num_classes = expert_logits.shape
    acc = accumulate_dtype(expert_logits.dtype)
    device = expert_logits.device
    margins = target_margins.to(acc).contiguous()
    inverse_temperature = temperatures.to(acc).reciprocal().contiguous()
    kept = target != ignore_index
    if class_weights is None:
        ce_coefs = kept.to(acc)
    else:
        ce_coefs = class_weights.to(acc)[torch.where(kept, target, 0)] * kept
    div_coef = temperatures.to(acc).mean().square() * diversity_factor
    if reduction == 1:  # mean; an all-ignored batch (W = N = 0) gets zero coefficients, never a division by 0
        weight_total, kept_rows = ce_coefs.sum(), kept.sum().to(acc)
        ce_coefs = torch.where(weight_total > 0, ce_coefs / weight_total, 0.0)
        div_coef = torch.where(kept_rows > 0, div_coef * kept_rows.reciprocal(), 0.0)
    ce_coefs, div_coef = ce_coefs.contiguous(), div_coef.reshape(1)
    diversity = diversity_factor != 0.0
    mean_scratch = torch.empty((batch, num_classes) if diversity else (1,), dtype=acc, device=device)
    grad = torch.empty(expert_logits.shape if compute_grad else (0,), dtype=expert_logits.dtype, device=device)
    row_losses = torch.empty(batch, dtype=acc, device=device)
    row_terms = torch.empty((batch, 2 * num_experts), dtype=acc, device=device)
    block = class_block(num_classes)
    _ride_loss_kernel[(batch,)](
        expert_logits, target.contiguous(), margins, ce_coefs, inverse_temperature, div_coef, mean_scratch, row_losses,
        row_terms, grad, *expert_logits.stride(), num_experts, batch, num_classes, ignore_index,
        ACC=TRITON_DTYPES[acc], DIVERSITY=diversity, WRITE_GRAD=compute_grad, BLOCK=block,
    )
    return (row_losses if reduction == 0 else row_losses.sum()), grad, row_terms
