"""Triton kernels of fastlt.ops.linear_ride_loss: the per-chunk row statistics and the chunk gradient.

The host side (``chunked_forward`` in fastlt/ops/_chunked_head.py) runs the GEMMs with torch and calls these for the
elementwise work between them, one program per sample row, the whole chunk of classes in one block: ``merge_chunk``
folds a chunk's logits into the rows' online softmax statistics, ``chunk_gradient`` overwrites a chunk's logits with
d loss / d logits. The per-element formulas mirror csrc/include/fastlt/ride_loss.h and linear_ride_loss.h.
"""

import triton
import triton.language as tl


@triton.jit
def _merge(old_max, old_sum, chunk_max, chunk_sum):
    """merge_softmax_stats of the running (max, sum) and a chunk's; the chunk is never empty."""
    new_max = tl.maximum(old_max, chunk_max)
    return new_max, old_sum * tl.exp(old_max - new_max) + chunk_sum * tl.exp(chunk_max - new_max)


@triton.jit
def _merge_chunk_kernel(logits_ptr, labels_ptr, margins_ptr, inverse_temperature_ptr, ce_max_ptr, ce_sum_ptr,
                        expert_max_ptr, expert_sum_ptr, gap_ptr, target_logit_ptr, mean_max_ptr, mean_sum_ptr,
                        E, B, n, c0, DIVERSITY: tl.constexpr, BLOCK: tl.constexpr):
    b = tl.program_id(0)
    lanes = tl.arange(0, BLOCK)
    mask = lanes < n
    is_target = (lanes == tl.load(labels_ptr + b) - c0) & mask
    margin = tl.load(margins_ptr + b)
    inverse_temperature = tl.load(inverse_temperature_ptr + lanes, mask=mask, other=1.0)
    acc = margin.dtype
    mean_exp = tl.zeros([BLOCK], acc)
    mean_logits = tl.zeros([BLOCK], acc)
    chunk_mean_max = tl.full([], float("-inf"), acc)
    old_mean_max = tl.load(mean_max_ptr + b)
    new_mean_max = old_mean_max
    if DIVERSITY:
        inverse_experts = 1.0 / (tl.zeros([], acc) + E)  # not E.to: Triton passes an E of 1 as a constexpr
        total = tl.zeros([BLOCK], acc)
        for k in range(E):
            total += tl.load(logits_ptr + (k * B + b) * n + lanes, mask=mask, other=0.0)
        mean_logits = total * inverse_experts * inverse_temperature  # tempered_mean_logit
        chunk_mean_max = tl.max(tl.where(mask, mean_logits, float("-inf")), 0)
        mean_exp = tl.where(mask, tl.exp(mean_logits - chunk_mean_max), 0.0)
        new_mean_max, new_mean_sum = _merge(old_mean_max, tl.load(mean_sum_ptr + b), chunk_mean_max,
                                            tl.sum(mean_exp, 0))
        tl.store(mean_max_ptr + b, new_mean_max)
        tl.store(mean_sum_ptr + b, new_mean_sum)
    for k in range(E):
        row = k * B + b
        z = tl.load(logits_ptr + row * n + lanes, mask=mask, other=0.0)
        margin_logits = tl.where(is_target, z - margin, z)  # margin_logit
        chunk_max = tl.max(tl.where(mask, margin_logits, float("-inf")), 0)
        chunk_sum = tl.sum(tl.where(mask, tl.exp(margin_logits - chunk_max), 0.0), 0)
        ce_max, ce_sum = _merge(tl.load(ce_max_ptr + row), tl.load(ce_sum_ptr + row), chunk_max, chunk_sum)
        tl.store(ce_max_ptr + row, ce_max)
        tl.store(ce_sum_ptr + row, ce_sum)
        target_logit = tl.sum(tl.where(is_target, margin_logits, 0.0), 0)
        tl.store(target_logit_ptr + row, tl.load(target_logit_ptr + row) + target_logit)
        if DIVERSITY:
            tempered = z * inverse_temperature  # tempered_logit
            expert_chunk_max = tl.max(tl.where(mask, tempered, float("-inf")), 0)
            expert_chunk_sum = tl.sum(tl.where(mask, tl.exp(tempered - expert_chunk_max), 0.0), 0)
            expert_max, expert_sum = _merge(tl.load(expert_max_ptr + row), tl.load(expert_sum_ptr + row),
                                            expert_chunk_max, expert_chunk_sum)
            tl.store(expert_max_ptr + row, expert_max)
            tl.store(expert_sum_ptr + row, expert_sum)
            chunk_gap = tl.sum(mean_exp * (mean_logits - tempered), 0)  # weighted_gap_term
            # rescale: the running gap (0 while empty) and the chunk's to the merged mean maximum
            gap = tl.load(gap_ptr + row) * tl.exp(old_mean_max - new_mean_max)
            tl.store(gap_ptr + row, gap + chunk_gap * tl.exp(chunk_mean_max - new_mean_max))


@triton.jit
def _chunk_gradient_kernel(logits_ptr, labels_ptr, margins_ptr, ce_coef_ptr, inverse_temperature_ptr, ce_max_ptr,
                           ce_sum_ptr, expert_max_ptr, expert_sum_ptr, mean_max_ptr, mean_sum_ptr, div_coef_ptr, E, B,
                           n, c0, DIVERSITY: tl.constexpr, BLOCK: tl.constexpr):
    b = tl.program_id(0)
    lanes = tl.arange(0, BLOCK)
    mask = lanes < n
    is_target = (lanes == tl.load(labels_ptr + b) - c0) & mask
    margin = tl.load(margins_ptr + b)
    ce_coef = tl.load(ce_coef_ptr + b)
    div_coef = tl.load(div_coef_ptr + b)
    inverse_temperature = tl.load(inverse_temperature_ptr + lanes, mask=mask, other=1.0)
    acc = margin.dtype
    mean_probability = tl.zeros([BLOCK], acc)
    if DIVERSITY:
        inverse_experts = 1.0 / (tl.zeros([], acc) + E)
        total = tl.zeros([BLOCK], acc)
        for k in range(E):
            total += tl.load(logits_ptr + (k * B + b) * n + lanes, mask=mask, other=0.0)
        mean_logits = total * inverse_experts * inverse_temperature
        mean_probability = tl.exp(mean_logits - tl.load(mean_max_ptr + b)) / tl.load(mean_sum_ptr + b)
    for k in range(E):
        row = k * B + b
        z = tl.load(logits_ptr + row * n + lanes, mask=mask, other=0.0)
        margin_logits = tl.where(is_target, z - margin, z)
        ce_probability = tl.exp(margin_logits - tl.load(ce_max_ptr + row)) / tl.load(ce_sum_ptr + row)
        grad = ce_coef * (ce_probability - tl.where(is_target, 1.0, 0.0))  # logit_gradient, CE part
        if DIVERSITY:
            expert_probability = (tl.exp(z * inverse_temperature - tl.load(expert_max_ptr + row))
                                  / tl.load(expert_sum_ptr + row))
            grad += div_coef * (expert_probability - mean_probability) * inverse_temperature
        tl.debug_barrier()  # every expert's logits were read for the mean before any is overwritten
        tl.store(logits_ptr + row * n + lanes, grad, mask=mask)


def merge_chunk(logits, target, row_margins, inverse_temperature, stats, c0, diversity):
    """Folds the chunk's logits [E, B, n] (contiguous, column scale and bias applied) into ``stats`` in place."""
    E, B, n = logits.shape
    _merge_chunk_kernel[(B,)](logits, target, row_margins, inverse_temperature, stats["ce_max"], stats["ce_sum"],
                              stats["expert_max"], stats["expert_sum"], stats["gap"], stats["target_logit"],
                              stats["mean_max"], stats["mean_sum"], E, B, n, c0, DIVERSITY=diversity,
                              BLOCK=triton.next_power_of_2(n))


def chunk_gradient(logits, target, row_margins, ce_coef, inverse_temperature, stats, div_coef, c0, diversity):
    """Overwrites the chunk's logits [E, B, n] with d loss / d logits; ce_coef and div_coef are the rows' [B]
    factors (0 for ignored rows, whose label is -1)."""
    E, B, n = logits.shape
    _chunk_gradient_kernel[(B,)](logits, target, row_margins, ce_coef, inverse_temperature, stats["ce_max"],
                                 stats["ce_sum"], stats["expert_max"], stats["expert_sum"], stats["mean_max"],
                                 stats["mean_sum"], div_coef, E, B, n, c0, DIVERSITY=diversity,
                                 BLOCK=triton.next_power_of_2(n))
