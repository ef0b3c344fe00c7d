"""ImageNet-LT / Places-LT / iNaturalist-2018 list-file datasets (`relative/path.jpg label` per line)."""

import os
import warnings

import numpy as np

from fastlt.data.base import LongTailedDataset, validate_targets
from fastlt.data.transforms import NORMALIZATION
from fastlt.errors import DataError, MissingFileError


def read_list_file(list_file):
    """(relative paths, int64 labels) of a ``path label`` list file; paths may contain spaces.

    >>> import tempfile, pathlib
    >>> listing = pathlib.Path(tempfile.mkdtemp()) / "train.txt"
    >>> _ = listing.write_text("train/a b/img 1.jpg 3\\n\\ntrain/c.jpg 0\\n")
    >>> read_list_file(str(listing))
    (['train/a b/img 1.jpg', 'train/c.jpg'], array([3, 0]))
    """
    if not os.path.isfile(list_file):
        raise MissingFileError(f"list file not found: {list_file}")
    paths, labels = [], []
    with open(list_file, "rb") as handle:
        for line_number, raw in enumerate(handle, 1):
            try:
                line = raw.decode("utf-8").strip()
            except UnicodeDecodeError as error:
                raise DataError(f"{list_file}:{line_number}: not UTF-8 text ({error.reason} at byte "
                                f"{error.start}: {raw[error.start:error.start + 4]!r}); re-encode the list file "
                                f"as UTF-8") from None
            if not line:
                continue
            parts = line.rsplit(maxsplit=1)
            if len(parts) != 2 or not parts[1].lstrip("-").isdigit():
                raise DataError(f"{list_file}:{line_number}: expected 'relative/path label', got {line!r}")
            paths.append(parts[0])
            labels.append(int(parts[1]))
    if not paths:
        raise DataError(f"list file {list_file} is empty (no 'path label' lines)")
    return paths, np.asarray(labels, dtype=np.int64)


def frequency_class_map(class_counts):
    """ResLT's relabelling: ``class_map[argsort(counts)[i]] = i`` (label 0 = rarest; numpy's default sort)."""
    class_map = np.empty(len(class_counts), dtype=np.int64)
    class_map[np.argsort(class_counts)] = np.arange(len(class_counts))
    return class_map


class ListFileDataset(LongTailedDataset):
    """Images listed in a ``relative/path.jpg label`` file under `root`, loaded with PIL as RGB.

    For a val/test list pass the training dataset as `train_dataset`: it supplies `num_classes`, the class map
    and the training counts of `shot_split()`. With `relabel_by_frequency`, labels are remapped by ascending
    training frequency (ResLT's class map); `class_map[original] = new` and `original_classes[new] = original`
    are kept so results can be mapped back. A missing or corrupt image raises an error naming the file, or,
    with `skip_corrupt=True`, warns and returns None (the loaders drop it and count it).

    >>> train = ListFileDataset("/data/ImageNet", "ImageNet_LT_train.txt")                  # doctest: +SKIP
    >>> test = ListFileDataset("/data/ImageNet", "ImageNet_LT_test.txt", train_dataset=train)  # doctest: +SKIP
    """

    normalization = NORMALIZATION["imagenet"]  # iNaturalist: pass NORMALIZATION["inaturalist"] to make_loader

    def __init__(self, root, list_file, num_classes=None, relabel_by_frequency=False, train_dataset=None,
                 skip_corrupt=False, transform=None):
        relative_paths, labels = read_list_file(list_file)
        if train_dataset is not None:
            num_classes = train_dataset.num_classes
        elif num_classes is None:
            num_classes = int(labels.max()) + 1
        original = validate_targets(labels, num_classes, list_file)
        if train_dataset is not None:
            self.train_class_counts = train_dataset.train_class_counts
            self.class_map = train_dataset.class_map
        else:
            counts = np.bincount(original, minlength=num_classes)
            self.class_map = frequency_class_map(counts) if relabel_by_frequency else np.arange(num_classes)
            self.train_class_counts = counts[np.argsort(self.class_map)]
        self.original_classes = np.argsort(self.class_map)
        self.root = root
        self.paths = [os.path.join(root, path) for path in relative_paths]
        self.targets = self.class_map[original]
        self.num_classes = num_classes
        self.skip_corrupt = skip_corrupt
        self.transform = transform

    def read_bytes(self, index):
        """The encoded file, as uint8 numpy (the DALI path decodes it); None if unreadable and `skip_corrupt`."""
        path = self.paths[index]
        try:
            return np.fromfile(path, dtype=np.uint8)
        except OSError as error:
            return self._failed(path, error)

    def load_image(self, index):
        """The decoded RGB PIL image; None if unreadable and `skip_corrupt`."""
        from PIL import Image

        path = self.paths[index]
        try:
            with Image.open(path) as image:
                return image.convert("RGB")
        except (OSError, SyntaxError, ValueError) as error:  # PIL raises all three on broken files
            return self._failed(path, error)

    def __getitem__(self, index):
        image = self.load_image(index)
        if image is None:
            return None
        if self.transform is not None:
            image = self.transform(image)
        return image, int(self.targets[index])

    def _failed(self, path, error):
        if not self.skip_corrupt:
            raise DataError(f"cannot read image {path}: {error} (skip_corrupt=True, data.skip_corrupt=true in a "
                            f"recipe, skips unreadable images)") from error
        warnings.warn(f"skipping unreadable image {path}: {error}", RuntimeWarning, stacklevel=4)
        return None
