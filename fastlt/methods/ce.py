"""Cross-entropy with instance-balanced sampling: the "Joint" / CE baseline of every paper's table, and the stage 1
that Decoupling's stage 2 (cRT, LWS, tau-norm, NCM) starts from."""

import torch.nn.functional as F

from fastlt.methods.options import Named, declared
from fastlt.methods.registry import register_method
from fastlt.methods.stage1 import Method


@declared
class CEOptions(Named):
    """Cross-entropy has no options."""


@register_method("ce", CEOptions)
def cross_entropy(options: CEOptions, counts, model) -> Method:
    """Plain cross-entropy on the logits (the baseline)."""
    return Method("ce", lambda output, targets: F.cross_entropy(output.logits, targets))
