"""Recipe configs: YAML files with an optional `base:` (another recipe this one extends, merged key by key) and
command-line overrides `key.sub=value` (values parsed as YAML: `train.epochs=5`, `method.cutoffs=[35,70]`).

A bare recipe name resolves to the packaged `fastlt/configs/<name>.yaml`.

>>> config = load_config("mnist_lt_ce", ["train.epochs=2", "out=runs/x"])
>>> config["train"]["epochs"], config["out"], config["method"]["name"]
(2, 'runs/x', 'ce')
"""

import copy
import os
from typing import Iterable, Optional

import yaml

CONFIG_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")


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
    raise FileNotFoundError(f"config {name_or_path!r} not found (looked in {candidates})")


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
        config = yaml.safe_load(handle) or {}
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
            raise ValueError(f"override {dotted_key}: {parent} is not a section")
    node[last] = value


def apply_overrides(config: dict, overrides: Iterable[str]) -> dict:
    config = copy.deepcopy(config)
    for item in overrides:
        if "=" not in item:
            raise ValueError(f"override {item!r}: expected key=value")
        key, raw = item.split("=", 1)
        set_key(config, key.strip(), yaml.safe_load(raw))
    return config


def load_config(name_or_path: str, overrides: Iterable[str] = ()) -> dict:
    return apply_overrides(read_recipe(resolve_path(name_or_path)), overrides)
