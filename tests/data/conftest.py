"""Fixtures for the data tests: synthetic CIFAR folders in the real pickle format, small JPEG trees."""

import os
import pickle

import numpy as np
import pytest


def _write_cifar_batch(path, labels, label_key, first_index):
    """A real-format CIFAR batch whose image rows encode their global index in the first two bytes."""
    data = np.zeros((len(labels), 3072), dtype=np.uint8)
    index = np.arange(first_index, first_index + len(labels))
    data[:, 0], data[:, 1] = index % 256, index // 256
    with open(path, "wb") as handle:
        pickle.dump({"data": data, label_key: [int(label) for label in labels]}, handle)


@pytest.fixture(scope="session")
def cifar_root(tmp_path_factory):
    """A folder holding ``cifar-10-batches-py`` and ``cifar-100-python`` with balanced, shuffled labels."""
    root = tmp_path_factory.mktemp("cifar")
    rng = np.random.default_rng(123)
    folder = root / "cifar-10-batches-py"
    folder.mkdir()
    train = rng.permutation(np.repeat(np.arange(10), 5000))
    for batch in range(5):
        _write_cifar_batch(folder / f"data_batch_{batch + 1}", train[batch * 10000:(batch + 1) * 10000], "labels",
                           batch * 10000)
    _write_cifar_batch(folder / "test_batch", rng.permutation(np.repeat(np.arange(10), 1000)), "labels", 0)
    folder = root / "cifar-100-python"
    folder.mkdir()
    _write_cifar_batch(folder / "train", rng.permutation(np.repeat(np.arange(100), 500)), "fine_labels", 0)
    _write_cifar_batch(folder / "test", rng.permutation(np.repeat(np.arange(100), 100)), "fine_labels", 0)
    return root


def write_jpeg_tree(root, class_counts, size=(48, 40), seed=0, name="img {index}.jpg"):
    """Generated JPEGs under ``root/class_<c>/`` (names with spaces) and a ``train.txt`` list; returns its path."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    lines = []
    for cls, count in enumerate(class_counts):
        os.makedirs(os.path.join(root, f"class {cls}"), exist_ok=True)
        for index in range(count):
            relative = os.path.join(f"class {cls}", name.format(index=index))
            pixels = rng.integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8)
            Image.fromarray(pixels).save(os.path.join(root, relative), quality=85)
            lines.append(f"{relative} {cls}")
    list_file = os.path.join(root, "train.txt")
    with open(list_file, "w") as handle:
        handle.write("\n".join(lines) + "\n")
    return list_file


@pytest.fixture(scope="session")
def jpeg_tree(tmp_path_factory):
    """(root, list file, class counts) of a small long-tailed JPEG tree."""
    root = tmp_path_factory.mktemp("jpegs")
    counts = [40, 20, 10, 6, 4]
    return str(root), write_jpeg_tree(str(root), counts), counts
