"""Triton kernels of fastlt.ops.tau_normalize: one program per weight row (formula in
csrc/include/fastlt/tau_normalize.h)."""

import torch
import triton
import triton.language as tl

from fastlt._formulas import accumulate_dtype
from fastlt.kernels._common import TRITON_DTYPES

BLOCK_D = 1024


@triton.jit
def _clamp_norm(norm, eps):
    """max(norm, eps) that keeps a NaN norm (a row holding a NaN gives a NaN row, as the reference)."""
    return tl.where(norm < eps, eps, norm)


@triton.jit
def _row_scale(sum_squares, tau, eps):
    # norm ** -tau; pow(x, 0) = 1 for every x (NaN, inf) as in C and torch, where exp(-0 * log(inf)) would be NaN
    power = tl.exp(-tau * tl.log(_clamp_norm(tl.sqrt(sum_squares), eps)))
    return tl.where(tau == 0, 1.0, power)


@triton.jit
def _grad_weight_coefficient(sum_squares, grad_dot_weight, scale, tau, eps):
    """c of dL/dw = s * g - c * w (fastlt/tau_normalize.h row_grad_weight_coefficient): NaN for a NaN row, 0 for
    a constant scale (tau = 0 or the norm clamped to eps)."""
    norm = tl.sqrt(sum_squares)
    constant = (tau == 0) | (norm < eps)
    coefficient = tau * scale * grad_dot_weight / tl.where(constant, 1.0, sum_squares)
    return tl.where(norm != norm, norm, tl.where(constant, 0.0, coefficient))


@triton.jit
def _forward_kernel(weight_ptr, out_ptr, params_ptr, D, BLOCK: tl.constexpr, ACC: tl.constexpr):
    row = tl.program_id(0)
    tau = tl.load(params_ptr)
    eps = tl.load(params_ptr + 1)
    squares = tl.zeros([BLOCK], dtype=ACC)
    for start in range(0, D, BLOCK):
        offsets = start + tl.arange(0, BLOCK)
        w = tl.load(weight_ptr + row * D + offsets, mask=offsets < D, other=0.0).to(ACC)
        squares += w * w
    scale = _row_scale(tl.sum(squares, axis=0), tau, eps)
    for start in range(0, D, BLOCK):
        offsets = start + tl.arange(0, BLOCK)
        mask = offsets < D
        w = tl.load(weight_ptr + row * D + offsets, mask=mask, other=0.0).to(ACC)
        tl.store(out_ptr + row * D + offsets, (w * scale).to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _backward_kernel(grad_ptr, weight_ptr, out_ptr, params_ptr, D, BLOCK: tl.constexpr, ACC: tl.constexpr):
    row = tl.program_id(0)
    tau = tl.load(params_ptr)
    eps = tl.load(params_ptr + 1)
    squares = tl.zeros([BLOCK], dtype=ACC)
    dots = tl.zeros([BLOCK], dtype=ACC)
    for start in range(0, D, BLOCK):
        offsets = start + tl.arange(0, BLOCK)
        mask = offsets < D
        w = tl.load(weight_ptr + row * D + offsets, mask=mask, other=0.0).to(ACC)
        g = tl.load(grad_ptr + row * D + offsets, mask=mask, other=0.0).to(ACC)
        squares += w * w
        dots += g * w
    sum_squares = tl.sum(squares, axis=0)
    scale = _row_scale(sum_squares, tau, eps)
    coefficient = _grad_weight_coefficient(sum_squares, tl.sum(dots, axis=0), scale, tau, eps)
    for start in range(0, D, BLOCK):
        offsets = start + tl.arange(0, BLOCK)
        mask = offsets < D
        w = tl.load(weight_ptr + row * D + offsets, mask=mask, other=0.0).to(ACC)
        g = tl.load(grad_ptr + row * D + offsets, mask=mask, other=0.0).to(ACC)
        tl.store(out_ptr + row * D + offsets, (scale * g - coefficient * w).to(out_ptr.dtype.element_ty), mask=mask)


def _launch_args(weight, tau, eps):
    """(tau, eps) as a tensor in the accumulation dtype (a Python float would reach the kernel as fp32)."""
    acc = accumulate_dtype(weight.dtype)
    params = torch.tensor([tau, eps], dtype=acc, device=weight.device)
    block = min(BLOCK_D, triton.next_power_of_2(weight.shape[1]))
    return params, block, TRITON_DTYPES[acc]


def forward(weight, tau, eps):
    weight = weight.contiguous()
    out = torch.empty_like(weight)
    params, block, acc = _launch_args(weight, tau, eps)
    _forward_kernel[(weight.shape[0],)](weight, out, params, weight.shape[1], BLOCK=block, ACC=acc)
    return out


def backward(grad, weight, tau, eps):
    weight = weight.contiguous()
    grad = grad.to(weight.dtype).contiguous()
    out = torch.empty_like(weight)
    params, block, acc = _launch_args(weight, tau, eps)
    _backward_kernel[(weight.shape[0],)](grad, weight, out, params, weight.shape[1], BLOCK=block, ACC=acc)
    return out
