"""Recipe configs: YAML files with an optional `base:` (another recipe this one extends, merged key by key) and
command-line overrides `key.sub=value` (values parsed as YAML: `train.epochs=5`, `method.cutoffs=[35,70]`).

A bare recipe name resolves to the packaged `fastlt/configs/<name>.yaml`. `load_config` checks the recipe against
the declarations of the code that reads each section (fastlt/methods/recipe.py): it refuses a key no part of fastlt
reads (a misspelt `train.epochz=3` would otherwise be ignored), a value of the wrong type or range and a missing
required key, with a ConfigError that names the key and, where there is one, the closest valid key.

>>> config = load_config("mnist_lt_ce", ["train.epochs=2", "out=runs/x"])
>>> config["train"]["epochs"], config["out"], config["method"]["name"]
(2, 'runs/x', 'ce')
"""

import copy
import glob
import os
from typing import Iterable, Optional

import yaml

from fastlt.errors import ConfigError, MissingFileError
from fastlt.methods.options import UnknownKeyError, closest, declared_fields
from fastlt.methods.recipe import known_keys, named_sections, parse_recipe

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
    close = closest(os.path.basename(stem)[:-5], packaged_recipes())
    hint = f"; did you mean {close}?" if close else ""
    raise MissingFileError(f"config {name_or_path!r} not found (looked in {candidates}){hint}")


def packaged_recipes() -> list:
    """The names of the packaged recipes (fastlt/configs/*.yaml), bases included."""
    return sorted(os.path.basename(path)[:-5] for path in glob.glob(os.path.join(CONFIG_DIR, "*.yaml")))


def merge(base: dict, override: dict, path: str = "") -> dict:
    """Recursive dict merge; the override wins (a None value removes nothing, it sets None). A section whose `name`
    picks its declaration (a method, model, data set, schedule) and whose override names another one keeps only the
    base's keys the new one declares too (crt's sampler settings carry over to lws, not to tau)."""
    merged = copy.deepcopy(base)
    for key, value in override.items():
        dotted = f"{path}.{key}" if path else key
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            if "name" in value and value["name"] != merged[key].get("name"):
                merged[key] = kept_keys(dotted, merged[key], value["name"])
            merged[key] = merge(merged[key], value, dotted)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def kept_keys(dotted: str, section: dict, name) -> dict:
    """The keys of a named section that still apply once it names `name`: those `name`'s declaration has too."""
    sections = named_sections()
    declaration = sections[dotted]().get(name) if dotted in sections and isinstance(name, str) else None
    if declaration is None:
        return {}
    fields = declared_fields(declaration)
    return {key: value for key, value in section.items() if key in fields and key != "name"}


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
    """`key.sub=value` overrides (values parsed as YAML). `method.name=<another>` (any named section's name) keeps
    only the section's keys the other method declares too, as a recipe naming another method than its base does,
    whatever the overrides' order."""
    parsed = []
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
        parsed.append((key.strip(), value))
    config = copy.deepcopy(config)
    for key, value in parsed:
        section = key[:-len(".name")] if key.endswith(".name") else None
        current = _lookup(config, section) if section in named_sections() else None
        if section in named_sections() and not (isinstance(current, dict) and current.get("name") == value):
            set_key(config, section, kept_keys(section, current if isinstance(current, dict) else {}, value))
    for key, value in parsed:
        set_key(config, key, value)
    return config


def check_config(config: dict) -> dict:
    """Refuses what nothing reads or what cannot run: a key no declaration has (suggesting the closest key of any
    section), a value of the wrong type or range, a missing required key. Returns `config`."""
    try:
        parse_recipe(config)
    except UnknownKeyError as error:
        if error.suggestion is not None:
            raise
        section, _, leaf = error.key.rpartition(".")
        keys = list(known_keys(config))
        close = closest(leaf, [key.rpartition(".")[2] for key in keys])
        if close is not None:
            suggestion = next(key for key in keys if key.rpartition(".")[2] == close)
            raise UnknownKeyError(error.key, error.known, suggestion) from None
        raise UnknownKeyError(error.key, error.known, note=_elsewhere(section, leaf)) from None
    return config


def _elsewhere(section: str, leaf: str) -> str:
    """' (method.drw_epoch is an option of ldam_drw, ride)': the closest key of the other methods (models, ...) the
    section could name."""
    if section not in named_sections():
        return ""
    found = {}
    for name, declaration in sorted(named_sections()[section]().items()):
        close = closest(leaf, [field for field in declared_fields(declaration) if field != "name"])
        if close is not None:
            found.setdefault(close, []).append(name)
    return "".join(f" ({section}.{key} is an option of {', '.join(names)})" for key, names in found.items())


def _lookup(config: dict, dotted: str):
    node = config
    for key in dotted.split("."):
        node = node.get(key) if isinstance(node, dict) else None
    return node


def load_config(name_or_path: str, overrides: Iterable[str] = ()) -> dict:
    return check_config(apply_overrides(read_recipe(resolve_path(name_or_path)), overrides))
