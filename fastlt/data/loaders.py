"""`make_loader`: one call for a DALI or torch DataLoader pipeline with the same sampler and augmentations."""

import torch

from fastlt.data.dali import DALILoader, dali_available
from fastlt.data.sampling import LongTailSampler, check_count
from fastlt.data.transforms import ArrayBatchAugment, check_flip, jpeg_transform, jpeg_view_transform
from fastlt.errors import DataError

LOADERS = ("auto", "dali", "torch")


def make_loader(dataset, batch_size, *, train, sampler=None, loader="auto", mean=None, std=None, seed=0,
                num_threads=2, num_workers=2, drop_last=False, channels_last=False, flip=True, strong=None,
                **augment):
    """A loader yielding (float32 images [B, C, H, W], int64 labels [B]) in `sampler` order.

    `dataset`: an array dataset (MNIST-LT, CIFAR-LT, ...: pad-4 crop + flip, `rotation=15` for RIDE's CIFAR
    recipe) or a `ListFileDataset` (RandomResizedCrop `image_size` + flip, `color_jitter=0.4` for ImageNet-LT /
    Places-LT; eval: resize `resize_size` + center crop). `flip=False` drops the horizontal flip from the training
    augmentation on both paths (digits: a mirrored 2 or 5 is not that digit). `sampler` defaults to
    instance-balanced shuffling when `train`, else the sequential order. `loader="auto"` picks DALI when
    installed, else torch; `mean`/`std` default to the dataset's `normalization`. `channels_last` gives NCHW
    tensors in channels-last memory, laid out by the pipeline (DALI: HWC output; torch: in the DataLoader workers).
    `strong` (a `transforms.StrongAugment`, e.g. `SADE_VIEWS["cifar"]`) replaces the training augmentation by SADE's
    test-time view: the random crop (pad-4 on arrays, `strong.crop_scale` on JPEGs), the strong colour augmentation
    and the flip, without `rotation` or `color_jitter`; torch loader only.

    >>> from fastlt.data import MNISTLT, LongTailSampler
    >>> train = MNISTLT(split="train")
    >>> sampler = LongTailSampler(train, strategy="class_balanced", seed=0)
    >>> images, labels = next(iter(make_loader(train, 64, train=True, sampler=sampler, loader="torch")))
    >>> images.shape, images.dtype, labels.shape
    (torch.Size([64, 1, 28, 28]), torch.float32, torch.Size([64]))
    """
    if loader not in LOADERS:
        raise ValueError(f"loader must be one of {LOADERS}, got {loader!r}")
    check_count("batch_size", batch_size, 1)
    check_flip(flip)
    if sampler is None:
        sampler = LongTailSampler(dataset, strategy="instance_balanced" if train else "sequential", seed=seed)
    if drop_last and len(sampler) < batch_size:  # an epoch of 0 steps would pass for a trained model
        raise ValueError(f"drop_last=True drops every batch: batch_size {batch_size} is larger than the "
                         f"{len(sampler)} samples the sampler yields per epoch (on this rank)")
    default_mean, default_std = dataset.normalization
    mean, std = mean or default_mean, std or default_std
    if loader == "auto":
        loader = "dali" if dali_available() and strong is None else "torch"
    options = dict(mean=mean, std=std, drop_last=drop_last, channels_last=channels_last, flip=flip, **augment)
    if loader == "dali":
        if strong is not None:
            raise ValueError("make_loader: strong (SADE's test-time views) runs on the torch loader; pass "
                             "loader='torch' or 'auto'")
        return DALILoader(dataset, sampler, batch_size, train, num_threads=num_threads, seed=seed, **options)
    return TorchLoader(dataset, sampler, batch_size, train, num_workers=num_workers, strong=strong, **options)


class _ArrayItems(torch.utils.data.Dataset):
    def __init__(self, dataset):
        self.images, self.targets = dataset.images, dataset.targets

    def __len__(self):
        return len(self.targets)

    def __getitem__(self, index):
        image = torch.from_numpy(self.images[index])
        return image.unsqueeze(0) if image.ndim == 2 else image.permute(2, 0, 1), int(self.targets[index])


class _ImageItems(torch.utils.data.Dataset):
    def __init__(self, dataset, transform):
        self.dataset, self.transform = dataset, transform

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, index):
        try:
            image = self.dataset.load_image(index)
        except DataError as error:
            # Returned, not raised: a DataLoader worker's exception reaches the main process with the worker's
            # traceback pasted into its message; TorchLoader raises this one there as it is.
            return error
        return None if image is None else (self.transform(image), int(self.dataset.targets[index]))


class _Collate:
    """Stacks a batch (dropping samples a `skip_corrupt` dataset returned as None), then augments uint8 arrays.
    Returns (images, labels, samples dropped, the DataError of an unreadable image or None).

    With `channels_last` the finished batch is laid out NHWC here, in the DataLoader workers, so that the training
    step receives it ready (one copy of the float batch, about 0.2 ms for 128 CIFAR images on one core)."""

    def __init__(self, augment=None, channels_last=False):
        self.augment = augment
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format

    def __call__(self, samples):
        error = next((sample for sample in samples if isinstance(sample, DataError)), None)
        if error is not None:
            return torch.zeros(0), torch.zeros(0, dtype=torch.int64), 0, error
        kept = [sample for sample in samples if sample is not None]
        if not kept:
            return torch.zeros(0), torch.zeros(0, dtype=torch.int64), len(samples), None
        images = torch.stack([image for image, _ in kept])
        labels = torch.tensor([label for _, label in kept], dtype=torch.int64)
        images = images if self.augment is None else self.augment(images)
        return images.contiguous(memory_format=self.memory_format), labels, len(samples) - len(kept), None


class TorchLoader:
    """The torch `DataLoader` path: same sampler, same augmentations as `DALILoader`; `skipped` counts samples
    dropped with `skip_corrupt=True`, `skipped_batches` the batches dropped because none of their images could be
    read (as DALI drops them: a model cannot take an empty batch)."""

    backend = "torch"

    def __init__(self, dataset, sampler, batch_size, train, mean, std, num_workers=2, drop_last=False,
                 channels_last=False, pad=4, rotation=0.0, image_size=224, resize_size=256, color_jitter=0.0,
                 flip=True, strong=None):
        self.sampler, self.batch_size = sampler, batch_size
        if hasattr(dataset, "images"):
            items = _ArrayItems(dataset)
            augment = (ArrayBatchAugment(True, mean, std, pad=pad, flip=flip, strong=strong) if strong is not None
                       else ArrayBatchAugment(train, mean, std, pad=pad, rotation=rotation, flip=flip))
        else:
            transform = (jpeg_view_transform(mean, std, strong, image_size, flip=flip) if strong is not None
                         else jpeg_transform(train, mean, std, image_size, resize_size, color_jitter, flip=flip))
            items = _ImageItems(dataset, transform)
            augment = None
        collate = _Collate(augment, channels_last=channels_last)
        self.loader = torch.utils.data.DataLoader(
            items, batch_size=batch_size, sampler=sampler, num_workers=num_workers, collate_fn=collate,
            drop_last=drop_last, persistent_workers=num_workers > 0)
        self.skipped = 0
        self.skipped_batches = 0

    def set_epoch(self, epoch):
        self.sampler.set_epoch(epoch)

    def __len__(self):
        return len(self.loader)

    def __iter__(self):
        for images, labels, skipped, error in self.loader:
            if error is not None:
                raise error
            self.skipped += skipped
            if len(labels) == 0:
                self.skipped_batches += 1
                continue
            yield images, labels
