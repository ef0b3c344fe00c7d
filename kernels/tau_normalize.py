"""Triton kernels of fastlt.ops.tau_normalize: one program per weight row (formula in
csrc/include/fastlt/tau_normalize.h)."""

import torch
import triton
import triton.language as tl

BLOCK_D = 1024


@triton.jit
def _row_scale(sum_squares, tau, eps):
    norm = tl.maximum(tl.sqrt(sum_squares), eps)
    return tl.exp(-tau * tl.log(norm))


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
    clamped = tl.sqrt(sum_squares) <= eps
    coefficient = tl.where(clamped, 0.0, tau * scale * tl.sum(dots, axis=0) / tl.where(clamped, 1.0, sum_squares))
    for start in range(0, D, BLOCK):
        offsets = start + tl.arange(0, BLOCK)
        mask = offsets < D
        w = tl.load(weight_ptr + row * D + offsets, mask=mask, other=0.0).to(ACC)
        g = tl.load(grad_ptr + row * D + offsets, mask=mask, other=0.0).to(ACC)
        tl.store(out_ptr + row * D + offsets, (scale * g - coefficient * w).to(out_ptr.dtype.element_ty), mask=mask)


def _launch_args(weight, tau, eps):
    """(tau, eps) as a tensor in the accumulation dtype (a Python float would reach the kernel as fp32)."""
    acc = torch.float64 if weight.dtype == torch.float64 else torch.float32
    params = torch.tensor([tau, eps], dtype=acc, device=weight.device)
    block = min(BLOCK_D, triton.next_power_of_2(weight.shape[1]))
    return params, block, (tl.float64 if acc == torch.float64 else tl.float32)


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
