"""The declaration of a whole recipe: its top-level keys and its `train:` section here, every other section in the
file of the code that reads it (data sets, samplers and models in builders.py, each method in its own file, the
schedules by their classes' arguments in fastlt/engine/schedules.py).

`parse_recipe(config)` checks a recipe dict against them and returns the typed RecipeOptions that `pipeline.train`
and `run_stage2` read (`recipe.train.epochs`, `recipe.method.drw_epoch`, ...).

>>> from fastlt.methods.config import load_config
>>> recipe = parse_recipe(load_config("mnist_lt_ride"))
>>> recipe.method.name, recipe.method.drw_epoch, recipe.method.drw_beta, recipe.train.schedule.milestones
('ride', 24, 0.9999, (24, 27))
"""

import dataclasses
import functools
from typing import Callable, Dict, Iterator, Optional

from fastlt.engine.acceleration import maybe_compile
from fastlt.engine.amp import PRECISIONS
from fastlt.engine.mix import Mixup
from fastlt.engine.optim import build_sgd
from fastlt.engine.schedules import SCHEDULES
from fastlt.engine.trainer import fit
from fastlt.methods import registry
from fastlt.methods.builders import DataOptions, SamplerOptions, dataset_declarations, model_declarations
from fastlt.methods.options import (REQUIRED, Named, declared, declared_fields, default_of, option,
                                    options_from_signature, parse)


@functools.lru_cache(maxsize=None)
def schedule_declaration(name: str) -> type:
    """The keys of `train.schedule: {name: <name>}`: its class's arguments, less those the name fixes."""
    schedule = SCHEDULES[name]
    fixed = getattr(schedule, "keywords", {})  # a functools.partial: e.g. ride_custom's warmup_start_factor
    return options_from_signature(schedule, name, skip=("total_epochs", *fixed))


def schedule_declarations() -> Dict[str, type]:
    return {name: schedule_declaration(name) for name in SCHEDULES}


@declared
class MixupOptions:
    """MixUp / CutMix of the stage-1 batches (fastlt.engine.mix.Mixup, timm's names; BalPoE's recipes)."""

    mixup_alpha: float = option(default_of(Mixup, "mixup_alpha"), "MixUp's lam ~ Beta(alpha, alpha); 0: no MixUp",
                                low=0)
    cutmix_alpha: float = option(default_of(Mixup, "cutmix_alpha"), "CutMix's lam ~ Beta(alpha, alpha); 0: no CutMix",
                                 low=0)
    prob: float = option(default_of(Mixup, "prob"), "the share of steps that are mixed", low=0, high=1)
    switch_prob: float = option(default_of(Mixup, "switch_prob"), "with both alphas > 0: the share of CutMix steps",
                                low=0, high=1)


@declared
class TrainOptions:
    """The stage-1 training loop of `fastlt.methods.pipeline.train`: SGD, its schedule, the sampler, the batches."""

    epochs: int = option(REQUIRED, "training epochs", low=1)
    batch_size: int = option(REQUIRED, "the global batch (split over the DDP ranks)", low=1)
    eval_batch_size: int = option(256, "batch of validation and test prediction", low=1)
    lr: float = option(REQUIRED, "SGD's base learning rate", low=0)
    classifier_lr: Optional[float] = option(None, "the classifier's own learning rate (Places-LT: 0.1 with lr 0.01)",
                                            low=0)
    momentum: float = option(default_of(build_sgd, "momentum"), "SGD momentum", low=0)
    weight_decay: float = option(5e-4, "SGD weight decay (every parameter)", low=0)
    nesterov: bool = option(default_of(build_sgd, "nesterov"), "Nesterov momentum")
    sampler: SamplerOptions = option(SamplerOptions(name="instance_balanced"),
                                     "the training sampler: a strategy, or {name: <strategy>, its options}")
    drop_last: bool = option(False, "drop each epoch's last incomplete batch (Decoupling's and ResLT's loaders)")
    precision: str = option(default_of(fit, "precision"), "autocast: fp32, bf16, or fp16 (CUDA)", choices=PRECISIONS)
    mixup: Optional[MixupOptions] = option(None, "MixUp / CutMix of the training batches (null: none)")
    channels_last: Optional[bool] = option(None, "channels_last (NHWC) model and batches; null: on where faster "
                                                 "(CUDA, oneDNN CPUs)")
    compile: bool = option(default_of(maybe_compile, "enabled"),
                           "torch.compile the model (the first steps compile for minutes on a CPU)")
    schedule: Named = option(REQUIRED, "the learning-rate schedule: {name: <schedule>, its arguments}",
                             declarations=schedule_declarations)


@declared
class RecipeOptions:
    """A recipe: the run, then one section per part (data, model, method, train and an optional stage2)."""

    name: Optional[str] = option(None, "the recipe's name (in titles and plots)")
    out: str = option(REQUIRED, "the run folder")
    seed: int = option(0, "seed of torch, numpy and the samplers")
    device: str = option("auto", "auto (CUDA when there is one), cpu, cuda or cuda:N")
    resume: bool = option(False, "continue from out/last.pt")
    data: DataOptions = option(REQUIRED, "the data set: {name: <data set>, its keys}",
                               declarations=dataset_declarations)
    model: Named = option(REQUIRED, "the model: {name: <model>, its builder's arguments}",
                          declarations=model_declarations)
    method: Named = option(REQUIRED, "the stage-1 method: {name: <method>, its options} (fastlt methods)",
                           declarations=lambda: registry.declarations(1))
    train: TrainOptions = option(REQUIRED, "the training loop")
    stage2: Optional[Named] = option(None, "a stage 2 run after stage 1: {name: <method>, its options}",
                                     declarations=lambda: registry.declarations(2))
    paper: Optional[dict] = option(None, "documentation only: the paper's number, its source, how it was selected")


def parse_recipe(config) -> RecipeOptions:
    """The typed options of a recipe dict (ConfigError naming the first key that is wrong)."""
    return parse(RecipeOptions, config)


@functools.lru_cache(maxsize=None)
def named_sections(declaration: type = RecipeOptions, path: str = "") -> Dict[str, Callable[[], Dict[str, type]]]:
    """{dotted section: its declarations()} for each section whose `name` picks its declaration (data, model,
    method, stage2, train.schedule)."""
    found = {}
    for name, field in declared_fields(declaration).items():
        key = f"{path}.{name}" if path else name
        if field.metadata.get("declarations") is not None:
            found[key] = field.metadata["declarations"]
        elif dataclasses.is_dataclass(field.type):
            found.update(named_sections(field.type, key))
    return found


def known_keys(config: dict, declaration: type = RecipeOptions, path: str = "") -> Iterator[str]:
    """Every dotted key a recipe like `config` may set: its sections' keys for the data set, model, methods and
    schedule it names."""
    for name, field in declared_fields(declaration).items():
        key = f"{path}.{name}" if path else name
        yield key
        section = config.get(name) if isinstance(config, dict) else None
        nested = field.type if dataclasses.is_dataclass(field.type) else None
        if field.metadata.get("declarations") is not None:
            chosen = section.get("name") if isinstance(section, dict) else section
            nested = field.metadata["declarations"]().get(chosen) if isinstance(chosen, str) else None
        if nested is not None:
            yield from known_keys(section if isinstance(section, dict) else {}, nested, key)
