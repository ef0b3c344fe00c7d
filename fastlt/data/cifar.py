"""CIFAR-10/100-LT from the standard python-pickle folders, with LDAM-DRW's generator (docs/methods.md section 1.1)."""

import os
import pickle

import numpy as np

from fastlt.data.base import ArrayDataset, exponential_counts, long_tailed_subset, validate_targets
from fastlt.data.transforms import NORMALIZATION
from fastlt.errors import DataError, MissingFileError

_LAYOUT = {
    10: ("cifar-10-batches-py", [f"data_batch_{i}" for i in range(1, 6)], ["test_batch"], "labels"),
    100: ("cifar-100-python", ["train"], ["test"], "fine_labels"),
}


def _load_pickles(folder, names, label_key):
    images, labels = [], []
    for name in names:
        path = os.path.join(folder, name)
        if not os.path.isfile(path):
            raise MissingFileError(f"CIFAR file not found: {path}")
        with open(path, "rb") as handle:
            try:
                batch = pickle.load(handle, encoding="latin1")
                images.append(np.asarray(batch["data"], dtype=np.uint8).reshape(-1, 3, 32, 32))
                labels.extend(batch[label_key])
            except (pickle.UnpicklingError, KeyError, ValueError, EOFError) as error:
                raise DataError(f"{path} is not a CIFAR python pickle batch: {error!r}") from error
    # HWC laid out densely: numpy's fancy indexing keeps a transposed view's strides, and DALI's external source
    # refuses strided batches
    return np.ascontiguousarray(np.concatenate(images).transpose(0, 2, 3, 1)), np.asarray(labels, dtype=np.int64)


class CIFARLT(ArrayDataset):
    """CIFAR-LT: the train split subsampled with ``n_i = int(n_max * (1/ratio)**(i/(C-1)))`` and a per-class
    shuffle after ``np.random.seed(seed)`` as LDAM-DRW does (classes keep their order, class 0 is the largest);
    the test split untouched. `root` is the folder holding ``cifar-10-batches-py`` / ``cifar-100-python``
    (or that folder itself). Images are uint8 [N, 32, 32, 3].

    >>> train = CIFAR100LT("~/data", split="train", ratio=100)    # doctest: +SKIP
    >>> len(train), train.class_counts.max(), train.class_counts.min()  # doctest: +SKIP
    (10847, 500, 5)
    """

    normalization = NORMALIZATION["cifar"]

    def __init__(self, root, num_classes, split="train", ratio=100, seed=0, transform=None):
        if num_classes not in _LAYOUT:
            raise ValueError(f"num_classes must be 10 or 100, got {num_classes}")
        if split not in ("train", "test"):
            raise ValueError(f"split must be 'train' or 'test', got {split!r}")
        folder_name, train_files, test_files, label_key = _LAYOUT[num_classes]
        root = os.path.expanduser(str(root))
        folder = root if os.path.basename(os.path.normpath(root)) == folder_name else os.path.join(root, folder_name)
        images, labels = _load_pickles(folder, train_files, label_key)
        labels = validate_targets(labels, num_classes, folder)
        counts = exponential_counts(len(images) / num_classes, ratio, num_classes)
        kept, _ = long_tailed_subset(labels, counts, np.random.RandomState(seed))
        self.num_classes = num_classes
        self.ratio = ratio
        self.train_class_counts = np.asarray(counts, dtype=np.int64)
        self.transform = transform
        if split == "train":
            self.images, self.targets, self.source_indices = images[kept], labels[kept], kept
        else:
            self.images, labels = _load_pickles(folder, test_files, label_key)
            self.targets = validate_targets(labels, num_classes, folder)
            self.source_indices = np.arange(len(labels))


class CIFAR10LT(CIFARLT):
    """CIFAR-10-LT (LDAM-DRW protocol); see `CIFARLT`.

    >>> CIFAR10LT("~/data", ratio=100).class_counts.tolist()  # doctest: +SKIP
    [5000, 2997, 1796, 1077, 645, 387, 232, 139, 83, 50]
    """

    def __init__(self, root, split="train", ratio=100, seed=0, transform=None):
        super().__init__(root, 10, split, ratio, seed, transform)


class CIFAR100LT(CIFARLT):
    """CIFAR-100-LT (LDAM-DRW protocol); see `CIFARLT`."""

    def __init__(self, root, split="train", ratio=100, seed=0, transform=None):
        super().__init__(root, 100, split, ratio, seed, transform)
