"""BalPoE (Sanchez Aimar et al., CVPR 2023; docs/methods.md 8.2): a balanced product of logit-adjusted experts.

Expert k is trained with logit-adjusted cross-entropy at its own tau_k, CE(z_k + tau_k * log pi, y), and the
prediction is the mean of the expert logits. With mean(tau) = 1 the mean of the experts' logits estimates the
balanced (uniform-prior) posterior, so no test-time correction is needed on a balanced test set; a known other test
prior is a test-time logit shift (`fastlt stage2 logit_adjust` picks one on val).

The official `BSExpertLoss` (emasa/BalPoE-CalibratedLT, model/loss.py) averages the E expert losses; here that is
one fused `fastlt.ops.prior_shifted_ce` call over all experts (it sums them) divided by E. The official
`log(prior + 1e-9)` differs from the exact log prior by under 1e-9 / min(prior) (2e-4 on iNaturalist 2018) and is
not reproduced. The official recipes also train with mixup (alpha 0.2-0.4) for calibration: the recipes' train.mixup
(fastlt.engine.mix; the loss is then this one per label set, lam * L(y_a) + (1 - lam) * L(y_b)).

>>> counts = torch.tensor([500.0, 50.0, 5.0])
>>> loss = BalPoELoss(counts, taus=limits_taus(3, 0.0, 2.0))
>>> loss.taus
[0.0, 1.0, 2.0]
>>> logits, target = torch.randn(3, 4, 3), torch.tensor([0, 1, 2, 0])
>>> reference = fastlt.ops.prior_shifted_ce_reference(logits, target, counts, taus=[0.0, 1.0, 2.0]) / 3
>>> torch.allclose(loss(logits, target), reference)
True
"""

from typing import Optional, Sequence, Tuple

import torch
from torch import nn

from fastlt import ops
from fastlt.errors import ConfigError
from fastlt.methods.options import Named, declared, option
from fastlt.methods.registry import register_method
from fastlt.methods.stage1 import Method


def limits_taus(num_experts: int, tau_min: float, tau_max: float) -> list:
    """The official 'limits' tau list: E equidistant taus from tau_min to tau_max (one expert: their mean).

    >>> limits_taus(7, 0.0, 2.0)[:3]
    [0.0, 0.3333333333333333, 0.6666666666666666]
    """
    if num_experts < 1:
        raise ValueError(f"limits_taus: num_experts must be >= 1, got {num_experts}")
    if num_experts == 1:
        return [(tau_min + tau_max) / 2.0]
    return [tau_min + (tau_max - tau_min) * index / (num_experts - 1) for index in range(num_experts)]


class BalPoELoss(nn.Module):
    """mean_k CE(z_k + tau_k * log(pi), y) over the E experts of `expert_logits` [E, B, C]: one fused call."""

    def __init__(self, class_counts, taus: Sequence[float]):
        super().__init__()
        taus = [float(tau) for tau in taus]
        if not taus:
            raise ValueError("BalPoELoss: taus must hold one value per expert, got an empty list")
        self.register_buffer("class_counts", torch.as_tensor(class_counts, dtype=torch.float64), persistent=False)
        self.taus = taus

    @property
    def mean_tau(self) -> float:
        return sum(self.taus) / len(self.taus)

    def forward(self, expert_logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if expert_logits.dim() != 3 or expert_logits.shape[0] != len(self.taus):
            raise ValueError(f"BalPoELoss: expert_logits must be [E={len(self.taus)}, B, C] (one expert per tau), "
                             f"got shape {tuple(expert_logits.shape)}")
        summed = ops.prior_shifted_ce(expert_logits, target, self.class_counts, taus=self.taus)
        return summed / len(self.taus)

    def extra_repr(self) -> str:
        return f"num_classes={self.class_counts.numel()}, taus={self.taus}"


@declared
class BalPoEOptions(Named):
    """One logit-adjustment tau per expert: the list, or E equidistant ones from tau_min to tau_max."""

    taus: Optional[Tuple[float, ...]] = option(None, "one tau per expert, e.g. [0, 1, 2] (null: tau_min..tau_max)")
    tau_min: float = option(0.0, "the first expert's tau when taus is null (the official 'limits')")
    tau_max: float = option(2.0, "the last expert's tau when taus is null")


@register_method("balpoe", BalPoEOptions)
def balpoe(options: BalPoEOptions, counts, model) -> Method:
    """BalPoE: expert k trained with CE(z_k + tau_k log pi), the experts' losses averaged (one fused call)."""
    num_experts = getattr(model, "num_experts", None)
    if num_experts is None:
        raise ConfigError(f"balpoe: needs a multi-expert model (e.g. ride_small_cnn), got {type(model).__name__}")
    taus = options.taus
    if taus is None:
        taus = limits_taus(num_experts, options.tau_min, options.tau_max)
    if len(taus) != num_experts:
        raise ConfigError(f"balpoe: taus has {len(taus)} values but the model has {num_experts} experts")
    loss = BalPoELoss(counts, taus).to(counts.device)
    return Method("balpoe", lambda output, targets: loss(output.expert_logits, targets))
