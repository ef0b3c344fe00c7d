"""Many / medium / few-shot class split: the one place that holds the thresholds.

Every long-tailed codebase (classifier-balancing `utils.py::shot_acc`, RIDE `test.py`) uses the same rule on the
number of *training* images of a class: many > 100, medium 20..100, few < 20.
"""

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
