import os

import numpy as np
import pytest
import torch

import fastlt.data.dali as dali_module
import fastlt.data.loaders as loaders_module
from fastlt.data import CIFAR10LT, DigitsLT, ListFileDataset, LongTailSampler, MNISTLT, make_loader
from fastlt.data.base import ArrayDataset
from fastlt.errors import DataError, MissingDependencyError


@pytest.fixture(scope="module")
def mnist_train():
    return MNISTLT(split="train")


def run_epoch(loader, epoch=None):
    if epoch is not None:
        loader.set_epoch(epoch)
    batches = list(loader)
    return torch.cat([images for images, _ in batches]), torch.cat([labels for _, labels in batches]), batches


@pytest.mark.parametrize("backend", ["dali", "torch"])
def test_array_pipeline_shapes_labels_and_epoch_length(mnist_train, backend):
    sampler = LongTailSampler(mnist_train, strategy="class_balanced", seed=4, num_samples=1000)
    loader = make_loader(mnist_train, 96, train=True, sampler=sampler, loader=backend, rotation=15, num_workers=0)
    assert loader.backend == backend
    images, labels, batches = run_epoch(loader, epoch=2)
    assert len(batches) == len(loader) == 11 and [len(b[1]) for b in batches][-1] == 1000 - 10 * 96
    assert images.shape == (1000, 1, 28, 28) and images.dtype == torch.float32 and labels.dtype == torch.int64
    assert np.array_equal(labels.numpy(), mnist_train.targets[sampler.indices(2)])
    assert np.bincount(labels.numpy(), minlength=10).min() > 60  # class-balanced, not the 500..5 profile
    assert abs(images.mean().item()) < 0.3 and 0.7 < images.std().item() < 1.3  # normalised


def test_torch_and_dali_agree_on_labels_and_eval_images(mnist_train):
    outputs = {}
    for backend in ("dali", "torch"):
        sampler = LongTailSampler(mnist_train, strategy="square_root", seed=9)
        train_labels = run_epoch(make_loader(mnist_train, 128, train=True, sampler=sampler, loader=backend,
                                             num_workers=0), epoch=3)[1]
        eval_images, eval_labels, _ = run_epoch(make_loader(mnist_train, 128, train=False, loader=backend,
                                                            num_workers=0))
        outputs[backend] = train_labels, eval_images, eval_labels
    assert torch.equal(outputs["dali"][0], outputs["torch"][0])
    assert torch.equal(outputs["dali"][2], outputs["torch"][2])
    mean, std = mnist_train.normalization
    expected = (torch.from_numpy(mnist_train.images).float().unsqueeze(1) / 255 - mean[0]) / std[0]
    for backend in ("dali", "torch"):
        assert torch.allclose(outputs[backend][1], expected, atol=1e-5)


@pytest.mark.parametrize("backend", ["dali", "torch"])
def test_array_train_augmentation_is_crop_and_flip(backend):
    digits = DigitsLT(split="train")
    sampler = LongTailSampler(digits, strategy="sequential")
    loader = make_loader(digits, 64, train=True, loader=backend, sampler=sampler, mean=(0.0,), std=(1.0 / 255,),
                         num_workers=0)
    images, _, _ = run_epoch(loader)
    source = torch.from_numpy(digits.images).float()
    padded = torch.nn.functional.pad(source, (4, 4, 4, 4))
    windows = padded.unfold(1, 8, 1).unfold(2, 8, 1)  # [N, 9, 9, 8, 8]: every pad-4 crop
    out = images[:, 0]
    match = (windows == out[:, None, None]).flatten(3).all(-1).flatten(1).any(1)
    match |= (windows.flip(-1) == out[:, None, None]).flatten(3).all(-1).flatten(1).any(1)
    assert match.all()
    assert (out != source).flatten(1).any(1).float().mean() > 0.5  # most images were moved or flipped


def ramp_digits():
    """Digits-LT train with every image replaced by a left-to-right ramp: its mirror image is a right-to-left ramp,
    so a flipped sample (with or without a pad-4 crop) can never pass for an upright one."""
    digits = DigitsLT(split="train")
    ramp = (20 + 15 * np.arange(8)).astype(np.uint8)
    digits.images = np.ascontiguousarray(np.broadcast_to(ramp, digits.images.shape))
    return digits


@pytest.mark.parametrize("backend", ["dali", "torch"])
@pytest.mark.parametrize("pad", [0, 4])
@pytest.mark.parametrize("flip", [False, True])
def test_array_flip_switch(backend, pad, flip):
    digits = ramp_digits()
    torch.manual_seed(0)  # the torch path draws its flips from the global generator (num_workers=0)
    loader = make_loader(digits, 64, train=True, loader=backend, sampler=LongTailSampler(digits, strategy="sequential"),
                         mean=(0.0,), std=(1.0 / 255,), num_workers=0, seed=0, pad=pad, flip=flip)
    out = run_epoch(loader)[0][:, 0]
    padded = torch.nn.functional.pad(torch.from_numpy(digits.images).float(), (pad,) * 4)
    windows = padded.unfold(1, 8, 1).unfold(2, 8, 1)  # [N, 2 pad + 1, 2 pad + 1, 8, 8]: every crop
    upright = (windows == out[:, None, None]).flatten(3).all(-1).flatten(1).any(1)
    mirrored = (windows.flip(-1) == out[:, None, None]).flatten(3).all(-1).flatten(1).any(1)
    assert (upright ^ mirrored).all()  # each sample is a crop of the ramp, upright or mirrored, never both
    if flip:
        assert 0.4 < mirrored.float().mean() < 0.6  # about half of 609 samples
    else:
        assert not mirrored.any()


@pytest.fixture(scope="module")
def ramp_jpegs(tmp_path_factory):
    """A ListFileDataset of 64x48 grey JPEGs that brighten from left to right."""
    from PIL import Image

    root = tmp_path_factory.mktemp("ramps")
    ramp = np.linspace(0, 255, 64).round().astype(np.uint8)
    Image.fromarray(np.broadcast_to(ramp[None, :, None], (48, 64, 3)).copy()).save(root / "ramp.jpg", quality=95)
    (root / "train.txt").write_text("".join(f"ramp.jpg {index % 2}\n" for index in range(200)))
    return ListFileDataset(str(root), str(root / "train.txt"))


@pytest.mark.parametrize("backend", ["dali", "torch"])
@pytest.mark.parametrize("flip", [False, True])
def test_jpeg_flip_switch(ramp_jpegs, backend, flip):
    torch.manual_seed(0)
    loader = make_loader(ramp_jpegs, 50, train=True, loader=backend, image_size=32, num_workers=0, seed=0,
                         flip=flip, sampler=LongTailSampler(ramp_jpegs, strategy="sequential"))
    images = run_epoch(loader)[0]
    # any random-resized crop of the ramp still brightens to the right unless it was mirrored
    mirrored = images[..., :16].mean((1, 2, 3)) > images[..., 16:].mean((1, 2, 3))
    if flip:
        assert 0.35 < mirrored.float().mean() < 0.65  # about half of 200 samples
    else:
        assert not mirrored.any()


@pytest.mark.parametrize("backend", ["dali", "torch"])
def test_flip_must_be_a_bool(mnist_train, jpeg_tree, backend):
    root, list_file, _ = jpeg_tree
    for dataset in (mnist_train, ListFileDataset(root, list_file)):
        for bad in ("false", 0, None):
            with pytest.raises(ValueError, match="flip must be true or false"):
                make_loader(dataset, 8, train=True, loader=backend, flip=bad)


@pytest.mark.parametrize("backend", ["dali", "torch"])
def test_jpeg_pipeline(jpeg_tree, backend):
    root, list_file, counts = jpeg_tree
    dataset = ListFileDataset(root, list_file)
    sampler = LongTailSampler(dataset, strategy="class_aware", seed=1, num_samples=max(counts) * len(counts))
    loader = make_loader(dataset, 32, train=True, sampler=sampler, loader=backend, image_size=32,
                         color_jitter=0.4, num_workers=2, channels_last=True)
    images, labels, batches = run_epoch(loader, epoch=1)
    assert len(batches) == len(loader) == 7 and images.shape == (200, 3, 32, 32)
    assert batches[0][0].is_contiguous(memory_format=torch.channels_last)
    assert np.array_equal(labels.numpy(), dataset.targets[sampler.indices(1)])
    assert np.bincount(labels.numpy()).tolist() == [40] * 5
    test_images, test_labels, _ = run_epoch(make_loader(dataset, 16, train=False, loader=backend, image_size=24,
                                                        resize_size=28, num_workers=0, drop_last=True))
    assert test_images.shape == (80, 3, 24, 24) and test_labels.tolist() == dataset.targets[:80].tolist()


def test_jpeg_eval_images_agree_between_backends(jpeg_tree):
    root, list_file, _ = jpeg_tree
    dataset = ListFileDataset(root, list_file)
    dali_images, _, _ = run_epoch(make_loader(dataset, 16, train=False, loader="dali", image_size=32,
                                              resize_size=36))
    torch_images, _, _ = run_epoch(make_loader(dataset, 16, train=False, loader="torch", image_size=32,
                                               resize_size=36, num_workers=0))
    assert (dali_images - torch_images).abs().mean() < 0.1  # two resize implementations, same recipe


@pytest.mark.parametrize("backend", ["dali", "torch"])
def test_ddp_shard_and_mid_epoch_resume(mnist_train, backend):
    sampler = LongTailSampler(mnist_train, strategy="class_balanced", seed=2, rank=1, world_size=3)
    sampler.load_state_dict({"epoch": 4, "seed": 2, "position": 256})
    loader = make_loader(mnist_train, 128, train=True, sampler=sampler, loader=backend, num_workers=0)
    _, labels, _ = run_epoch(loader)
    shard = mnist_train.targets[sampler.indices(4)]
    assert len(shard) == 412 and np.array_equal(labels.numpy(), shard[256:])
    _, labels, _ = run_epoch(loader)  # the next pass is a whole epoch again
    assert np.array_equal(labels.numpy(), shard)


def test_dali_half_read_epoch_does_not_leak(mnist_train):
    sampler = LongTailSampler(mnist_train, strategy="class_balanced", seed=0)
    loader = make_loader(mnist_train, 64, train=True, sampler=sampler, loader="dali")
    next(iter(loader))
    _, labels, _ = run_epoch(loader, epoch=1)
    assert np.array_equal(labels.numpy(), mnist_train.targets[sampler.indices(1)])


@pytest.mark.parametrize("backend", ["dali", "torch"])
def test_corrupt_and_missing_images(tmp_path, jpeg_tree, backend):
    root, _, _ = jpeg_tree
    good = os.path.join(root, "class 0", "img 1.jpg")
    (tmp_path / "truncated.jpg").write_bytes(open(good, "rb").read()[:300])
    (tmp_path / "garbage.jpg").write_bytes(b"not an image" * 20)
    os.symlink(good, tmp_path / "good.jpg")
    listing = tmp_path / "list.txt"
    for bad in ("truncated.jpg", "garbage.jpg", "missing one.jpg"):
        listing.write_text(f"good.jpg 0\n{bad} 1\ngood.jpg 1\n")
        loader = make_loader(ListFileDataset(str(tmp_path), str(listing)), 2, train=False, loader=backend,
                             image_size=16, resize_size=16, num_workers=0)
        with pytest.raises(DataError, match=bad):
            run_epoch(loader)
    listing.write_text("good.jpg 0\ntruncated.jpg 1\ngarbage.jpg 1\nmissing one.jpg 0\ngood.jpg 1\n")
    loader = make_loader(ListFileDataset(str(tmp_path), str(listing), skip_corrupt=True), 2, train=False,
                         loader=backend, image_size=16, resize_size=16, num_workers=0)
    with pytest.warns(RuntimeWarning, match="skipping"):
        _, labels, _ = run_epoch(loader)
    assert labels.tolist() == [0, 1] and loader.skipped == 3


@pytest.mark.parametrize("backend", ["dali", "torch"])
def test_batch_of_only_unreadable_images_is_dropped_and_counted(tmp_path, jpeg_tree, backend):
    root, _, _ = jpeg_tree
    os.symlink(os.path.join(root, "class 0", "img 1.jpg"), tmp_path / "good.jpg")
    (tmp_path / "garbage.jpg").write_bytes(b"not an image" * 20)
    listing = tmp_path / "list.txt"
    listing.write_text("good.jpg 0\ngood.jpg 1\ngarbage.jpg 1\nmissing.jpg 0\ngood.jpg 2\n")
    loader = make_loader(ListFileDataset(str(tmp_path), str(listing), skip_corrupt=True), 2, train=False,
                         loader=backend, image_size=16, resize_size=16, num_workers=0)
    with pytest.warns(RuntimeWarning, match="skipping"):
        batches = list(loader)
    assert [labels.tolist() for _, labels in batches] == [[0, 1], [2]]
    assert all(images.shape[1:] == (3, 16, 16) for images, _ in batches)
    assert loader.skipped == 2 and loader.skipped_batches == 1


@pytest.mark.parametrize("backend", ["dali", "torch"])
def test_jpeg_missing_its_last_bytes_is_skipped(tmp_path, jpeg_tree, backend):
    """Pillow's verify() accepts a JPEG cut short (it reads headers only); DALI's decoder fails on it."""
    root, _, _ = jpeg_tree
    good = os.path.join(root, "class 0", "img 1.jpg")
    os.symlink(good, tmp_path / "good.jpg")
    listing = tmp_path / "list.txt"
    listing.write_text("good.jpg 0\ncut.jpg 1\ngood.jpg 1\n")
    for cut in (1, 100):
        (tmp_path / "cut.jpg").write_bytes(open(good, "rb").read()[:-cut])
        loader = make_loader(ListFileDataset(str(tmp_path), str(listing), skip_corrupt=True), 2, train=False,
                             loader=backend, image_size=16, resize_size=16, num_workers=0)
        with pytest.warns(RuntimeWarning, match="cut.jpg"):
            _, labels, _ = run_epoch(loader)
        assert labels.tolist() == [0, 1] and loader.skipped == 1, cut
        strict = make_loader(ListFileDataset(str(tmp_path), str(listing)), 2, train=False, loader=backend,
                             image_size=16, resize_size=16, num_workers=0)
        with pytest.raises(DataError, match="cut.jpg"):
            run_epoch(strict)


def test_unreadable_image_in_a_worker_is_raised_as_it_is(tmp_path, jpeg_tree):
    """A DataLoader worker's exception reaches the main process with the worker's traceback in its message; the
    DataError of an unreadable image arrives unchanged instead (the `fastlt` command prints it on one line)."""
    root, _, _ = jpeg_tree
    os.symlink(os.path.join(root, "class 0", "img 1.jpg"), tmp_path / "good.jpg")
    listing = tmp_path / "list.txt"
    listing.write_text("good.jpg 0\nmissing.jpg 1\ngood.jpg 1\n")
    loader = make_loader(ListFileDataset(str(tmp_path), str(listing)), 2, train=False, loader="torch",
                         image_size=16, resize_size=16, num_workers=2)
    with pytest.raises(DataError) as raised:
        run_epoch(loader)
    assert str(raised.value).startswith(f"cannot read image {tmp_path / 'missing.jpg'}")
    assert "Traceback" not in str(raised.value) and "\n" not in str(raised.value)


@pytest.mark.parametrize("backend", ["dali", "torch"])
def test_drop_last_that_drops_every_batch_is_refused(mnist_train, backend):
    sampler = LongTailSampler(mnist_train, strategy="class_balanced", num_samples=100)
    with pytest.raises(ValueError, match="drop_last=True drops every batch: batch_size 128 is larger than the 100"):
        make_loader(mnist_train, 128, train=True, sampler=sampler, loader=backend, drop_last=True)
    assert len(make_loader(mnist_train, 100, train=True, sampler=sampler, loader=backend, drop_last=True)) == 1
    with pytest.raises(ValueError, match="batch_size must be an integer >= 1, got 2.5"):
        make_loader(mnist_train, 2.5, train=True, sampler=sampler, loader=backend)


def test_list_file_that_is_not_utf8_names_the_file_and_line(tmp_path):
    listing = tmp_path / "list.txt"
    listing.write_bytes(b"a.jpg 0\nb\xe9.jpg 1\n")
    with pytest.raises(ValueError, match=r"list.txt:2: not UTF-8 .*re-encode"):
        ListFileDataset(str(tmp_path), str(listing))


def test_auto_falls_back_to_torch_without_dali(mnist_train, monkeypatch):
    assert make_loader(mnist_train, 8, train=True).backend == "dali"
    monkeypatch.setattr(loaders_module, "dali_available", lambda: False)
    assert make_loader(mnist_train, 8, train=True).backend == "torch"
    monkeypatch.setattr(dali_module, "dali_available", lambda: False)
    with pytest.raises(MissingDependencyError, match=r"DALI.*fastlt\[dali\]"):
        make_loader(mnist_train, 8, train=True, loader="dali")
    with pytest.raises(ValueError, match="loader"):
        make_loader(mnist_train, 8, train=True, loader="ffcv")
    with pytest.raises(ValueError, match="batch_size"):
        make_loader(mnist_train, 0, train=True)


class ColourImages(ArrayDataset):
    """200 random 32x32 RGB images (uint8 HWC, as CIFAR-LT stores them), 10 classes."""

    normalization = ((0.5, 0.4, 0.3), (0.2, 0.25, 0.3))

    def __init__(self):
        generator = np.random.default_rng(0)
        self.images = generator.integers(0, 256, (200, 32, 32, 3), dtype=np.uint8)
        self.targets = generator.integers(0, 10, 200)
        self.num_classes, self.source_indices = 10, np.arange(200)
        self.train_class_counts = np.bincount(self.targets, minlength=10)


# torch with workers first: forking DataLoader workers while DALI's threads live can hang
@pytest.mark.parametrize("backend, workers", [("torch", 2), ("torch", 0), ("dali", 0)])
def test_channels_last_batches_come_laid_out_with_the_same_values(backend, workers):
    """The pipeline lays the batch out NHWC (DALI's HWC output; the torch path in its DataLoader workers), so the
    training step's own conversion is a no-op; the values are those of the NCHW batch."""
    dataset = ColourImages()
    epochs = {layout: run_epoch(make_loader(dataset, 64, train=False, loader=backend, num_workers=workers,
                                            channels_last=layout == "nhwc")) for layout in ("nchw", "nhwc")}
    (nchw, nchw_labels, _), (nhwc, nhwc_labels, batches) = epochs["nchw"], epochs["nhwc"]
    first = batches[0][0]
    assert first.shape == (64, 3, 32, 32) and first.is_contiguous(memory_format=torch.channels_last)
    assert not first.is_contiguous() and epochs["nchw"][2][0][0].is_contiguous()
    assert first.contiguous(memory_format=torch.channels_last).data_ptr() == first.data_ptr()  # no copy in the step
    assert torch.allclose(nchw, nhwc, atol=1e-6) and torch.equal(nchw_labels, nhwc_labels)
    train = make_loader(dataset, 64, train=True, loader=backend, num_workers=workers, channels_last=True,
                        rotation=15)
    assert all(images.is_contiguous(memory_format=torch.channels_last) for images, _ in train)


@pytest.mark.parametrize("split", ["train", "test"])
def test_dali_reads_cifar_lt(cifar_root, split):
    """DALI's external source refuses strided batches: CIFAR-LT's images were a transposed view, whose fancy-indexed
    batches numpy keeps strided, and every CIFAR recipe with `loader: auto` failed on its first DALI batch."""
    dataset = CIFAR10LT(cifar_root / "cifar-10-batches-py", split=split, ratio=100)
    assert dataset.images.flags["C_CONTIGUOUS"]
    sampler = LongTailSampler(dataset, strategy="class_balanced", seed=0, num_samples=100)
    images, labels, _ = run_epoch(make_loader(dataset, 64, train=split == "train", sampler=sampler, loader="dali"))
    assert images.shape == (100, 3, 32, 32) and np.array_equal(labels.numpy(), dataset.targets[sampler.indices(0)])
