"""What the Triton launchers share: the class-block size, the Triton name of the accumulation dtype and the
fused losses' ignored row."""

import torch
import triton
import triton.language as tl

BLOCK_C = 1024  # classes per program step; a row of C classes takes ceil(C / BLOCK_C) steps
TRITON_DTYPES = {torch.float32: tl.float32, torch.float64: tl.float64}


def class_block(num_classes: int) -> int:
    """The BLOCK of a kernel that walks a row of ``num_classes`` classes: a power of two, at most BLOCK_C."""
    return min(BLOCK_C, triton.next_power_of_2(num_classes))


@triton.jit
def write_ignored_row(b, terms_ptr, num_terms, row_losses_ptr, grad_ptr, num_grad_rows, B, C, ACC: tl.constexpr,
                      WRITE_GRAD: tl.constexpr, BLOCK: tl.constexpr):
    """A fused loss's row labelled ignore_index: its ``num_terms`` row terms (a [B, num_terms] table), its row loss
    and its gradient rows (``num_grad_rows`` contiguous [B, C] slabs) are zeros; its label is never read as a
    class."""
    zero = tl.full([], 0.0, ACC)
    for k in range(num_terms):
        tl.store(terms_ptr + b * num_terms + k, zero)
    tl.store(row_losses_ptr + b, zero)
    if WRITE_GRAD:
        lanes = tl.arange(0, BLOCK)
        for k in range(num_grad_rows):
            for start in range(0, C, BLOCK):
                offsets = start + lanes
                tl.store(grad_ptr + (k * B + b) * C + offsets, tl.zeros([BLOCK], grad_ptr.dtype.element_ty),
                         mask=offsets < C)
