"""Builders shared by stage 1 and stage 2, each with the declaration of the recipe keys it reads: the data sets
(`data:`, one declaration per data set), loaders (`data.augment_options`), samplers (`train.sampler`,
`stage2.sampler`), models (`model:`, declared by the model builders' own arguments), and the test evaluation.

>>> data = parse_named(dataset_declarations(), {"name": "mnist_lt", "ratio": 10}, "data", "dataset")
>>> data.name, data.ratio, data.n_max, data.augment_options.flip
('mnist_lt', 10, 500, None)
"""

import functools
import os
from typing import Callable, Dict, Optional, Tuple

import torch

from fastlt.data import (CIFAR10LT, CIFAR100LT, DigitsLT, FashionMNISTLT, ListFileDataset, LongTailSampler, MNISTLT,
                         make_loader)
from fastlt.data.loaders import LOADERS
from fastlt.data.sampling import STRATEGIES, check_sampler_options
from fastlt.engine import evaluate_logits, plot_per_class_accuracy, predict, uses_cuda, write_json
from fastlt.errors import ConfigError
from fastlt.methods.options import (REQUIRED, Named, declared, default_of, given, option, parse,
                                    parse_named, options_from_signature)
from fastlt.models import create_model, list_models
from fastlt.models.registry import get_model_builder


def pick_device(name: str = "auto") -> torch.device:
    return torch.device("cuda" if uses_cuda(name) else "cpu")


# -- data: one declaration per data set, registered with its builder ----------------------------------------------


@declared
class AugmentOptions:
    """The training augmentation of `fastlt.data.make_loader`; a key left unset keeps the loader's default."""

    rotation: Optional[float] = option(None, "RandomRotation angle in degrees (RIDE's CIFAR: 15)", low=0)
    flip: Optional[bool] = option(None, "random horizontal flip (the loader's default: on; digits: false)")
    color_jitter: Optional[float] = option(None, "list files: ColorJitter strength (ImageNet-LT: 0.4)", low=0)
    mean: Optional[Tuple[float, ...]] = option(None, "per-channel normalisation mean (default: the data set's)")
    std: Optional[Tuple[float, ...]] = option(None, "per-channel normalisation std (default: the data set's)",
                                              low=0, low_open=True)
    pad: Optional[int] = option(None, "array data sets: the random crop's zero padding", low=0)
    image_size: Optional[int] = option(None, "list files: the RandomResizedCrop size", low=1)
    resize_size: Optional[int] = option(None, "list files: the evaluation resize before the centre crop", low=1)


@declared
class DataOptions(Named):
    """The keys every data set has: how its batches are loaded."""

    loader: str = option(default_of(make_loader, "loader"), "auto (DALI when installed, else torch), dali or torch",
                         choices=LOADERS)
    num_workers: int = option(default_of(make_loader, "num_workers"), "loader worker processes", low=0)
    augment: bool = option(True, "false: training batches get the evaluation transform (no augmentation)")
    augment_options: AugmentOptions = option(AugmentOptions(), "the training augmentation")


# name -> (declaration, builder(options) -> {"train", "val", "test"} datasets, val None when the data set has none)
DATASETS: Dict[str, Tuple[type, Callable]] = {}


def register_dataset(name: str, options: type) -> Callable:
    """Decorator: a `data: {name: <name>}` data set, its builder and the declaration of its keys."""

    def register(builder: Callable) -> Callable:
        if name in DATASETS:
            raise ValueError(f"register_dataset: a data set named {name!r} is already registered")
        DATASETS[name] = (options, builder)
        return builder

    return register


def dataset_declarations() -> Dict[str, type]:
    return {name: options for name, (options, _) in DATASETS.items()}


def data_options(data) -> DataOptions:
    """The typed options of a `data:` section (a dict as a recipe writes it, or options already parsed)."""
    return parse_named(dataset_declarations(), data, "data", "dataset")


@declared
class MNISTLTOptions(DataOptions):
    """MNIST-LT (fastlt.data.MNISTLT): an exponential profile over the digits, a balanced val split, MNIST's test."""

    n_max: int = option(default_of(MNISTLT, "n_max"), "training images of the most frequent class", low=1)
    ratio: float = option(default_of(MNISTLT, "ratio"), "imbalance ratio: most / least frequent class", low=1)
    seed: int = option(default_of(MNISTLT, "seed"), "seed of the long-tailed subset and of the val split")
    val_per_class: int = option(default_of(MNISTLT, "val_per_class"),
                                "val images per class, outside the subset (0: no val split, the last epoch is kept)",
                                low=0)
    root: Optional[str] = option(default_of(MNISTLT, "root"), "the folder of the idx files (null: the data set's own)")


@declared
class FashionMNISTLTOptions(MNISTLTOptions):
    """Fashion-MNIST-LT (fastlt.data.FashionMNISTLT): CIFAR-10-LT's profile over Fashion-MNIST's ten classes."""

    n_max: int = option(default_of(FashionMNISTLT, "n_max"), "training images of the most frequent class", low=1)
    ratio: float = option(default_of(FashionMNISTLT, "ratio"), "imbalance ratio: most / least frequent class", low=1)
    seed: int = option(default_of(FashionMNISTLT, "seed"), "seed of the long-tailed subset and of the val split")
    val_per_class: int = option(default_of(FashionMNISTLT, "val_per_class"),
                                "val images per class, outside the subset (0: no val split, the last epoch is kept)",
                                low=0)
    root: Optional[str] = option(default_of(FashionMNISTLT, "root"),
                                 "the folder of the idx files (null: $FASTLT_DATA or the cache, `fastlt data`)")


@register_dataset("mnist_lt", MNISTLTOptions)
@register_dataset("fashion_mnist_lt", FashionMNISTLTOptions)
def _idx_long_tailed(data: MNISTLTOptions) -> dict:
    builder = MNISTLT if data.name == "mnist_lt" else FashionMNISTLT
    splits = ("train", "test") if data.val_per_class == 0 else ("train", "val", "test")
    built = {split: builder(split=split, seed=data.seed, n_max=data.n_max, ratio=data.ratio,
                            val_per_class=data.val_per_class, root=data.root) for split in splits}
    return {"train": built["train"], "val": built.get("val"), "test": built["test"]}


@declared
class DigitsLTOptions(DataOptions):
    """Digits-LT (fastlt.data.DigitsLT): scikit-learn's 8x8 digits with the MNIST-LT profile, for tiny tests."""

    n_max: int = option(default_of(DigitsLT, "n_max"), "training images of the most frequent digit", low=1)
    ratio: float = option(default_of(DigitsLT, "ratio"), "imbalance ratio: most / least frequent digit", low=1)
    seed: int = option(default_of(DigitsLT, "seed"), "seed of the long-tailed subset and of the splits")
    val_per_class: int = option(default_of(DigitsLT, "val_per_class"), "val images per digit", low=1)
    test_per_class: int = option(default_of(DigitsLT, "test_per_class"), "test images per digit", low=1)


@register_dataset("digits_lt", DigitsLTOptions)
def _digits_lt(data: DigitsLTOptions) -> dict:
    return {split: DigitsLT(split=split, seed=data.seed, n_max=data.n_max, ratio=data.ratio,
                            val_per_class=data.val_per_class, test_per_class=data.test_per_class)
            for split in ("train", "val", "test")}


@declared
class CIFARLTOptions(DataOptions):
    """CIFAR-10-LT / CIFAR-100-LT (the LDAM-DRW profile); no val split: the last epoch is the model."""

    root: str = option(REQUIRED, "the folder holding cifar-10-batches-py / cifar-100-python")
    ratio: float = option(REQUIRED, "imbalance ratio: most / least frequent class (10, 50, 100)", low=1)


@register_dataset("cifar10_lt", CIFARLTOptions)
@register_dataset("cifar100_lt", CIFARLTOptions)
def _cifar_lt(data: CIFARLTOptions) -> dict:
    builder = CIFAR10LT if data.name == "cifar10_lt" else CIFAR100LT
    return {"train": builder(data.root, split="train", ratio=data.ratio), "val": None,
            "test": builder(data.root, split="test", ratio=data.ratio)}


@declared
class ListFileOptions(DataOptions):
    """Image folders with the official list files (ImageNet-LT, Places-LT, iNaturalist 2018)."""

    root: str = option(REQUIRED, "the folder the list files' paths are relative to")
    train_list: str = option(REQUIRED, "the training list file (path label per line)")
    val_list: Optional[str] = option(None, "the val list (model and tau selection; null: the last epoch is kept)")
    test_list: str = option(REQUIRED, "the test list (reported only)")
    relabel: bool = option(default_of(ListFileDataset, "relabel_by_frequency"),
                           "renumber the classes by ascending training frequency (ResLT's ImageNet-LT remap)")
    skip_corrupt: bool = option(default_of(ListFileDataset, "skip_corrupt"),
                                "leave out (and count) images that cannot be read instead of stopping the run")

    def __post_init__(self):
        if self.val_list is not None and self.val_list == self.test_list:
            raise ConfigError("data.val_list is the test list: selecting on it would select on the test set; set "
                              "val_list: null (the last epoch is kept)")


@register_dataset("list_file", ListFileOptions)
def _list_file(data: ListFileOptions) -> dict:
    train = ListFileDataset(data.root, data.train_list, relabel_by_frequency=data.relabel,
                            skip_corrupt=data.skip_corrupt)
    other = {split: ListFileDataset(data.root, getattr(data, f"{split}_list"), train_dataset=train,
                                    skip_corrupt=data.skip_corrupt)
             if getattr(data, f"{split}_list") else None for split in ("val", "test")}
    return {"train": train, **other}


def check_data_spec(data) -> DataOptions:
    """Validates a `data:` section without reading any file; returns its typed options."""
    return data_options(data)


def build_datasets(data) -> dict:
    """{"train", "val", "test"} datasets of a `data:` section (val is None when the dataset has none: CIFAR-LT)."""
    data = data_options(data)
    return DATASETS[data.name][1](data)


def build_loader(dataset, data, batch_size: int, *, train: bool, sampler=None, seed: int = 0,
                 drop_last: bool = False, strong=None, channels_last: bool = False):
    """`augment: false` feeds training batches without any augmentation (the eval transform); `augment_options`
    go to `make_loader`: e.g. `{flip: false}` keeps the random crop but never mirrors (MNIST-LT: a mirrored 2, 5
    or 7 is another digit or none), `{rotation: 15}` (RIDE's CIFAR), `{color_jitter: 0.4}` (ImageNet-LT); `strong`
    (SADE's test-time views, fastlt.data.transforms.SADE_VIEWS) replaces the training augmentation."""
    data = data_options(data)
    augment = train and data.augment
    if sampler is None:  # evaluation reads the whole split on one rank, also under DDP (rank 0 evaluates)
        sampler = LongTailSampler(dataset, strategy="instance_balanced" if train else "sequential", seed=seed,
                                  **({} if train else {"rank": 0, "world_size": 1}))
    return make_loader(dataset, batch_size, train=augment, sampler=sampler, loader=data.loader, seed=seed,
                       num_workers=data.num_workers, drop_last=drop_last, strong=strong, channels_last=channels_last,
                       **given(data.augment_options))


# -- samplers ------------------------------------------------------------------------------------------------------


@declared
class SamplerOptions(Named):
    """A sampling strategy of `fastlt.data.LongTailSampler` (a bare name, or {name: ..., options}); an option left
    unset keeps the sampler's default."""

    name: str = option(REQUIRED, "the strategy", choices=STRATEGIES)
    q: Optional[float] = option(None, "q_power: a class is drawn with probability ~ n_c^q")
    samples_per_class: Optional[int] = option(None, "class_aware: images of a class in a row", low=1)
    persistent: Optional[bool] = option(None, "each class's shuffled bucket carries over from epoch to epoch")
    replacement: Optional[bool] = option(None, "draw classes i.i.d. by probability (the official square-root sampler)")
    num_samples: Optional[int] = option(None, "samples per epoch (default: the data set's size)", low=1)


def build_sampler(dataset, sampler, seed: int, epochs: int, samples_per_class: Optional[int] = None,
                  key: str = "train.sampler"):
    """The training sampler of a recipe: `sampler` is a strategy name, a dict `{name: <strategy>, **options}` or
    SamplerOptions (`replacement: true` for the official i.i.d. square-root sampler, `persistent: false`, `q`, ...;
    `fastlt.data.LongTailSampler`); `samples_per_class` applies unless the sampler sets its own. `dataset` may also
    be a list of class counts; `key` names the recipe key in a ConfigError."""
    sampler = parse(SamplerOptions, sampler, key)
    options = {} if samples_per_class is None else {"samples_per_class": samples_per_class}
    options.update(given(sampler))
    total_epochs = epochs if epochs > 1 else 2
    try:  # the sampler's checks across its options (q_power needs q, ...), which read no data: named by the key
        check_sampler_options(sampler.name, total_epochs=total_epochs, **options)
    except ValueError as error:
        raise ConfigError(f"{key}: {error}") from None
    source = {"class_counts": dataset} if isinstance(dataset, (list, tuple)) else {"targets": dataset}
    return LongTailSampler(**source, strategy=sampler.name, seed=seed, total_epochs=total_epochs, **options)


# -- models: declared by their builders' arguments ----------------------------------------------------------------


@functools.lru_cache(maxsize=None)
def model_declaration(name: str) -> type:
    """The keys of `model: {name: <name>}`: its builder's arguments (fastlt.models.register_model), num_classes
    aside (the data set gives it)."""
    return options_from_signature(get_model_builder(name), name, skip=("num_classes",))


def model_declarations() -> Dict[str, type]:
    return {name: model_declaration(name) for name in list_models()}


def build_model(model, num_classes: int):
    """The model of a `model:` section (a dict as a recipe writes it, or options already parsed)."""
    options = parse_named(model_declarations(), model, "model", "model")
    return create_model(options.name, num_classes=num_classes, **given(options, skip=("name",)))


def selected_checkpoint(run_dir: str) -> str:
    """The weights a finished run selected: best.pt (fit writes it only when a validation split chose an epoch),
    else last.pt."""
    best = os.path.join(run_dir, "best.pt")
    return best if os.path.exists(best) else os.path.join(run_dir, "last.pt")


def evaluate(model, loader, class_counts, folder: str, title: str, device, logits=None, targets=None) -> dict:
    """Test many / medium / few of `model` (or of given logits): results.json and the per-class plot in `folder`."""
    if logits is None:
        logits, targets = predict(model, loader, device=device)
    results = evaluate_logits(logits, targets, class_counts)
    plot_per_class_accuracy(results["per_class"], class_counts, os.path.join(folder, "per_class_accuracy.png"),
                            title=title)
    write_json(os.path.join(folder, "results.json"), results)
    return results
