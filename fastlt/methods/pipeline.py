"""A recipe end to end: data, model, method, `fastlt.engine.fit`, test evaluation, then the optional stage 2.

`train(config)` is what `fastlt train` runs. The run folder `config["out"]` gets config.yaml, metrics.jsonl,
last.pt / best.pt, results.json (test many / medium / few) and per_class_accuracy.png; a stage 2 writes the same
into `<out>/stage2_<name>/` plus model.pt. The model is selected on the validation split when the dataset has one,
else the last epoch is used; the test set is only used for the final report.

Usage::

    from fastlt.methods import load_config, train
    summary = train(load_config("mnist_lt_ride", ["train.epochs=3"]))
    summary["test"]["few"]
"""

import os

import numpy as np
import torch

from fastlt.engine import (RunFolder, build_schedule, build_sgd, fit, format_results, init_distributed,
                           load_checkpoint, shutdown_distributed, wrap_model)
from fastlt.engine.mix import build_mixup
from fastlt.engine.trainer import recover_interrupted_run
from fastlt.errors import MissingFileError
from fastlt.methods import stage2
from fastlt.methods.builders import (build_datasets, build_loader, build_model, build_sampler, evaluate,
                                     selected_checkpoint)
from fastlt.methods.config import ConfigError, read_recipe
from fastlt.methods.stage1 import build_method


def parameter_groups(model, train_cfg: dict):
    """The model, or [backbone, classifier] groups when `classifier_lr` is set (Places-LT: 0.01 / 0.1)."""
    if "classifier_lr" not in train_cfg:
        return model
    head = {id(parameter) for parameter in model.classifier.parameters()}
    body = [parameter for parameter in model.parameters() if id(parameter) not in head]
    return [{"params": body}, {"params": list(model.classifier.parameters()), "lr": train_cfg["classifier_lr"]}]


DATA_FOLDERS = {"cifar10_lt": "cifar-10-batches-py", "cifar100_lt": "cifar-100-python", "list_file": "the images"}


def check_data_paths(data: dict) -> None:
    """A clear error before any work when the dataset's files are not where the config says."""
    if data.get("name") in DATA_FOLDERS:
        root = data.get("root")
        if root is None or not os.path.isdir(os.path.expanduser(str(root))):
            raise MissingFileError(f"data.root {root!r} is not a folder: set data.root=<the folder holding "
                                   f"{DATA_FOLDERS[data['name']]}> (fastlt downloads nothing)")
    for split in ("train_list", "val_list", "test_list"):
        if data.get("name") == "list_file" and data.get(split) and not os.path.isfile(data[split]):
            raise MissingFileError(f"data.{split} {data[split]!r} not found: set data.{split}=<its path>")


def per_rank_batch_size(train_cfg: dict, sampler, world_size: int) -> int:
    """The recipe's batch size is the global one (the papers' DataParallel batch): split over the ranks. A ConfigError
    when that leaves an epoch without a training step."""
    batch_size = train_cfg["batch_size"]
    if batch_size < world_size:
        raise ConfigError(f"train.batch_size={batch_size} is the global batch, split over {world_size} ranks: set "
                          f"train.batch_size >= {world_size}")
    if train_cfg.get("drop_last", False) and len(sampler) < batch_size // world_size:
        per_rank = f" per rank ({world_size} ranks)" if world_size > 1 else ""
        raise ConfigError(f"train.drop_last=true with train.batch_size={batch_size} trains 0 steps: an epoch has "
                          f"{len(sampler)} samples{per_rank}; lower train.batch_size or set train.drop_last=false")
    return batch_size // world_size


def train(config: dict, progress_bar: bool = True, verbose: bool = True) -> dict:
    """Stage 1 (and stage 2 when the recipe has one). Returns {"stage1": test results, "stage2": ..., "run": dir}."""
    check_data_paths(config["data"])
    seed = config.get("seed", 0)
    # train.mixup: {mixup_alpha, cutmix_alpha, prob, switch_prob} (BalPoE's recipes), stage 1 only; checked first
    mixup = None if config["train"].get("mixup") is None else build_mixup(config["train"]["mixup"], seed)
    torch.manual_seed(seed)
    np.random.seed(seed)
    context = init_distributed(config.get("device", "auto"))  # torchrun: gloo on CPU, nccl on GPU; else one process
    device = context.device
    data, schedule_cfg, train_cfg = config["data"], config["train"]["schedule"], config["train"]
    datasets = build_datasets(data)
    counts = datasets["train"].train_class_counts
    run = RunFolder(config["out"], config=config, progress_bar=progress_bar, is_main=context.is_main)
    model = build_model(config, datasets["train"].num_classes)
    method = build_method(config["method"], counts, model, device)
    model.to(device)
    epochs = train_cfg["epochs"]
    sampler = build_sampler(datasets["train"], train_cfg.get("sampler", "instance_balanced"), seed, epochs)
    train_loader = build_loader(datasets["train"], data, per_rank_batch_size(train_cfg, sampler, context.world_size),
                                train=True, sampler=sampler, seed=seed, drop_last=train_cfg.get("drop_last", False))
    eval_batch = train_cfg.get("eval_batch_size", 256)
    val_loader = None if datasets["val"] is None else build_loader(datasets["val"], data, eval_batch, train=False)
    optimizer = build_sgd(parameter_groups(model, train_cfg), lr=train_cfg["lr"],
                          momentum=train_cfg.get("momentum", 0.9), weight_decay=train_cfg.get("weight_decay", 5e-4),
                          nesterov=train_cfg.get("nesterov", False))
    schedule = build_schedule(schedule_cfg["name"], total_epochs=epochs,
                              **{key: value for key, value in schedule_cfg.items() if key != "name"})
    fitted = fit(wrap_model(model, context), method.loss_fn, optimizer, schedule, train_loader, epochs=epochs,
                 device=device, run=run, sampler=sampler, val_loader=val_loader, class_counts=counts,
                 precision=train_cfg.get("precision", "fp32"),
                 on_epoch_start=method.on_epoch_start, loss_needs_images=method.needs_images, mixup=mixup,
                 resume=config.get("resume", False), context=context)
    # training is over: every rank leaves the process group; rank 0 alone evaluates and runs stage 2
    shutdown_distributed(context)
    if not context.is_main:
        return {"run": config["out"], "rank": context.rank}
    load_checkpoint(fitted["selected_checkpoint"], model=model, restore_rng=False)
    test_loader = build_loader(datasets["test"], data, eval_batch, train=False)
    title = f"{config.get('name', method.name)} (stage 1)"
    summary = {"run": config["out"], "selected": fitted["selected_checkpoint"], "best_epoch": fitted["best_epoch"],
               "stage1": evaluate(model, test_loader, counts, config["out"], title, device)}
    if verbose:
        print(f"\n{title} on test:\n{format_results(summary['stage1'])}", flush=True)
    if config.get("stage2"):
        summary["stage2"] = stage2.run_stage2(config, model, datasets, device=device, progress_bar=progress_bar,
                                              verbose=verbose)
    run.close()
    return summary


def load_stage1(run_dir: str, checkpoint: str = None, device=torch.device("cpu")):
    """(config, datasets, model with the selected stage-1 weights) of a finished `fastlt train` run."""
    if not os.path.isfile(os.path.join(run_dir, "config.yaml")):
        what = "does not exist" if not os.path.exists(run_dir) else "has no config.yaml"
        raise MissingFileError(f"run folder {run_dir} {what}: give the out= folder of a `fastlt train` run")
    config = read_recipe(os.path.join(run_dir, "config.yaml"))
    datasets = build_datasets(config["data"])
    model = build_model(config, datasets["train"].num_classes)
    # same head adaptations; no distillation teacher is needed to use the trained model
    build_method({**config["method"], "teacher": None}, datasets["train"].train_class_counts, model)
    if checkpoint is None:
        recover_interrupted_run(run_dir)  # a run killed between its last.pt and best.pt: the committed best
        checkpoint = selected_checkpoint(run_dir)
    load_checkpoint(checkpoint, model=model, restore_rng=False)
    return config, datasets, model.to(device)
