"""Builders shared by stage 1 and stage 2: device, datasets, loaders, samplers, model, test evaluation."""

import os

import torch

from fastlt.data import (CIFAR10LT, CIFAR100LT, DigitsLT, FashionMNISTLT, ListFileDataset, LongTailSampler, MNISTLT,
                         make_loader)
from fastlt.data.sampling import check_sampler_options
from fastlt.data.transforms import check_flip
from fastlt.engine import evaluate_logits, plot_per_class_accuracy, predict, uses_cuda, write_json
from fastlt.methods.config import ConfigError
from fastlt.models import create_model


def pick_device(name: str = "auto") -> torch.device:
    return torch.device("cuda" if uses_cuda(name) else "cpu")


DATASETS = ("mnist_lt", "fashion_mnist_lt", "digits_lt", "cifar10_lt", "cifar100_lt", "list_file")
_REQUIRED_DATA_KEYS = {"cifar10_lt": ("root", "ratio"), "cifar100_lt": ("root", "ratio"),
                       "list_file": ("root", "train_list", "test_list")}
AUGMENT_OPTIONS = ("rotation", "flip", "color_jitter", "mean", "std", "pad", "image_size", "resize_size")


def check_data_spec(data: dict) -> dict:
    """Validates a `data:` section without reading any file: a known dataset with its required keys, known
    `augment_options` (a RandomRotation angle >= 0, a bool flip, ...). Returns `data`."""
    name = data.get("name")
    if name not in DATASETS:
        raise ConfigError(f"data.name: unknown dataset {name!r}; expected one of {DATASETS}")
    missing = [key for key in _REQUIRED_DATA_KEYS.get(name, ()) if data.get(key) is None]
    if missing:
        raise ConfigError(f"data: dataset {name!r} needs {missing}")
    if name == "list_file" and data.get("val_list") is not None and data.get("val_list") == data.get("test_list"):
        raise ConfigError("data.val_list is the test list: selecting on it would select on the test set; set "
                          "val_list: null (the last epoch is kept)")
    options = data.get("augment_options", {}) or {}
    unknown = sorted(set(options) - set(AUGMENT_OPTIONS))
    if unknown:
        raise ConfigError(f"data.augment_options: unknown {unknown}; expected some of {AUGMENT_OPTIONS}")
    if not (isinstance(options.get("rotation", 0), (int, float)) and options.get("rotation", 0) >= 0):
        raise ConfigError(f"data.augment_options.rotation must be an angle >= 0, got {options['rotation']!r}")
    if "flip" in options:
        try:
            check_flip(options["flip"])
        except ValueError as error:
            raise ConfigError(f"data.augment_options.{error}") from None
    return data


def build_datasets(data: dict) -> dict:
    """{"train", "val", "test"} datasets of a `data:` section (val is None when the dataset has none: CIFAR-LT, or
    MNIST-LT / Fashion-MNIST-LT with val_per_class 0)."""
    name = check_data_spec(data)["name"]
    if name in ("mnist_lt", "fashion_mnist_lt"):
        builder = MNISTLT if name == "mnist_lt" else FashionMNISTLT
        options = {key: data[key] for key in ("n_max", "ratio", "val_per_class", "root") if key in data}
        splits = ("train", "test") if data.get("val_per_class") == 0 else ("train", "val", "test")
        built = {split: builder(split=split, seed=data.get("seed", 0), **options) for split in splits}
        return {"train": built["train"], "val": built.get("val"), "test": built["test"]}
    if name == "digits_lt":
        options = {key: data[key] for key in ("n_max", "ratio", "val_per_class", "test_per_class") if key in data}
        return {split: DigitsLT(split=split, seed=data.get("seed", 0), **options) for split in ("train", "val", "test")}
    if name in ("cifar10_lt", "cifar100_lt"):
        builder = CIFAR10LT if name == "cifar10_lt" else CIFAR100LT
        return {"train": builder(data["root"], split="train", ratio=data["ratio"]), "val": None,
                "test": builder(data["root"], split="test", ratio=data["ratio"])}
    if name == "list_file":  # ImageNet-LT, Places-LT, iNaturalist 2018
        skip_corrupt = data.get("skip_corrupt", False)
        train = ListFileDataset(data["root"], data["train_list"], relabel_by_frequency=data.get("relabel", False),
                                skip_corrupt=skip_corrupt)
        other = {split: ListFileDataset(data["root"], data[f"{split}_list"], train_dataset=train,
                                        skip_corrupt=skip_corrupt)
                 if data.get(f"{split}_list") else None for split in ("val", "test")}
        return {"train": train, **other}
    raise ValueError(f"unknown dataset {name!r}; expected one of {DATASETS}")


def build_loader(dataset, data: dict, batch_size: int, *, train: bool, sampler=None, seed: int = 0,
                 drop_last: bool = False):
    """`augment: false` feeds training batches without any augmentation (the eval transform); `augment_options`
    go to `make_loader`: e.g. `{flip: false}` keeps the random crop but never mirrors (MNIST-LT: a mirrored 2, 5
    or 7 is another digit or none), `{rotation: 15}` (RIDE's CIFAR), `{color_jitter: 0.4}` (ImageNet-LT)."""
    augment = train and data.get("augment", True)
    if sampler is None:  # evaluation reads the whole split on one rank, also under DDP (rank 0 evaluates)
        sampler = LongTailSampler(dataset, strategy="instance_balanced" if train else "sequential", seed=seed,
                                  **({} if train else {"rank": 0, "world_size": 1}))
    return make_loader(dataset, batch_size, train=augment, sampler=sampler, loader=data.get("loader", "auto"),
                       seed=seed, num_workers=data.get("num_workers", 2), drop_last=drop_last,
                       **data.get("augment_options", {}))


SAMPLER_OPTIONS = ("q", "samples_per_class", "persistent", "replacement", "num_samples")


def build_sampler(dataset, strategy, seed: int, epochs: int, samples_per_class: int = 4, key: str = "train.sampler"):
    """The training sampler of a recipe: `strategy` is a strategy name or a dict `{name: <strategy>, **options}`
    (`replacement: true` for the official i.i.d. square-root sampler, `persistent: false`, `q`, ...;
    `fastlt.data.LongTailSampler`). `dataset` may also be a list of class counts. `key` names the recipe's
    setting in a ConfigError."""
    options = {"samples_per_class": samples_per_class}
    if isinstance(strategy, dict):
        unknown = sorted(set(strategy) - {"name", *SAMPLER_OPTIONS})
        if unknown:
            raise ConfigError(f"{key}: unknown options {unknown}; expected name and some of {SAMPLER_OPTIONS}")
        options.update({option: value for option, value in strategy.items() if option != "name"})
        strategy = strategy.get("name")
    total_epochs = epochs if epochs > 1 else 2
    try:  # the sampler's own argument checks, run here to name the recipe's key
        check_sampler_options(strategy, total_epochs=total_epochs, **options)
    except ValueError as error:
        raise ConfigError(f"{key}: {error}") from None
    source = {"class_counts": dataset} if isinstance(dataset, (list, tuple)) else {"targets": dataset}
    return LongTailSampler(**source, strategy=strategy, seed=seed, total_epochs=total_epochs, **options)


def selected_checkpoint(run_dir: str) -> str:
    """The weights a finished run selected: best.pt (fit writes it only when a validation split chose an epoch),
    else last.pt."""
    best = os.path.join(run_dir, "best.pt")
    return best if os.path.exists(best) else os.path.join(run_dir, "last.pt")


def build_model(config: dict, num_classes: int):
    options = {key: value for key, value in config["model"].items() if key != "name"}
    return create_model(config["model"]["name"], num_classes=num_classes, **options)


def evaluate(model, loader, class_counts, folder: str, title: str, device, logits=None, targets=None) -> dict:
    """Test many / medium / few of `model` (or of given logits): results.json and the per-class plot in `folder`."""
    if logits is None:
        logits, targets = predict(model, loader, device=device)
    results = evaluate_logits(logits, targets, class_counts)
    plot_per_class_accuracy(results["per_class"], class_counts, os.path.join(folder, "per_class_accuracy.png"),
                            title=title)
    write_json(os.path.join(folder, "results.json"), results)
    return results
