"""Logit adjustment (Menon et al., ICLR 2021): the logit-adjusted loss, i.e. Balanced Softmax (stage 1,
docs/methods.md 8.1), and post-hoc logit adjustment (stage 2, docs/methods.md 8.4): predict argmax_j z_j - tau *
log pi_j with the stage-1 logits z, tau picked on the VALIDATION split (never on test).

The sweep follows `fastlt.ops.tau_sweep`: the validation logits are computed once, and every tau is an argmax over
the shifted logits of a block of rows ([K, rows, C] at a time, never K copies of the whole logit matrix). On a
BalPoE model the same step is its test-time tau shift.

>>> logits = torch.tensor([[2.0, 1.5], [0.0, 1.0]])
>>> adjusted_predictions(logits, torch.tensor([90.0, 10.0]), [0.0, 1.0]).tolist()
[[0, 1], [1, 1]]
"""

from typing import Optional, Sequence, Tuple

import torch
from torch import nn

import fastlt
from fastlt import ops
from fastlt.engine import predict
from fastlt.methods.options import Named, declared, option
from fastlt.methods.registry import register_method
from fastlt.methods.stage1 import Method, stacked
from fastlt.methods.stage2 import SPLITS, Stage2Context, Stage2Result
from fastlt.ops._lt_constants import class_prior

DEFAULT_TAUS = tuple(round(0.1 * i, 1) for i in range(21))  # 0.0, 0.1, ..., 2.0 (tau = 1: Menon et al.'s default)
ROWS_PER_BLOCK = 4096


def log_prior(class_counts) -> torch.Tensor:
    return class_prior(torch.as_tensor(class_counts, dtype=torch.float64)).log()


def adjust(logits: torch.Tensor, class_counts, tau: float) -> torch.Tensor:
    """z - tau * log pi (fp32 [N, C])."""
    return logits.float() - float(tau) * log_prior(class_counts).float().to(logits.device)


def adjusted_predictions(logits: torch.Tensor, class_counts, taus: Sequence[float]) -> torch.Tensor:
    """LongTensor [K, N]: argmax_j (z_ij - taus[k] * log pi_j) for every tau, one pass over `logits` [N, C]."""
    if logits.dim() != 2:
        raise ValueError(f"adjusted_predictions: logits must be [N, C], got shape {tuple(logits.shape)}")
    taus = torch.as_tensor(list(taus), dtype=torch.float64)
    if taus.dim() != 1 or taus.numel() == 0 or not bool(torch.isfinite(taus).all()):
        raise ValueError(f"adjusted_predictions: taus must be a non-empty list of finite numbers, got {taus.tolist()}")
    shifts = (taus[:, None] * log_prior(class_counts)[None, :]).float().to(logits.device)  # [K, C]
    if shifts.shape[1] != logits.shape[1]:
        raise ValueError(f"adjusted_predictions: class_counts has {shifts.shape[1]} classes, logits {logits.shape[1]}")
    blocks = [(block.float()[None, :, :] - shifts[:, None, :]).argmax(-1)
              for block in logits.split(ROWS_PER_BLOCK)]
    return torch.cat(blocks, dim=1)


def select_tau(val_logits: torch.Tensor, val_targets: torch.Tensor, class_counts,
               taus: Sequence[float] = DEFAULT_TAUS):
    """(best tau by overall class-mean accuracy on val, rows per tau); ties go to the tau nearest 0."""
    taus = [float(tau) for tau in taus]
    predictions = adjusted_predictions(val_logits, class_counts, taus)
    rows = ops.shot_accuracy_per_tau(predictions, val_targets, class_counts, taus)
    best = max(rows, key=lambda row: (row["overall"], -abs(row["tau"])))
    return best["tau"], rows


@declared
class BalancedSoftmaxOptions(Named):
    """The logit-adjusted loss's tau."""

    tau: float = option(1.0, "CE(z + tau * log pi): 1 is Balanced Softmax")


@register_method("balanced_softmax", BalancedSoftmaxOptions)
def balanced_softmax(options: BalancedSoftmaxOptions, counts, model) -> Method:
    """Balanced Softmax / logit-adjusted loss: CE(z + tau log pi), tau = 1 (PriorShiftedCE)."""
    loss = fastlt.PriorShiftedCE(counts, taus=[options.tau]).to(counts.device)
    return Method("balanced_softmax", lambda output, targets: loss(stacked(output, "expert_logits"), targets))


@declared
class LogitAdjustOptions(Named):
    """The test-time shift: a given tau, or the best of a sweep on a split."""

    tau: Optional[float] = option(None, "predict argmax z - tau * log pi (null: picked on select_on)")
    select_on: str = option("val", "the split tau is picked on", choices=SPLITS)
    taus: Tuple[float, ...] = option(DEFAULT_TAUS, "the swept taus")


def reload_adjusted(chosen: dict, model: nn.Module, folder: str, loader, class_counts, device):
    logits, targets = predict(model, loader, device=device)
    return adjust(logits, class_counts, chosen["tau"]), targets


@register_method("logit_adjust", LogitAdjustOptions, stage=2, needs_model=nn.Module, reload=reload_adjusted)
def logit_adjust(options: LogitAdjustOptions, stage: Stage2Context) -> Stage2Result:
    """Post-hoc logit adjustment: the stage-1 logits minus tau * log prior, tau picked on val."""
    chosen, tau = {}, options.tau
    if tau is None:
        loader = stage.selection_loader(options.select_on, "logit_adjust")
        val_logits, val_targets = predict(stage.model, loader, device=stage.device)
        tau, rows = select_tau(val_logits, val_targets, stage.class_counts, options.taus)
        chosen.update(selected_on=options.select_on, sweep=rows)
    chosen["tau"] = tau
    test_logits, targets = predict(stage.model, stage.plain_loaders["test"], device=stage.device)
    return Stage2Result(chosen, adjust(test_logits, stage.class_counts, tau), targets,
                        note=f" (tau {tau:.1f}, picked on {chosen.get('selected_on', 'config')})")
