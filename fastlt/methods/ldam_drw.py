"""LDAM-DRW (Cao et al., NeurIPS 2019; docs/methods.md 3.2): label-distribution-aware margins on a cosine classifier,
with deferred re-weighting (class weights from the effective number of samples) from epoch `drw_epoch` on.

In fastlt it is the RIDE loss with one head and no diversity term (`fastlt.RIDELoss`, diversity_factor 0): individual
LDAM-DRW, not the official RIDE code's collaborative switch. RIDE (ride.py) extends these options.
"""

from torch import nn

import fastlt
from fastlt.methods.options import Named, declared, default_of, option
from fastlt.methods.registry import register_method
from fastlt.methods.stage1 import Method, epoch_hook, stacked
from fastlt.models import FeatureClassifier, NormedLinear

LDAM_SCALE = default_of(fastlt.RIDELoss, "scale")  # the cosine classifier's s, as in LDAM-DRW and RIDE (30)


@declared
class LDAMDRWOptions(Named):
    """LDAM margins and the DRW phase (shared with RIDE)."""

    max_margin: float = option(default_of(fastlt.RIDELoss, "max_margin"),
                               "the rarest class's LDAM margin (margins ~ n_c^(-1/4))", low=0)
    drw_beta: float = option(default_of(fastlt.RIDELoss, "drw_beta"),
                             "DRW's effective-number beta: class weight (1 - beta) / (1 - beta^n_c)",
                             low=0, high=1, high_open=True)
    drw_epoch: int = option(default_of(fastlt.RIDELoss, "drw_epoch"),
                            "0-based epoch from which DRW is on (160: the official 1-based epoch > 160)", low=0)


def use_cosine_classifier(model: nn.Module) -> None:
    """LDAM needs normalised logits x s: swap a plain model's nn.Linear for NormedLinear(scale=30)."""
    if isinstance(model, FeatureClassifier) and isinstance(model.classifier, nn.Linear):
        linear = model.classifier
        model.classifier = NormedLinear(linear.in_features, linear.out_features, scale=LDAM_SCALE)


@register_method("ldam_drw", LDAMDRWOptions)
def ldam_drw(options: LDAMDRWOptions, counts, model) -> Method:
    """LDAM margins on a cosine classifier (s = 30), DRW class weights from epoch drw_epoch."""
    use_cosine_classifier(model)
    loss = fastlt.RIDELoss(counts, scale=LDAM_SCALE, max_margin=options.max_margin, diversity_factor=0.0,
                           drw_beta=options.drw_beta, drw_epoch=options.drw_epoch).to(counts.device)
    return Method("ldam_drw", lambda output, targets: loss(stacked(output, "expert_logits"), targets),
                  epoch_hook(loss))
