"""Every loss reads a strided target (e.g. labels[::2]) as its values, in every backend."""

import pytest
import torch
from op_helpers import COMPILED_BACKENDS, backend

from fastlt import ops


def _cases():
    logits = torch.randn(3, 8, 20, dtype=torch.float64)
    counts = torch.arange(200, 0, -10)
    groups = ops.reslt_groups(counts, cutoffs=[7, 14])
    return [
        (lambda t: ops.ride_loss(logits, t, counts, drw=True),
         lambda t: ops.ride_loss_reference(logits, t, counts, drw=True)),
        (lambda t: ops.reslt_loss(logits, t, groups, beta=0.9),
         lambda t: ops.reslt_loss_reference(logits, t, groups, beta=0.9)),
        (lambda t: ops.prior_shifted_ce(logits, t, counts, taus=[0.0, 1.0, 2.0]),
         lambda t: ops.prior_shifted_ce_reference(logits, t, counts, taus=[0.0, 1.0, 2.0])),
    ]


@pytest.mark.parametrize("name", COMPILED_BACKENDS)
def test_strided_target_matches_contiguous(name):
    target = torch.randint(0, 20, (16,))[::2]
    assert not target.is_contiguous()
    for fused, reference in _cases():
        with backend(name):
            torch.testing.assert_close(fused(target), reference(target.contiguous()))
