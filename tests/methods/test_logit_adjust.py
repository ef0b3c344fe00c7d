"""Post-hoc logit adjustment: the one-pass tau sweep against a per-tau loop, tau picked on val, and
`fastlt stage2 logit_adjust` + `fastlt eval` end to end on Digits-LT."""

import json
import os

import pytest
import torch
from conftest import DIGITS

from fastlt.cli import main
from fastlt.methods import logit_adjust
from fastlt.methods.logit_adjust import adjust, adjusted_predictions, select_tau

COUNTS = torch.tensor([500.0, 200, 90, 40, 15, 5])


def test_sweep_equals_one_argmax_per_tau_across_row_blocks(monkeypatch):
    monkeypatch.setattr(logit_adjust, "ROWS_PER_BLOCK", 7)  # 50 rows: several blocks and a ragged last one
    logits = torch.randn(50, len(COUNTS)) * 3
    taus = [-0.5, 0.0, 0.3, 1.0, 2.0]
    log_prior = (COUNTS / COUNTS.sum()).log()
    expected = torch.stack([(logits - tau * log_prior).argmax(1) for tau in taus])
    assert torch.equal(adjusted_predictions(logits, COUNTS, taus), expected)
    assert torch.allclose(adjust(logits, COUNTS, 1.0), logits - log_prior)


def test_tau_picked_on_val_undoes_a_prior_bias():
    """Logits that are the true one-hot scores plus log pi (a classifier biased by the training prior): tau = 1
    removes the bias and is the best tau of the grid."""
    targets = torch.arange(60) % len(COUNTS)
    log_prior = (COUNTS / COUNTS.sum()).log()
    logits = 2.0 * torch.nn.functional.one_hot(targets, len(COUNTS)) + log_prior
    tau, rows = select_tau(logits, targets, COUNTS)
    assert len(rows) == 21 and rows[0]["overall"] < 100.0
    best = [row["tau"] for row in rows if row["overall"] == 100.0]
    assert tau == min(best, key=abs) and 1.0 in best


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="logits must be"):
        adjusted_predictions(torch.zeros(6), COUNTS, [1.0])
    with pytest.raises(ValueError, match="finite"):
        adjusted_predictions(torch.zeros(2, 6), COUNTS, [float("nan")])
    with pytest.raises(ValueError, match="6 classes, logits 5"):
        adjusted_predictions(torch.zeros(2, 5), COUNTS, [1.0])


def test_stage2_on_a_ce_run_picks_tau_on_val_and_eval_reproduces_it(tmp_path, capsys):
    run = str(tmp_path / "ce")
    quick = DIGITS + ["train.epochs=1", "train.schedule.milestones=[1]", "train.schedule.warmup_epochs=0"]
    main(["train", "--config", "mnist_lt_logit_adjust", *quick, f"out={run}", "--no-progress"])
    with open(os.path.join(run, "stage2_logit_adjust", "stage2.json")) as handle:
        chosen = json.load(handle)
    assert chosen["selected_on"] == "val" and len(chosen["sweep"]) == 21
    assert chosen["tau"] == max(chosen["sweep"], key=lambda row: (row["overall"], -abs(row["tau"])))["tau"]
    # the stage2 command with a fixed tau, then eval reproduces its test figure
    main(["stage2", "logit_adjust", run, "stage2.tau=1.5", "--no-progress"])
    with open(os.path.join(run, "stage2_logit_adjust", "results.json")) as handle:
        overall = json.load(handle)["overall"]
    assert "tau 1.5, picked on config" in capsys.readouterr().out
    main(["eval", "--run", os.path.join(run, "stage2_logit_adjust")])
    assert f"{overall:.1f}" in capsys.readouterr().out
