"""Overall / many / medium / few on hand-made predictions, and the per-class plot."""

import math

import numpy as np
import pytest
import torch

from fastlt.engine.evaluate import (evaluate_logits, evaluate_predictions, format_results, per_class_accuracy,
                                    plot_per_class_accuracy)

# training counts -> many {0, 1} (> 100), medium {2, 3} (20..100, both ends included), few {4, 5} (< 20)
CLASS_COUNTS = [500, 101, 100, 20, 19, 3]


def test_splits_are_means_of_per_class_accuracies():
    # test set: class c has 4 samples; class c gets `right[c]` of them right, the others predicted as class 0/1
    right = [4, 3, 2, 1, 0, 4]
    targets, predictions = [], []
    for label, correct in enumerate(right):
        targets += [label] * 4
        predictions += [label] * correct + [1 if label == 0 else 0] * (4 - correct)
    results = evaluate_predictions(torch.tensor(predictions), torch.tensor(targets), CLASS_COUNTS)
    np.testing.assert_allclose(results["per_class"], [100, 75, 50, 25, 0, 100])
    assert results["overall"] == pytest.approx(100 * 14 / 24)
    assert results["class_mean"] == pytest.approx(350 / 6)
    assert (results["many"], results["medium"], results["few"]) == pytest.approx((87.5, 37.5, 50.0))


def test_unbalanced_test_set_separates_micro_and_class_mean():
    targets = torch.tensor([0] * 8 + [5] * 2)
    predictions = torch.tensor([0] * 8 + [0] * 2)  # head perfect, tail all wrong
    results = evaluate_predictions(predictions, targets, CLASS_COUNTS)
    assert results["overall"] == pytest.approx(80.0)
    assert results["class_mean"] == pytest.approx(50.0)  # classes 1..4 have no test samples: left out
    assert math.isnan(results["medium"])
    assert (results["many"], results["few"]) == (100.0, 0.0)
    assert np.isnan(per_class_accuracy(predictions, targets, 6)[1:5]).all()


def test_evaluate_logits_and_table():
    logits = torch.tensor([[2.0, 1.0, 0, 0, 0, 0], [0, 3.0, 0, 0, 0, 0], [0, 0, 0, 0, 0, 1.0]])
    results = evaluate_logits(logits, torch.tensor([0, 0, 5]), CLASS_COUNTS)
    assert results["overall"] == pytest.approx(200 / 3)
    table = format_results(results).splitlines()
    assert table[0] == "| overall | many | medium | few |" and table[2] == "| 66.7 | 50.0 | nan | 100.0 |"
    with pytest.raises(ValueError, match="predictions"):
        evaluate_predictions(torch.zeros(3), torch.zeros(2), CLASS_COUNTS)


def test_plot_writes_png(tmp_path):
    path = tmp_path / "per_class.png"
    plot_per_class_accuracy(np.array([90.0, 80, 50, 40, np.nan, 5]), CLASS_COUNTS, str(path), title="CE")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
