"""Triton kernels of fastlt.ops.expert_aggregate (formula in fastlt/ops/expert_aggregate.py).

The per-row coefficient table [B, E] is tiny and computed by the op's own helper; the kernels stream the logits once.
"""

import torch
import triton
import triton.language as tl

from fastlt._formulas import accumulate_dtype, expert_coefficients
from fastlt.kernels._common import class_block


@triton.jit
def _forward_kernel(logits_ptr, coef_ptr, out_ptr, stride_e, stride_b, stride_c, E, C, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    offsets = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = offsets < C
    acc = tl.zeros([BLOCK], dtype=coef_ptr.dtype.element_ty)
    for k in range(E):  # experts in order 0..E-1, as every backend sums them
        coef = tl.load(coef_ptr + row * E + k)
        z = tl.load(logits_ptr + k * stride_e + row * stride_b + offsets * stride_c, mask=mask, other=0.0)
        acc += coef * z.to(acc.dtype)
    tl.store(out_ptr + row * C + offsets, acc.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _backward_logits_kernel(grad_ptr, coef_ptr, out_ptr, B, E, C, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    offsets = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = offsets < C
    g = tl.load(grad_ptr + row * C + offsets, mask=mask, other=0.0).to(coef_ptr.dtype.element_ty)
    for k in range(E):
        coef = tl.load(coef_ptr + row * E + k)
        tl.store(out_ptr + (k * B + row) * C + offsets, (coef * g).to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _backward_weights_kernel(grad_ptr, logits_ptr, unweighted_ptr, out_ptr, stride_e, stride_b, stride_c, E, C,
                             BLOCK: tl.constexpr):
    row = tl.program_id(0)
    k = tl.program_id(1)
    acc = tl.zeros([BLOCK], dtype=unweighted_ptr.dtype.element_ty)
    for start in range(0, C, BLOCK):
        offsets = start + tl.arange(0, BLOCK)
        mask = offsets < C
        g = tl.load(grad_ptr + row * C + offsets, mask=mask, other=0.0).to(acc.dtype)
        z = tl.load(logits_ptr + k * stride_e + row * stride_b + offsets * stride_c, mask=mask, other=0.0)
        acc += g * z.to(acc.dtype)
    tl.store(out_ptr + row * E + k, tl.sum(acc, axis=0) * tl.load(unweighted_ptr + row * E + k))


def _tables(logits, reduce, weights, active):
    num_experts, num_rows, _ = logits.shape
    acc = accumulate_dtype(logits.dtype)
    unweighted, coef = expert_coefficients(num_rows, num_experts, reduce, weights, active, acc, logits.device)
    return unweighted.contiguous(), coef.contiguous()


def forward(logits, reduce, weights, active):
    num_experts, num_rows, num_classes = logits.shape
    _, coef = _tables(logits, reduce, weights, active)
    out = torch.empty((num_rows, num_classes), dtype=logits.dtype, device=logits.device)
    block = class_block(num_classes)
    grid = (num_rows, triton.cdiv(num_classes, block))
    _forward_kernel[grid](logits, coef, out, *logits.stride(), num_experts, num_classes, BLOCK=block)
    return out


def backward(grad, logits, reduce, weights, active, weights_requires_grad):
    num_experts, num_rows, num_classes = logits.shape
    unweighted, coef = _tables(logits, reduce, weights, active)
    grad = grad.to(logits.dtype).contiguous()
    grad_logits = torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)
    block = class_block(num_classes)
    _backward_logits_kernel[(num_rows, triton.cdiv(num_classes, block))](
        grad, coef, grad_logits, num_rows, num_experts, num_classes, BLOCK=block
    )
    if not (weights_requires_grad and weights is not None):
        return grad_logits, logits.new_empty((0,))
    grad_table = torch.empty_like(unweighted)
    _backward_weights_kernel[(num_rows, num_experts)](
        grad, logits, unweighted, grad_table, *logits.stride(), num_experts, num_classes, BLOCK=block
    )
    grad_weights = grad_table.sum(0) if weights.dim() == 1 else grad_table
    return grad_logits, grad_weights.to(weights.dtype)
