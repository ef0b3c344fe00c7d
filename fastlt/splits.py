"""Many / medium / few-shot class split: the one place that holds the thresholds, and the split accuracies.

Every long-tailed codebase (classifier-balancing `utils.py::shot_acc`, RIDE `test.py`) uses the same rule on the
number of *training* images of a class: many > 100, medium 20..100, few < 20.

It imports numpy only, so that every layer (fastlt.ops, fastlt.data, fastlt.engine) can use it.
"""

import math
from typing import Sequence

import numpy as np

MANY_SHOT_MIN = 101  # many: more than 100 training images
FEW_SHOT_MAX = 19  # few: fewer than 20 training images


def shot_split(class_counts):
    """Class ids of the many (> 100), medium (20..100) and few (< 20) training-image classes.

    >>> many, medium, few = shot_split([500, 100, 20, 19, 0])
    >>> many.tolist(), medium.tolist(), few.tolist()
    ([0], [1, 2], [3, 4])
    """
    counts = np.asarray(class_counts)
    if counts.ndim != 1:
        raise ValueError(f"shot_split: class_counts must be 1-D, got shape {counts.shape}")
    if counts.size and counts.min() < 0:
        raise ValueError(f"shot_split: class_counts must be >= 0, got min {counts.min()}")
    many = np.flatnonzero(counts >= MANY_SHOT_MIN)
    few = np.flatnonzero(counts <= FEW_SHOT_MAX)
    medium = np.flatnonzero((counts > FEW_SHOT_MAX) & (counts < MANY_SHOT_MIN))
    return many, medium, few


def split_accuracies(per_class, class_counts: Sequence[int]) -> dict:
    """{"class_mean", "many", "medium", "few"}: means of per-class accuracies over each split's evaluated classes
    (a class whose accuracy is NaN has no evaluation samples and is left out; NaN when a split has none).

    >>> split_accuracies([100.0, float("nan"), 50.0], class_counts=[500, 50, 5])
    {'class_mean': 75.0, 'many': 100.0, 'medium': nan, 'few': 50.0}
    """
    per_class = np.asarray(per_class, dtype=np.float64)
    if len(per_class) != len(class_counts):
        raise ValueError(f"split_accuracies: {len(per_class)} per-class accuracies but {len(class_counts)} counts")
    many, medium, few = shot_split(class_counts)

    def mean_over(class_ids) -> float:
        values = per_class[np.asarray(class_ids, dtype=np.int64)]
        values = values[~np.isnan(values)]
        return float(values.mean()) if values.size else math.nan

    return {"class_mean": mean_over(np.arange(len(per_class))), "many": mean_over(many),
            "medium": mean_over(medium), "few": mean_over(few)}
