"""What the Triton launchers share: the class-block size and the Triton name of the accumulation dtype."""

import torch
import triton
import triton.language as tl

BLOCK_C = 1024  # classes per program step; a row of C classes takes ceil(C / BLOCK_C) steps
TRITON_DTYPES = {torch.float32: tl.float32, torch.float64: tl.float64}


def class_block(num_classes: int) -> int:
    """The BLOCK of a kernel that walks a row of ``num_classes`` classes: a power of two, at most BLOCK_C."""
    return min(BLOCK_C, triton.next_power_of_2(num_classes))
