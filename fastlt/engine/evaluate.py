"""Evaluation as the papers report it: overall top-1 and many / medium / few accuracies, each split being the mean
of per-class accuracies over its classes, with the split decided by TRAINING counts (fastlt.splits), and a
plot of per-class accuracy against training count.

>>> results = evaluate_predictions([0, 1, 1, 2], [0, 1, 2, 2], class_counts=[500, 50, 5])
>>> print(format_results(results))
| overall | many | medium | few |
|---:|---:|---:|---:|
| 75.0 | 100.0 | 100.0 | 50.0 |
"""

import math
from typing import Optional, Sequence

import numpy as np
import torch

from fastlt.splits import split_accuracies


def per_class_accuracy(predictions, targets, num_classes: int) -> np.ndarray:
    """Accuracy in percent of every class over its evaluation samples; NaN for a class without samples."""
    predictions = torch.as_tensor(predictions).reshape(-1).cpu().long()
    targets = torch.as_tensor(targets).reshape(-1).cpu().long()
    if predictions.shape != targets.shape:
        raise ValueError(f"per_class_accuracy: {predictions.numel()} predictions but {targets.numel()} targets")
    samples = torch.bincount(targets, minlength=num_classes).double()
    correct = torch.bincount(targets[predictions == targets], minlength=num_classes).double()
    accuracy = 100.0 * correct / samples
    return accuracy.numpy()  # 0 / 0 = NaN marks classes without samples


def evaluate_predictions(predictions, targets, class_counts: Sequence[int]) -> dict:
    """Overall (micro) top-1, class-mean, many / medium / few in percent, and the per-class array.

    "overall" is the fraction of correct samples, which equals the class mean on balanced test sets (all papers'
    test sets are); both are returned because they differ on an unbalanced validation split.
    """
    predictions = torch.as_tensor(predictions).reshape(-1).cpu()
    targets = torch.as_tensor(targets).reshape(-1).cpu()
    per_class = per_class_accuracy(predictions, targets, len(class_counts))
    overall = 100.0 * float((predictions == targets).double().mean()) if targets.numel() else math.nan
    return {"overall": overall, **split_accuracies(per_class, class_counts), "per_class": per_class}


def evaluate_logits(logits: torch.Tensor, targets, class_counts: Sequence[int]) -> dict:
    return evaluate_predictions(logits.argmax(dim=1), targets, class_counts)


def format_results(results: dict, digits: int = 1) -> str:
    """A one-row Markdown table of overall / many / medium / few."""
    columns = ("overall", "many", "medium", "few")
    header = "| " + " | ".join(columns) + " |"
    rule = "|" + "|".join("---:" for _ in columns) + "|"
    row = "| " + " | ".join(f"{results[column]:.{digits}f}" for column in columns) + " |"
    return "\n".join((header, rule, row))


def plot_per_class_accuracy(per_class: np.ndarray, class_counts: Sequence[int], path: str,
                            title: Optional[str] = None) -> None:
    """Writes a PNG: per-class accuracy (dots) against the class's training count (log x axis), with the
    many / medium / few boundaries (20 and 100 images) drawn as dashed lines."""
    # A Figure with an Agg canvas: no pyplot, so the caller's matplotlib backend and global state are untouched.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    counts = np.maximum(np.asarray(class_counts, dtype=np.float64), 1)
    figure = Figure(figsize=(6, 4), dpi=120)
    FigureCanvasAgg(figure)
    axis = figure.add_subplot()
    axis.scatter(counts, per_class, s=12, alpha=0.7)
    for boundary in (20, 100):
        axis.axvline(boundary, color="grey", linestyle="--", linewidth=0.8)
    axis.set_xscale("log")
    axis.set_xlabel("training images of the class")
    axis.set_ylabel("test accuracy of the class (%)")
    axis.set_ylim(-2, 102)
    if title:
        axis.set_title(title)
    figure.tight_layout()
    figure.savefig(path)
