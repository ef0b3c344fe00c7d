"""Recipe configs: YAML files with an optional `base:` (another recipe this one extends, merged key by key) and
command-line overrides `key.sub=value` (values parsed as YAML: `train.epochs=5`, `method.cutoffs=[35,70]`).

A bare recipe name resolves to the packaged `fastlt/configs/<name>.yaml`. `load_config` refuses a key no part of
fastlt reads (a misspelt `train.epochz=3` would otherwise be ignored) and a value of the wrong type, with a
ConfigError that says which key and what to write instead.

>>> config = load_config("mnist_lt_ce", ["train.epochs=2", "out=runs/x"])
>>> config["train"]["epochs"], config["out"], config["method"]["name"]
(2, 'runs/x', 'ce')
"""

import copy
import difflib
import functools
import glob
import numbers
import os
from typing import Iterable, Optional

import yaml

from fastlt.errors import ConfigError, MissingFileError

CONFIG_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")

# The keys each checked section accepts (besides those any packaged recipe uses); `model` options go to the model
# constructor, `train.schedule` ones to build_schedule, `train.mixup` ones to fastlt.engine.mix.build_mixup, `paper`
# is documentation: those check their own keys.
KNOWN_KEYS = {
    "": {"name", "out", "seed", "device", "resume", "data", "model", "method", "train", "stage2", "paper"},
    "data": {"name", "root", "ratio", "n_max", "seed", "val_per_class", "test_per_class", "loader", "num_workers",
             "augment", "augment_options", "train_list", "val_list", "test_list", "relabel", "skip_corrupt"},
    "train": {"epochs", "batch_size", "eval_batch_size", "lr", "classifier_lr", "momentum", "weight_decay",
              "nesterov", "sampler", "drop_last", "precision", "schedule", "mixup"},
    "method": {"name", "scale", "max_margin", "diversity_factor", "temperature_factor", "base_temperature",
               "drw_beta", "drw_epoch", "tau", "taus", "tau_min", "tau_max", "teacher", "teacher_train_mode",
               "distill_temperature", "distill_factor", "distill_scale_by_experts", "cutoffs", "num_branches",
               "beta", "label_smoothing", "log_eps", "fused_log_eps", "fused_head", "chunk_size"},
    "stage2": {"name", "epochs", "batch_size", "lr", "weight_decay", "sampler", "samples_per_class", "freeze_bn",
               "tau", "taus", "select_on", "feature_transform", "distance", "top_k", "pos_weight", "threshold",
               "adapt_on", "views", "init"},
}
INTEGER, NUMBER, BOOLEAN = "an integer", "a number", "true or false"
# key: (kind, smallest allowed value)
VALUE_RULES = {
    "seed": (INTEGER, None), "resume": (BOOLEAN, None),
    "train.epochs": (INTEGER, 1), "train.batch_size": (INTEGER, 1), "train.eval_batch_size": (INTEGER, 1),
    "train.lr": (NUMBER, 0), "train.classifier_lr": (NUMBER, 0), "train.momentum": (NUMBER, 0),
    "train.weight_decay": (NUMBER, 0), "train.nesterov": (BOOLEAN, None), "train.drop_last": (BOOLEAN, None),
    "data.num_workers": (INTEGER, 0), "data.n_max": (INTEGER, 1), "data.ratio": (NUMBER, 1),
    "data.skip_corrupt": (BOOLEAN, None),
    "train.mixup.mixup_alpha": (NUMBER, 0), "train.mixup.cutmix_alpha": (NUMBER, 0), "train.mixup.prob": (NUMBER, 0),
    "train.mixup.switch_prob": (NUMBER, 0),
    "method.drw_epoch": (INTEGER, 0), "method.log_eps": (NUMBER, 0), "method.fused_log_eps": (NUMBER, 0),
    "stage2.epochs": (INTEGER, 1), "stage2.batch_size": (INTEGER, 1),
}


REQUIRED_KEYS = ("out", "data.name", "model.name", "method.name", "train.epochs", "train.batch_size", "train.lr",
                 "train.schedule.name")


def resolve_path(name_or_path: str, relative_to: Optional[str] = None) -> str:
    """A file path as given, else relative to the including recipe, else a packaged recipe name."""
    candidates = [name_or_path]
    if relative_to:
        candidates.append(os.path.join(relative_to, name_or_path))
    stem = name_or_path if name_or_path.endswith(".yaml") else f"{name_or_path}.yaml"
    candidates.append(os.path.join(CONFIG_DIR, os.path.basename(stem)))
    for candidate in candidates:
        if os.path.isfile(candidate):
            return candidate
    raise MissingFileError(f"config {name_or_path!r} not found (looked in {candidates})")


def merge(base: dict, override: dict) -> dict:
    """Recursive dict merge; the override wins (a None value removes nothing, it sets None)."""
    merged = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = merge(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def read_recipe(path: str) -> dict:
    with open(path) as handle:
        try:
            config = yaml.safe_load(handle) or {}
        except yaml.YAMLError as error:
            problem = " ".join(str(error).split())
            raise ConfigError(f"config {path} is not valid YAML: {problem}") from error
    if not isinstance(config, dict):
        raise ConfigError(f"config {path} must be a mapping of key: value, got {type(config).__name__}")
    base = config.pop("base", None)
    if base is None:
        return config
    return merge(read_recipe(resolve_path(base, os.path.dirname(path))), config)


def set_key(config: dict, dotted_key: str, value) -> None:
    node = config
    *parents, last = dotted_key.split(".")
    for parent in parents:
        node = node.setdefault(parent, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {dotted_key}: {parent} is not a section")
    node[last] = value


def apply_overrides(config: dict, overrides: Iterable[str]) -> dict:
    config = copy.deepcopy(config)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r}: expected key=value, e.g. train.epochs=5")
        key, raw = item.split("=", 1)
        try:
            value = yaml.safe_load(raw)
        except yaml.YAMLError as error:
            problem = str(error).splitlines()[0]
            raise ConfigError(f"override {item!r}: the value is not valid YAML ({problem}); quote strings, write "
                              f"lists as [1,2]") from error
        set_key(config, key.strip(), value)
    return config


@functools.lru_cache(maxsize=1)
def _recipe_keys() -> dict:
    """The keys the packaged recipes use in each checked section."""
    keys = {section: set() for section in KNOWN_KEYS}
    for path in glob.glob(os.path.join(CONFIG_DIR, "*.yaml")):
        with open(path) as handle:
            recipe = yaml.safe_load(handle) or {}
        keys[""].update(recipe)
        for section in KNOWN_KEYS:
            if section and isinstance(recipe.get(section), dict):
                keys[section].update(recipe[section])
    return keys


def check_config(config: dict) -> dict:
    """Refuses keys that nothing reads (suggesting the closest known one) and values of the wrong type or range."""
    for section, known in KNOWN_KEYS.items():
        node = config if not section else config.get(section)
        if node is None:
            continue
        if not isinstance(node, dict):
            raise ConfigError(f"{section} must be a section of key: value pairs, got {node!r}")
        accepted = known | _recipe_keys()[section]
        for key in node:
            if key not in accepted:
                dotted = f"{section}.{key}" if section else str(key)
                close = difflib.get_close_matches(str(key), sorted(accepted), n=1)
                hint = (f"did you mean {(section + '.' if section else '') + close[0]}?" if close
                        else f"known keys: {', '.join(sorted(accepted))}")
                raise ConfigError(f"unknown config key {dotted!r}: {hint}")
    for dotted in REQUIRED_KEYS:
        if _lookup(config, dotted) is None:
            raise ConfigError(f"the config sets no {dotted}: add it to the recipe or pass {dotted}=<value>")
    for dotted, (kind, minimum) in VALUE_RULES.items():
        *parents, last = dotted.split(".")
        node = _lookup(config, ".".join(parents)) if parents else config
        if not isinstance(node, dict) or node.get(last) is None:
            continue
        value = node[last]
        fits = {INTEGER: isinstance(value, numbers.Integral), NUMBER: isinstance(value, numbers.Real),
                BOOLEAN: isinstance(value, bool)}[kind] and (kind == BOOLEAN or not isinstance(value, bool))
        if not fits or (minimum is not None and value < minimum):
            wanted = kind if minimum is None else f"{kind} >= {minimum}"
            raise ConfigError(f"{dotted} must be {wanted}, got {value!r}: set e.g. {dotted}="
                              f"{'true' if kind == BOOLEAN else max(minimum or 0, 1)}")
    return config


def _lookup(config: dict, dotted: str):
    node = config
    for key in dotted.split("."):
        node = node.get(key) if isinstance(node, dict) else None
    return node


def load_config(name_or_path: str, overrides: Iterable[str] = ()) -> dict:
    return check_config(apply_overrides(read_recipe(resolve_path(name_or_path)), overrides))
