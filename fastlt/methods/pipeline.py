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

import dataclasses
import os

import numpy as np
import torch

from fastlt.engine import (RunFolder, build_schedule, build_sgd, channels_last_is_faster, fit, format_results,
                           init_distributed, load_checkpoint, maybe_compile, prepare_model, shutdown_distributed,
                           wrap_model)
from fastlt.engine.mix import build_mixup
from fastlt.engine.trainer import recover_interrupted_run
from fastlt.errors import ConfigError, MissingFileError
from fastlt.methods import stage2
from fastlt.methods.builders import (DataOptions, build_datasets, build_loader, build_model, build_sampler, evaluate,
                                     selected_checkpoint)
from fastlt.methods.config import read_recipe
from fastlt.methods.options import given
from fastlt.methods.recipe import RecipeOptions, TrainOptions, parse_recipe
from fastlt.methods.stage1 import build_method, rebuild_options


def parameter_groups(model, train: TrainOptions):
    """The model, or [backbone, classifier] groups when `classifier_lr` is set (Places-LT: 0.01 / 0.1)."""
    if train.classifier_lr is None:
        return model
    head = {id(parameter) for parameter in model.classifier.parameters()}
    body = [parameter for parameter in model.parameters() if id(parameter) not in head]
    return [{"params": body}, {"params": list(model.classifier.parameters()), "lr": train.classifier_lr}]


DATA_FOLDERS = {"cifar10_lt": "cifar-10-batches-py", "cifar100_lt": "cifar-100-python", "list_file": "the images"}


def check_data_paths(data: DataOptions) -> None:
    """A clear error before any work when the dataset's files are not where the config says."""
    if data.name in DATA_FOLDERS:
        if not os.path.isdir(os.path.expanduser(str(data.root))):
            raise MissingFileError(f"data.root {data.root!r} is not a folder: set data.root=<the folder holding "
                                   f"{DATA_FOLDERS[data.name]}> (fastlt downloads nothing)")
    for split in ("train_list", "val_list", "test_list"):
        path = getattr(data, split, None)
        if path and not os.path.isfile(path):
            raise MissingFileError(f"data.{split} {path!r} not found: set data.{split}=<its path>")


def per_rank_batch_size(train: TrainOptions, sampler, world_size: int) -> int:
    """The recipe's batch size is the global one (the papers' DataParallel batch): split over the ranks. A ConfigError
    when that leaves an epoch without a training step."""
    if train.batch_size < world_size:
        raise ConfigError(f"train.batch_size={train.batch_size} is the global batch, split over {world_size} ranks: "
                          f"set train.batch_size >= {world_size}")
    if train.drop_last and len(sampler) < train.batch_size // world_size:
        per_rank = f" per rank ({world_size} ranks)" if world_size > 1 else ""
        raise ConfigError(f"train.drop_last=true with train.batch_size={train.batch_size} trains 0 steps: an epoch has "
                          f"{len(sampler)} samples{per_rank}; lower train.batch_size or set train.drop_last=false")
    return train.batch_size // world_size


def seed_everything(seed: int) -> None:
    """torch's and numpy's global generators (weight init, augmentation draws); the samplers seed their own."""
    torch.manual_seed(seed)
    np.random.seed(seed)


def train(config: dict, progress_bar: bool = True, verbose: bool = True) -> dict:
    """Stage 1 (and stage 2 when the recipe has one). Returns {"stage1": test results, "stage2": ..., "run": dir}."""
    recipe: RecipeOptions = parse_recipe(config)
    data, train_options, seed = recipe.data, recipe.train, recipe.seed
    check_data_paths(data)
    # train.mixup (BalPoE's recipes), stage 1 only; built first: a bad combination fails before any work
    mixup = None if train_options.mixup is None else build_mixup(dataclasses.asdict(train_options.mixup), seed)
    seed_everything(seed)
    context = init_distributed(recipe.device)  # torchrun: gloo on CPU, nccl on GPU; else one process
    device = context.device
    datasets = build_datasets(data)
    counts = datasets["train"].train_class_counts
    run = RunFolder(recipe.out, config=config, progress_bar=progress_bar, is_main=context.is_main)
    model = build_model(recipe.model, datasets["train"].num_classes)
    method = build_method(recipe.method, counts, model, device)
    channels_last = train_options.channels_last
    channels_last = channels_last_is_faster(device) if channels_last is None else channels_last
    model = prepare_model(model, device, channels_last)
    epochs = train_options.epochs
    sampler = build_sampler(datasets["train"], train_options.sampler, seed, epochs)
    batch_size = per_rank_batch_size(train_options, sampler, context.world_size)
    train_loader = build_loader(datasets["train"], data, batch_size, train=True, sampler=sampler, seed=seed,
                                drop_last=train_options.drop_last, channels_last=channels_last)
    eval_batch = train_options.eval_batch_size
    val_loader = None if datasets["val"] is None else build_loader(datasets["val"], data, eval_batch, train=False,
                                                                   channels_last=channels_last)
    optimizer = build_sgd(parameter_groups(model, train_options), lr=train_options.lr, momentum=train_options.momentum,
                          weight_decay=train_options.weight_decay, nesterov=train_options.nesterov)
    schedule = build_schedule(train_options.schedule.name, total_epochs=epochs, **given(train_options.schedule))
    trained = maybe_compile(wrap_model(model, context), enabled=train_options.compile)
    fitted = fit(trained, method.loss_fn, optimizer, schedule, train_loader, epochs=epochs,
                 device=device, run=run, sampler=sampler, val_loader=val_loader, class_counts=counts,
                 precision=train_options.precision, channels_last=channels_last, on_epoch_start=method.on_epoch_start,
                 loss_needs_images=method.needs_images, mixup=mixup, resume=recipe.resume, context=context)
    # training is over: every rank leaves the process group; rank 0 alone evaluates and runs stage 2
    shutdown_distributed(context)
    if not context.is_main:
        return {"run": recipe.out, "rank": context.rank}
    if getattr(model, "fused_head", None) is not None and model.fused_head.process_group is not None:
        model.use_fused_head(model.fused_head.single_process_copy())  # class-parallel: the checkpoint holds it whole
    load_checkpoint(fitted["selected_checkpoint"], model=model, restore_rng=False)
    test_loader = build_loader(datasets["test"], data, eval_batch, train=False)
    title = f"{recipe.name or method.name} (stage 1)"
    summary = {"run": recipe.out, "selected": fitted["selected_checkpoint"], "best_epoch": fitted["best_epoch"],
               "stage1": evaluate(model, test_loader, counts, recipe.out, title, device)}
    if verbose:
        print(f"\n{title} on test:\n{format_results(summary['stage1'])}", flush=True)
    if recipe.stage2 is not None:
        summary["stage2"] = stage2.run_stage2(config, model, datasets, device=device, progress_bar=progress_bar,
                                              verbose=verbose)
    run.close()
    return summary


def stage1_recipe(config: dict) -> RecipeOptions:
    """The typed options of a finished run's config.yaml, its stage 2 left out (loading stage 1 does not read it)."""
    return parse_recipe({**config, "stage2": None})


def load_stage1(run_dir: str, checkpoint: str = None, device=torch.device("cpu")):
    """(config, datasets, model with the selected stage-1 weights) of a finished `fastlt train` run."""
    if not os.path.isfile(os.path.join(run_dir, "config.yaml")):
        what = "does not exist" if not os.path.exists(run_dir) else "has no config.yaml"
        raise MissingFileError(f"run folder {run_dir} {what}: give the out= folder of a `fastlt train` run")
    config = read_recipe(os.path.join(run_dir, "config.yaml"))
    recipe = stage1_recipe(config)
    datasets = build_datasets(recipe.data)
    model = build_model(recipe.model, datasets["train"].num_classes)
    # same head adaptations; no distillation teacher is needed to use the trained model
    build_method(rebuild_options(recipe.method), datasets["train"].train_class_counts, model)
    if checkpoint is None:
        recover_interrupted_run(run_dir)  # a run killed between its last.pt and best.pt: the committed best
        checkpoint = selected_checkpoint(run_dir)
    load_checkpoint(checkpoint, model=model, restore_rng=False)
    return config, datasets, model.to(device)
