"""Torch-only helpers shared by the eager references (fastlt.ops) and the Triton launchers (fastlt.kernels).

They live below both, so that the Triton kernels never import fastlt.ops (which imports them).
"""

import torch

# The losses' reductions, as torch.nn.CrossEntropyLoss names them; the fused ops take the index (0 none, 1 mean,
# 2 sum: csrc/include/fastlt/common.h's Reduction).
REDUCTIONS = ("none", "mean", "sum")
REDUCTION_NONE, REDUCTION_MEAN, REDUCTION_SUM = range(3)


def accumulate_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp32 accumulation for fp16/bf16/fp32, fp64 for fp64 (as the kernels do).

    >>> accumulate_dtype(torch.bfloat16), accumulate_dtype(torch.float64)
    (torch.float32, torch.float64)
    """
    return torch.float64 if dtype == torch.float64 else torch.float32


def expert_coefficients(num_rows: int, num_experts: int, reduce: str, weights, active, dtype, device):
    """(unweighted [B, E], coef [B, E]) of expert_aggregate's formula (fastlt/ops/expert_aggregate.py), in
    ``dtype`` (the accumulation dtype)."""
    if active is None:
        on = torch.ones(num_rows, num_experts, dtype=dtype, device=device)
    else:
        on = active.to(dtype)
    divisor = on.sum(1, keepdim=True) if reduce == "mean" else torch.ones(num_rows, 1, dtype=dtype, device=device)
    unweighted = on / divisor.clamp_min(1)
    coef = unweighted if weights is None else unweighted * weights.to(dtype).expand(num_rows, num_experts)
    return unweighted, coef
