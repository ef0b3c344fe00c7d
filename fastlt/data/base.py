"""What every fastlt dataset shares: labels, class counts, the shot split, and the LDAM-DRW long-tail profile."""

import numpy as np
import torch

from fastlt.errors import DataError
from fastlt.splits import shot_split


def exponential_counts(n_max, ratio, num_classes):
    """LDAM-DRW's exponential profile ``n_i = int(n_max * (1/ratio)**(i/(C-1)))`` (class 0 is the largest).

    >>> exponential_counts(5000, 100, 10)
    [5000, 2997, 1796, 1077, 645, 387, 232, 139, 83, 50]
    """
    if ratio < 1:
        raise ValueError(f"ratio (max/min class size) must be >= 1, got {ratio}")
    if num_classes < 2:
        raise ValueError(f"num_classes must be >= 2, got {num_classes}")
    imbalance_factor = 1.0 / ratio
    return [int(n_max * imbalance_factor ** (index / (num_classes - 1.0))) for index in range(num_classes)]


def long_tailed_subset(targets, counts, random_state):
    """Per class (in class order), shuffle that class's indices with `random_state` and keep the first
    `counts[c]`, exactly as LDAM-DRW's `gen_imbalanced_data`; also returns each class's unused indices.

    Returns (kept indices grouped by class, list of per-class leftover index arrays).
    """
    kept, leftovers = [], []
    for cls, count in enumerate(counts):
        indices = np.where(targets == cls)[0]
        if count > len(indices):
            raise DataError(f"class {cls} has {len(indices)} images, the profile asks for {count}")
        random_state.shuffle(indices)
        kept.append(indices[:count])
        leftovers.append(indices[count:])
    return np.concatenate(kept), leftovers


def validate_targets(targets, num_classes, source):
    """int64 labels, each in [0, num_classes); `source` names the file or argument in the error."""
    targets = np.asarray(targets, dtype=np.int64)
    if targets.size == 0:
        raise DataError(f"{source}: no samples")
    bad = np.flatnonzero((targets < 0) | (targets >= num_classes))
    if bad.size:
        raise DataError(f"{source}: label {targets[bad[0]]} at sample {bad[0]} is outside [0, {num_classes})")
    return targets


class LongTailedDataset(torch.utils.data.Dataset):
    """Base class: subclasses set `targets` (int64 numpy), `num_classes` and `train_class_counts`.

    `class_counts` counts this split; `shot_split()` always uses the training counts (a test split of a
    long-tailed dataset is balanced, but its classes keep their training many/medium/few membership).
    """

    targets: np.ndarray
    num_classes: int
    train_class_counts: np.ndarray
    normalization: tuple  # (mean, std) on the 0..1 scale, the loaders' default

    @property
    def class_counts(self):
        return np.bincount(self.targets, minlength=self.num_classes)

    def shot_split(self):
        """(many_ids, medium_ids, few_ids) from the training counts, see `fastlt.splits.shot_split`."""
        return shot_split(self.train_class_counts)

    def __len__(self):
        return len(self.targets)


class ArrayDataset(LongTailedDataset):
    """In-memory uint8 images [N, H, W] or [N, H, W, C]; items are (uint8 tensor [C, H, W], int label).

    `source_indices` are the rows of the original files each sample came from; `transform`, if given, is
    applied to the uint8 CHW tensor.
    """

    images: np.ndarray
    source_indices: np.ndarray
    transform = None

    @property
    def channels(self):
        return 1 if self.images.ndim == 3 else self.images.shape[3]

    def __getitem__(self, index):
        image = torch.from_numpy(self.images[index])
        image = image.unsqueeze(0) if image.ndim == 2 else image.permute(2, 0, 1)
        if self.transform is not None:
            image = self.transform(image)
        return image, int(self.targets[index])
