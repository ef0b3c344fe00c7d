"""Online softmax statistics for the fused-loss Triton kernels: the lane-wise form of fastlt/softmax_stats.h
(add_to_softmax_stats, merge_softmax_stats). Each of a program's BLOCK lanes keeps (max, sum exp(x - max)) of the
classes it saw; the lanes are merged once the row is done."""

import triton
import triton.language as tl


@triton.jit
def add_to_softmax_stats(maximum, shifted_sum, x, mask):
    """Adds x to each lane's statistics; masked lanes stay as they are (empty lanes: (-inf, 0))."""
    x = tl.where(mask, x, float("-inf"))
    new_maximum = tl.maximum(maximum, x, propagate_nan=tl.PropagateNan.ALL)
    # Shift an empty lane by 0, not -inf: exp(-inf - -inf) would be NaN where the lane should stay (-inf, 0).
    shift = tl.where(new_maximum == float("-inf"), 0.0, new_maximum)
    return new_maximum, shifted_sum * tl.exp(maximum - shift) + tl.exp(x - shift)


@triton.jit
def merge_lanes(maximum, shifted_sum):
    """The row's (max, sum exp(x - max)) from the lanes' statistics; NaN in any lane makes both NaN."""
    row_maximum = tl.max(maximum, axis=0)
    row_maximum = tl.where(tl.sum(tl.where(maximum != maximum, 1, 0), axis=0) > 0, float("nan"), row_maximum)
    shift = tl.where(row_maximum == float("-inf"), 0.0, row_maximum)
    return row_maximum, tl.sum(shifted_sum * tl.exp(maximum - shift), axis=0)
