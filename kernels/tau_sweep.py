"""Triton kernel of fastlt.ops.tau_sweep: raw logits from one matmul per row block, then one program per row takes
every tau's argmax of raw * scale + bias (torch.argmax semantics: first index of the max, the first NaN wins)."""

import torch
import triton
import triton.language as tl

from fastlt.kernels._common import class_block

ROW_BLOCK = 4096


@triton.jit
def _sweep_kernel(raw_ptr, scales_ptr, bias_ptr, out_ptr, C, K, N, row_offset, HAS_BIAS: tl.constexpr,
                  BLOCK: tl.constexpr):
    row = tl.program_id(0)
    for k in range(K):
        best_value = -float("inf")
        best_index = -1
        nan_index = -1
        for start in range(0, C, BLOCK):
            offsets = start + tl.arange(0, BLOCK)
            mask = offsets < C
            raw = tl.load(raw_ptr + row * C + offsets, mask=mask, other=0.0)
            values = raw * tl.load(scales_ptr + k * C + offsets, mask=mask, other=0.0)
            if HAS_BIAS:
                values += tl.load(bias_ptr + offsets, mask=mask, other=0.0)
            is_nan = (values != values) & mask
            first_nan = tl.min(tl.where(is_nan, offsets, C), axis=0)
            nan_index = tl.where((nan_index < 0) & (first_nan < C), first_nan, nan_index)
            clean = tl.where(is_nan | ~mask, -float("inf"), values)
            block_max = tl.max(clean, axis=0)
            block_index = tl.min(tl.where((clean == block_max) & mask & ~is_nan, offsets, C), axis=0)
            better = (block_index < C) & ((best_index < 0) | (block_max > best_value))
            best_index = tl.where(better, block_index, best_index)
            best_value = tl.where(better, block_max, best_value)
        tl.store(out_ptr + k * N + row_offset + row, tl.where(nan_index >= 0, nan_index, best_index))


def forward(features, weight, taus, bias, eps):
    acc = torch.float64 if torch.float64 in (features.dtype, weight.dtype) else torch.float32
    num_rows, num_classes, num_taus = features.shape[0], weight.shape[0], taus.shape[0]
    w = weight.to(acc)
    norms = torch.linalg.vector_norm(w, dim=1).clamp_min(eps)
    scales = norms.unsqueeze(0).pow(-taus.to(acc).unsqueeze(1)).contiguous()  # [K, C]
    bias = bias.to(acc).contiguous() if bias is not None else None
    out = torch.empty((num_taus, num_rows), dtype=torch.long, device=features.device)
    if num_rows == 0 or num_taus == 0:
        return out
    block = class_block(num_classes)
    for start in range(0, num_rows, ROW_BLOCK):
        raw = (features[start:start + ROW_BLOCK].to(acc) @ w.t()).contiguous()
        _sweep_kernel[(raw.shape[0],)](
            raw, scales, bias if bias is not None else raw, out, num_classes, num_taus, num_rows, start,
            HAS_BIAS=bias is not None, BLOCK=block,
        )
    return out
