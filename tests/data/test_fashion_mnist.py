"""Fashion-MNIST-LT on synthetic idx files in the real format, and `fastlt data fashion-mnist` with fake Debian tools
(no network: the success path runs scripts standing in for apt-get / dpkg-deb, the refusal path has neither)."""

import gzip
import os
import stat

import numpy as np
import pytest

from fastlt import cli
from fastlt.data import FashionMNISTLT
from fastlt.data import fashion_mnist
from fastlt.data.fashion_mnist import fetch_fashion_mnist
from fastlt.methods.builders import build_datasets

PER_CLASS_TRAIN, PER_CLASS_TEST = 6100, 30  # room for n_max 6000 plus a val split of 100


def write_idx(path, array):
    """A uint8 idx file (magic 0x0800 | ndim, big-endian dimensions, raw bytes), gzipped when `path` ends in .gz."""
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(size).to_bytes(4, "big") for size in array.shape)
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "wb") as handle:
        handle.write(header + np.ascontiguousarray(array, dtype=np.uint8).tobytes())


def write_fashion_files(folder, per_class_train=PER_CLASS_TRAIN, per_class_test=PER_CLASS_TEST, gz=True):
    """The four idx files with shuffled balanced labels; 2x2 images whose pixels store the row index (base 256), so
    a test can tell which file row an image came from."""
    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(7)
    suffix = ".gz" if gz else ""
    for prefix, per_class in (("train", per_class_train), ("t10k", per_class_test)):
        labels = rng.permutation(np.repeat(np.arange(10), per_class))
        rows = np.arange(len(labels))
        images = np.stack([rows % 256, rows // 256 % 256, rows // 65536, np.zeros_like(rows)], 1).reshape(-1, 2, 2)
        write_idx(os.path.join(folder, f"{prefix}-images-idx3-ubyte{suffix}"), images)
        write_idx(os.path.join(folder, f"{prefix}-labels-idx1-ubyte{suffix}"), labels)
    return str(folder)


def decode_rows(images):
    images = images.reshape(len(images), 4).astype(np.int64)
    return images[:, 0] + 256 * images[:, 1] + 65536 * images[:, 2]


@pytest.fixture(scope="module")
def fashion_root(tmp_path_factory):
    return write_fashion_files(tmp_path_factory.mktemp("fashion") / "files")


# n_c = floor(n_max * ratio ** (-c / 9)), worked out in 50-digit decimal arithmetic
EXPECTED_COUNTS = {
    (6000, 100): [6000, 3596, 2156, 1292, 774, 464, 278, 166, 100, 60],
    (1000, 100): [1000, 599, 359, 215, 129, 77, 46, 27, 16, 10],
    (1000, 10): [1000, 774, 599, 464, 359, 278, 215, 166, 129, 100],
    (120, 50): [120, 77, 50, 32, 21, 13, 8, 5, 3, 2],
}


@pytest.mark.parametrize("n_max, ratio", sorted(EXPECTED_COUNTS))
def test_class_counts_follow_the_cifar10_lt_profile_exactly(fashion_root, n_max, ratio):
    train = FashionMNISTLT(split="train", n_max=n_max, ratio=ratio, val_per_class=100 if n_max < 6000 else 0,
                           root=fashion_root)
    assert train.class_counts.tolist() == EXPECTED_COUNTS[n_max, ratio]
    assert train.train_class_counts.tolist() == EXPECTED_COUNTS[n_max, ratio]
    assert np.array_equal(decode_rows(train.images), train.source_indices)  # images and labels of the same rows


def test_val_comes_from_training_images_outside_the_subset_and_test_is_whole(fashion_root):
    splits = {split: FashionMNISTLT(split=split, n_max=1000, ratio=100, val_per_class=50, seed=3, root=fashion_root)
              for split in ("train", "val", "test")}
    train, val, test = splits["train"], splits["val"], splits["test"]
    assert val.class_counts.tolist() == [50] * 10
    assert not set(train.source_indices) & set(val.source_indices)
    assert np.array_equal(decode_rows(val.images), val.source_indices)  # rows of the training file
    assert len(test) == 10 * PER_CLASS_TEST and np.array_equal(test.source_indices, np.arange(len(test)))
    assert test.class_counts.tolist() == [PER_CLASS_TEST] * 10
    assert [ids.tolist() for ids in test.shot_split()] == [[0, 1, 2, 3, 4], [5, 6, 7], [8, 9]]
    image, label = train[0]
    assert image.shape == (1, 2, 2) and label == train.targets[0]
    other_seed = FashionMNISTLT(split="train", n_max=1000, ratio=100, seed=4, root=fashion_root)
    assert np.array_equal(other_seed.class_counts, train.class_counts)
    assert not np.array_equal(other_seed.source_indices, train.source_indices)


def test_full_size_needs_no_val_split_and_says_so_otherwise(fashion_root):
    data = {"name": "fashion_mnist_lt", "root": fashion_root, "n_max": 6000, "ratio": 100, "val_per_class": 0}
    datasets = build_datasets(data)
    assert datasets["val"] is None and len(datasets["train"]) == sum(EXPECTED_COUNTS[6000, 100])
    with pytest.raises(ValueError, match=r"classes \[0\] .*val_per_class"):
        build_datasets({**data, "val_per_class": 101})


def test_gunzipped_files_are_read_too(tmp_path):
    root = write_fashion_files(tmp_path, per_class_train=40, per_class_test=3, gz=False)
    assert FashionMNISTLT(split="train", n_max=30, ratio=10, val_per_class=5, root=root).class_counts.tolist() == [
        30, 23, 17, 13, 10, 8, 6, 5, 3, 3]


def test_missing_files_name_data_root_and_the_fetch_command(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match=r"data.root .*train-images-idx3-ubyte.*fastlt data fashion-mnist"):
        FashionMNISTLT(split="train", root=str(tmp_path))
    monkeypatch.setenv("FASTLT_DATA", str(tmp_path / "cache"))
    monkeypatch.setattr(fashion_mnist, "DEBIAN_FOLDER", str(tmp_path / "debian"))
    with pytest.raises(FileNotFoundError, match=r"data.root is not set.*`fastlt data fashion-mnist`.*github"):
        FashionMNISTLT(split="test")


def test_default_root_is_the_cache_then_debians_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("FASTLT_DATA", str(tmp_path / "cache"))
    monkeypatch.setattr(fashion_mnist, "DEBIAN_FOLDER", write_fashion_files(tmp_path / "debian", 40, 3))
    assert fashion_mnist.find_fashion_mnist() == str(tmp_path / "debian")
    write_fashion_files(tmp_path / "cache" / "fashion-mnist", 40, 3)
    assert fashion_mnist.find_fashion_mnist() == str(tmp_path / "cache" / "fashion-mnist")
    assert len(FashionMNISTLT(split="test")) == 30
    monkeypatch.delenv("FASTLT_DATA")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert fashion_mnist.default_cache() == str(tmp_path / "home" / ".cache" / "fastlt" / "fashion-mnist")


def write_script(folder, name, body):
    path = os.path.join(folder, name)
    with open(path, "w") as handle:
        handle.write("#!/bin/sh\n" + body)
    os.chmod(path, os.stat(path).st_mode | stat.S_IXUSR)


@pytest.fixture
def fake_debian_tools(tmp_path, monkeypatch):
    """apt-get / dpkg-deb stand-ins first on PATH: `apt-get download` leaves a .deb in its working folder, `dpkg-deb
    -x` unpacks a tiny package tree (the four idx files under usr/share/datasets/fashion-mnist); both log their
    arguments."""
    tools, log = tmp_path / "bin", tmp_path / "calls.log"
    tools.mkdir()
    package_files = write_fashion_files(tmp_path / "package_files", 40, 3)
    write_script(tools, "apt-get", f'echo "apt-get $*" >> {log}\n'
                                   'touch dataset-fashion-mnist_0.0~git20200523.55506a9-1_all.deb\n')
    write_script(tools, "dpkg-deb", f'echo "dpkg-deb $*" >> {log}\n'
                                    'mkdir -p "$3/usr/share/datasets/fashion-mnist"\n'
                                    f'cp {package_files}/* "$3/usr/share/datasets/fashion-mnist/"\n')
    monkeypatch.setenv("PATH", f"{tools}:{os.environ['PATH']}")
    return tools, log


def test_fetch_unpacks_the_debian_package_into_the_cache(tmp_path, monkeypatch, fake_debian_tools):
    _, log = fake_debian_tools
    monkeypatch.setenv("FASTLT_DATA", str(tmp_path / "cache"))
    folder = fetch_fashion_mnist()
    assert folder == str(tmp_path / "cache" / "fashion-mnist")
    assert sorted(os.listdir(folder)) == sorted(f"{stem}.gz" for stem in fashion_mnist.FILE_STEMS)
    calls = log.read_text().splitlines()
    assert calls[0] == "apt-get download dataset-fashion-mnist"
    assert calls[1].startswith("dpkg-deb -x ") and calls[1].split()[2].endswith("_all.deb")
    assert len(FashionMNISTLT(split="train", n_max=30, ratio=10, val_per_class=5)) == 118  # found without data.root
    assert fetch_fashion_mnist() == folder and len(log.read_text().splitlines()) == 2  # already there: no download


def test_fetch_command_line(tmp_path, capsys, fake_debian_tools):
    assert cli.main(["data", "fashion-mnist", "--dest", str(tmp_path / "elsewhere")]) == 0
    assert f"Fashion-MNIST idx files in {tmp_path / 'elsewhere'}" in capsys.readouterr().out
    assert len(FashionMNISTLT(split="test", root=str(tmp_path / "elsewhere"))) == 30


def test_fetch_refuses_clearly_without_debian_tools(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("PATH", str(tmp_path / "no-tools"))
    dest = tmp_path / "dest"
    with pytest.raises(OSError, match=r"apt-get and dpkg-deb are not on PATH.*github.com/zalandoresearch.*dest"):
        fetch_fashion_mnist(dest)
    assert not dest.exists()
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["data", "fashion-mnist", "--dest", str(dest)])
    assert exit_info.value.code == 2
    assert "fastlt data: error: fastlt data fashion-mnist needs Debian's package tools" in capsys.readouterr().err


def test_fetch_reports_a_failing_apt_get_and_where_to_put_the_files(tmp_path, monkeypatch, fake_debian_tools):
    tools, _ = fake_debian_tools
    write_script(tools, "apt-get", 'echo "E: Unable to locate package dataset-fashion-mnist" >&2\nexit 100\n')
    with pytest.raises(OSError, match=r"`apt-get download dataset-fashion-mnist` failed \(exit 100: E: Unable to "
                                      r"locate package dataset-fashion-mnist\); instead, download the four idx files"):
        fetch_fashion_mnist(tmp_path / "dest")
    assert not (tmp_path / "dest").exists()
