"""Stage 2 on a trained stage-1 model: the `stage2:` section of a recipe, or `fastlt stage2 NAME <run>`.

Each stage-2 method lives in its own file (decoupling.py: crt, lws, tau, ncm; router.py; logit_adjust.py; sade.py),
registered with `register_method(name, options, stage=2, needs_model=..., reload=...)`: a function
`(options, stage: Stage2Context) -> Stage2Result`. `run_stage2` gives it the stage-1 model and data, then writes
`<out>/stage2_<name>/`: stage2.json (the name and what the method chose: tau, router shares, SADE's expert weights,
...), the method's own files (model.pt with the new head for crt / lws / tau / ncm, router.pt for router),
metrics.jsonl, results.json and per_class_accuracy.png on the test split.
"""

import dataclasses
import json
import os
from typing import Optional

import torch
from torch import nn

from fastlt.engine import RunFolder, evaluate_logits, format_results, write_json
from fastlt.errors import ConfigError
from fastlt.methods import registry
from fastlt.methods.builders import DataOptions, build_loader, build_sampler, evaluate
from fastlt.methods.options import Named, parse_named
from fastlt.methods.recipe import parse_recipe


@dataclasses.dataclass
class Stage2Context:
    """What a stage-2 method works on besides its options."""

    model: nn.Module  # the stage-1 weights; a method may replace its head in place
    datasets: dict  # {"train", "val", "test"}; val is None when the data set has none
    data: DataOptions  # the recipe's data section (how to load batches)
    seed: int
    device: torch.device
    run: RunFolder  # <out>/stage2_<name>: metrics.jsonl, progress bars, the method's files
    plain_loaders: dict  # {split: loader or None}: each split in order with the evaluation transform

    @property
    def train_set(self):
        return self.datasets["train"]

    @property
    def class_counts(self):
        return self.datasets["train"].train_class_counts

    def sampler(self, sampler, epochs: int, samples_per_class: Optional[int] = None, dataset=None):
        """A training sampler over `dataset` (default: the training split); `sampler` as in `build_sampler`."""
        return build_sampler(self.train_set if dataset is None else dataset, sampler, self.seed, epochs,
                             samples_per_class, key="stage2.sampler")

    def loader(self, batch_size: int, sampler):
        """Augmented batches of the training split in `sampler` order."""
        return build_loader(self.train_set, self.data, batch_size, train=True, sampler=sampler, seed=self.seed)

    def save(self, file_name: str, state_dict: dict) -> None:
        torch.save(state_dict, self.run.path(file_name))

    def selection_loader(self, split: str, method: str):
        """The plain loader of the split a method picks its tau on (never test unless asked for, and then said)."""
        if self.plain_loaders[split] is None:
            raise ConfigError(f"stage2 {method}: no {split} split to pick tau on; set stage2.tau or stage2.select_on")
        if split == "test":
            print(f"stage2 {method}: picking tau on the TEST split, as requested by stage2.select_on", flush=True)
        return self.plain_loaders[split]


SPLITS = ("train", "val", "test")


@dataclasses.dataclass
class Stage2Result:
    """What a stage-2 method returns: what it chose (stage2.json), and the test logits when it predicts otherwise
    than through the model's forward (else the model is evaluated)."""

    chosen: dict
    logits: Optional[torch.Tensor] = None
    targets: Optional[torch.Tensor] = None
    note: str = ""  # printed after the title, e.g. " (tau 1.0, picked on val)"
    details: str = ""  # printed after the results


def stage2_options(stage2) -> Named:
    """The typed options of a `stage2:` section (a dict as a recipe writes it, or options already parsed)."""
    return parse_named(registry.declarations(2), stage2, "stage2", "method")


def stage2_folder(out: str, name: str) -> str:
    return os.path.join(out, f"stage2_{name}")


def run_stage2(config: dict, model, datasets: dict, *, device, progress_bar: bool = True,
               verbose: bool = True) -> dict:
    """Runs config["stage2"] on `model` (stage-1 weights, modified in place) and returns its test results."""
    recipe = parse_recipe(config)
    options = stage2_options(recipe.stage2)
    method = registry.get_method(options.name, stage=2)
    if not isinstance(model, method.needs_model):
        raise ConfigError(f"stage2 {options.name}: needs a {method.needs_model.__name__} stage-1 model, got "
                          f"{type(model).__name__} ({recipe.model.name})")
    folder = stage2_folder(recipe.out, options.name)
    run = RunFolder(folder, config=config, progress_bar=progress_bar)
    eval_batch = recipe.train.eval_batch_size
    plain_loaders = {split: None if datasets[split] is None else build_loader(datasets[split], recipe.data, eval_batch,
                                                                               train=False)
                     for split in ("train", "val", "test")}
    stage = Stage2Context(model, datasets, recipe.data, recipe.seed, device, run, plain_loaders)
    result = method.build(options, stage)
    chosen = {"name": options.name, **result.chosen}
    write_json(os.path.join(folder, "stage2.json"), chosen)
    title = f"{recipe.name or options.name} (stage 2: {options.name})"
    results = evaluate(model, plain_loaders["test"], stage.class_counts, folder, title, device, result.logits,
                       result.targets)
    if verbose:
        print(f"\n{title}{result.note} on test:\n{format_results(results)}", flush=True)
        if result.details:
            print(result.details, flush=True)
    run.close()
    return {**results, "chosen": chosen}


def evaluate_stage2(folder: str, model, datasets, recipe, device, split: str = "test") -> dict:
    """Re-evaluates a saved stage-2 result (`fastlt eval --run <out>/stage2_<name>`) on the stage-1 `model` of the
    run whose `recipe` (parsed options) made it."""
    with open(os.path.join(folder, "stage2.json")) as handle:
        chosen = json.load(handle)
    loader = build_loader(datasets[split], recipe.data, recipe.train.eval_batch_size, train=False)
    counts = datasets["train"].train_class_counts
    method = registry.get_method(chosen["name"], stage=2)
    logits, targets = method.reload(chosen, model.to(device), folder, loader, counts, device)
    return evaluate_logits(logits, targets, counts)
