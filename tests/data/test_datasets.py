import os
import pickle

import numpy as np
import pytest

from fastlt.data import CIFAR10LT, CIFAR100LT, DigitsLT, MNISTLT, exponential_counts, shot_split
from fastlt.data.listfile import ListFileDataset, read_list_file
from fastlt.data.mnist import mnist_folder, read_idx
from fastlt.errors import DataError

# docs/methods.md section 1.1: N, max, min, many/medium/few (CIFAR-100-LT) or the counts (CIFAR-10-LT).
CIFAR100_TABLE = {100: (10847, 500, 5, (35, 35, 30)), 50: (12608, 500, 10, (41, 41, 18)),
                  10: (19573, 500, 50, (69, 31, 0))}
CIFAR10_TABLE = {
    100: [5000, 2997, 1796, 1077, 645, 387, 232, 139, 83, 50],
    50: [5000, 3237, 2096, 1357, 878, 568, 368, 238, 154, 100],
    10: [5000, 3871, 2997, 2320, 1796, 1391, 1077, 834, 645, 500],
}


def decode_cifar_index(images):
    """The source row index that conftest's `_write_cifar_batch` stored in pixels (0, 0) and (0, 1) of channel 0."""
    return images[:, 0, 0, 0].astype(np.int64) + 256 * images[:, 0, 1, 0].astype(np.int64)


def ldam_reference_subset(labels, counts, seed=0):
    """LDAM-DRW `gen_imbalanced_data`, verbatim in spirit: global np.random.seed, then per-class shuffles."""
    state = np.random.get_state()
    np.random.seed(seed)
    kept = []
    for the_class, the_img_num in zip(np.unique(labels), counts):
        idx = np.where(labels == the_class)[0]
        np.random.shuffle(idx)
        kept.append(idx[:the_img_num])
    np.random.set_state(state)
    return np.concatenate(kept)


def _all_labels(folder, names, key):
    labels = []
    for name in names:
        with open(os.path.join(folder, name), "rb") as handle:
            labels += pickle.load(handle, encoding="latin1")[key]
    return np.asarray(labels)


@pytest.mark.parametrize("ratio", [10, 50, 100, 200])
def test_cifar100_lt_counts_and_exact_subset(cifar_root, ratio):
    train = CIFAR100LT(cifar_root, split="train", ratio=ratio)
    counts = train.class_counts
    assert counts.tolist() == exponential_counts(500, ratio, 100)
    if ratio in CIFAR100_TABLE:
        total, largest, smallest, split_sizes = CIFAR100_TABLE[ratio]
        assert (len(train), counts.max(), counts.min()) == (total, largest, smallest)
        assert tuple(len(ids) for ids in train.shot_split()) == split_sizes
    else:
        assert (counts.max(), counts.min()) == (500, 2)
    labels = _all_labels(os.path.join(cifar_root, "cifar-100-python"), ["train"], "fine_labels")
    reference = ldam_reference_subset(labels, counts)
    assert np.array_equal(decode_cifar_index(train.images), reference)
    assert np.array_equal(train.source_indices, reference)
    assert np.array_equal(train.targets, labels[reference])
    assert train.images.shape == (len(train), 32, 32, 3) and train.images.dtype == np.uint8


@pytest.mark.parametrize("ratio", [10, 50, 100, 200])
def test_cifar10_lt_counts(cifar_root, ratio):
    train = CIFAR10LT(cifar_root / "cifar-10-batches-py", ratio=ratio)
    expected = CIFAR10_TABLE.get(ratio, exponential_counts(5000, ratio, 10))
    assert train.class_counts.tolist() == expected
    assert train.targets.dtype == np.int64
    names = [f"data_batch_{i}" for i in range(1, 6)]
    labels = _all_labels(os.path.join(cifar_root, "cifar-10-batches-py"), names, "labels")
    assert np.array_equal(decode_cifar_index(train.images), ldam_reference_subset(labels, expected))


def test_cifar_test_split_untouched(cifar_root):
    test = CIFAR100LT(cifar_root, split="test", ratio=100)
    labels = _all_labels(os.path.join(cifar_root, "cifar-100-python"), ["test"], "fine_labels")
    assert np.array_equal(test.targets, labels)
    assert np.array_equal(decode_cifar_index(test.images), np.arange(10000))
    assert test.class_counts.tolist() == [100] * 100
    assert [len(ids) for ids in test.shot_split()] == [35, 35, 30]  # training membership
    image, label = test[3]
    assert image.shape == (3, 32, 32) and label == labels[3]


def test_cifar_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="data_batch_1"):
        CIFAR10LT(tmp_path)
    with pytest.raises(ValueError, match="split"):
        CIFAR10LT(tmp_path, split="val")
    with pytest.raises(ValueError, match="ratio"):
        exponential_counts(500, 0.5, 10)


def test_shot_split_thresholds():
    many, medium, few = shot_split([101, 100, 20, 19, 0, 5000])
    assert many.tolist() == [0, 5] and medium.tolist() == [1, 2] and few.tolist() == [3, 4]
    with pytest.raises(ValueError, match="class_counts"):
        shot_split([[1, 2]])


def test_mnist_lt_splits():
    train, val, test = (MNISTLT(split=split) for split in ("train", "val", "test"))
    assert train.class_counts.tolist() == exponential_counts(500, 100, 10) == [500, 299, 179, 107, 64, 38, 23,
                                                                              13, 8, 5]
    assert train.images.shape == (1236, 28, 28) and train.images.dtype == np.uint8
    assert val.class_counts.tolist() == [20] * 10
    assert not set(train.source_indices) & set(val.source_indices)
    assert len(test) == 10000 and np.array_equal(test.source_indices, np.arange(10000))
    full_labels = read_idx(os.path.join(mnist_folder(), "train-labels-idx1-ubyte.gz"))
    assert np.array_equal(full_labels[train.source_indices], train.targets)
    assert [ids.tolist() for ids in test.shot_split()] == [[0, 1, 2, 3], [4, 5, 6], [7, 8, 9]]
    image, label = train[0]
    assert image.shape == (1, 28, 28) and label == train.targets[0]
    assert np.array_equal(MNISTLT(split="train", seed=1).class_counts, train.class_counts)
    assert not np.array_equal(MNISTLT(split="train", seed=1).source_indices, train.source_indices)


def test_idx_reader_errors(tmp_path):
    bad = tmp_path / "bad-images-idx3-ubyte"
    bad.write_bytes(b"\x01\x02\x03\x04rest")
    with pytest.raises(ValueError, match="bad-images-idx3-ubyte"):
        read_idx(str(bad))
    with pytest.raises(FileNotFoundError, match="missing.gz"):
        read_idx(str(tmp_path / "missing.gz"))
    with pytest.raises(ValueError, match="split"):
        MNISTLT(split="dev")


def test_digits_lt_splits():
    train, val, test = (DigitsLT(split=split) for split in ("train", "val", "test"))
    assert train.class_counts.tolist() == exponential_counts(150, 10, 10)
    assert val.class_counts.tolist() == [5] * 10 and test.class_counts.tolist() == [20] * 10
    ids = [set(part.source_indices) for part in (train, val, test)]
    assert not (ids[0] & ids[1] or ids[0] & ids[2] or ids[1] & ids[2])
    assert train.images.shape[1:] == (8, 8) and train.images.max() == 255


def test_list_file_parsing_with_spaces(tmp_path):
    listing = tmp_path / "list.txt"
    listing.write_text("train/n01 a/x y.jpg 2\n\n  train/b.JPEG\t0  \ntrain/c.jpg 2\n")
    paths, labels = read_list_file(str(listing))
    assert paths == ["train/n01 a/x y.jpg", "train/b.JPEG", "train/c.jpg"] and labels.tolist() == [2, 0, 2]
    dataset = ListFileDataset(str(tmp_path), str(listing))
    assert dataset.num_classes == 3 and dataset.class_counts.tolist() == [1, 0, 2]
    assert dataset.paths[0] == os.path.join(str(tmp_path), "train/n01 a/x y.jpg")


def test_list_file_errors(tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    with pytest.raises(ValueError, match="empty.txt.*empty"):
        read_list_file(str(empty))
    broken = tmp_path / "broken.txt"
    broken.write_text("a.jpg 1\nb.jpg one\n")
    with pytest.raises(ValueError, match="broken.txt:2"):
        read_list_file(str(broken))
    listing = tmp_path / "range.txt"
    listing.write_text("a.jpg 1\nb.jpg 7\n")
    with pytest.raises(ValueError, match="range.txt: label 7"):
        ListFileDataset(str(tmp_path), str(listing), num_classes=5)
    listing.write_text("a.jpg -1\n")
    with pytest.raises(ValueError, match="label -1"):
        ListFileDataset(str(tmp_path), str(listing))
    with pytest.raises(FileNotFoundError, match="nope.txt"):
        read_list_file(str(tmp_path / "nope.txt"))


def test_relabel_by_frequency_keeps_the_map(tmp_path):
    train_list = tmp_path / "train.txt"
    train_list.write_text("".join(f"c{label}/{i}.jpg {label}\n" for label, n in enumerate([5, 1, 3]) for i in range(n)))
    test_list = tmp_path / "test.txt"
    test_list.write_text("t0.jpg 0\nt1.jpg 1\nt2.jpg 2\n")
    train = ListFileDataset(str(tmp_path), str(train_list), relabel_by_frequency=True)
    assert train.class_map.tolist() == [2, 0, 1]  # class 1 is the rarest -> label 0
    assert train.class_counts.tolist() == [1, 3, 5] == train.train_class_counts.tolist()
    test = ListFileDataset(str(tmp_path), str(test_list), train_dataset=train)
    assert test.targets.tolist() == [2, 0, 1]
    assert train.original_classes[test.targets].tolist() == [0, 1, 2]


def test_list_file_images_and_corrupt_files(jpeg_tree, tmp_path):
    root, list_file, counts = jpeg_tree
    dataset = ListFileDataset(root, list_file)
    image, label = dataset[0]
    assert image.size == (48, 40) and label == 0
    listing = tmp_path / "bad.txt"
    (tmp_path / "garbage.jpg").write_bytes(b"not a jpeg at all")
    listing.write_text("garbage.jpg 0\nmissing file.jpg 1\n")
    strict = ListFileDataset(str(tmp_path), str(listing))
    with pytest.raises(DataError, match="garbage.jpg"):
        strict[0]
    with pytest.raises(DataError, match="missing file.jpg"):
        strict[1]
    with pytest.raises(DataError, match="missing file.jpg"):
        strict.read_bytes(1)
    lenient = ListFileDataset(str(tmp_path), str(listing), skip_corrupt=True)
    with pytest.warns(RuntimeWarning, match="garbage.jpg"):
        assert lenient[0] is None
    with pytest.warns(RuntimeWarning, match="missing file.jpg"):
        assert lenient.read_bytes(1) is None
