"""Recipes: inheritance, overrides, and every packaged recipe resolving to a complete config."""

import glob
import os

import pytest

from fastlt.methods.config import CONFIG_DIR, apply_overrides, load_config, merge
from fastlt.methods.stage1 import METHODS
from fastlt.methods.stage2 import STAGE2_METHODS
from fastlt.models import list_models

RECIPES = sorted(os.path.basename(path)[:-5] for path in glob.glob(os.path.join(CONFIG_DIR, "*.yaml"))
                 if not path.endswith("_base.yaml"))


def test_merge_and_overrides():
    assert merge({"a": {"b": 1, "c": 2}}, {"a": {"c": 3}}) == {"a": {"b": 1, "c": 3}}
    config = apply_overrides({"train": {"epochs": 200}}, ["train.epochs=5", "method.cutoffs=[35, 70]"])
    assert config == {"train": {"epochs": 5}, "method": {"cutoffs": [35, 70]}}
    with pytest.raises(ValueError, match="key=value"):
        apply_overrides({}, ["epochs"])


@pytest.mark.parametrize("recipe", RECIPES)
def test_every_recipe_is_complete(recipe):
    config = load_config(recipe)
    assert config["name"] == recipe and config["out"] == f"runs/{recipe}"
    assert config["model"]["name"] in list_models()
    assert config["method"]["name"] in METHODS
    assert {"epochs", "batch_size", "lr", "schedule"} <= set(config["train"])
    if config.get("stage2"):
        assert config["stage2"]["name"] in STAGE2_METHODS
    if not recipe.startswith("mnist_lt"):
        assert "top1" in config["paper"]  # every paper row states the paper's number (or why there is none)


def test_the_paper_tables_are_covered():
    for dataset in ("cifar100_lt_r100", "cifar100_lt_r50", "cifar100_lt_r10", "cifar10_lt_r100"):
        for row in ("ce", "ldam_drw", "ride2", "ride3", "ride4", "reslt", "crt", "tau", "lws", "ncm"):
            assert f"{dataset}_{row}" in RECIPES
    for method in ("ce", "ldam_drw", "balanced_softmax", "ride", "ride_router", "reslt", "crt", "lws", "tau", "ncm"):
        assert f"mnist_lt_{method}" in RECIPES
    assert load_config("cifar100_lt_r100_ride3")["paper"]["top1"] == 48.6  # MODEL_ZOO: no distillation, with EA
    assert load_config("imagenet_lt_x50_lws")["paper"]["top1"] == 49.9
    places_reslt = load_config("places_lt_r152_reslt")
    assert places_reslt["paper"]["top1"] == 39.8 and places_reslt["model"]["name"] == "reslt_resnet152"
    assert "cutoffs" not in places_reslt["method"]  # none published: groups from the many/medium/few thresholds


def test_digit_recipes_crop_without_flip_and_the_others_keep_the_flip():
    from fastlt.data import MNISTLT
    from fastlt.methods.builders import build_loader

    for recipe in RECIPES:
        data = load_config(recipe)["data"]
        flip = data.get("augment_options", {}).get("flip", True)
        assert data.get("augment", True) and flip is (not recipe.startswith("mnist_lt")), recipe
    loader = build_loader(MNISTLT(split="train"), load_config("mnist_lt_ce")["data"], 64, train=True)
    augment = loader.loader.collate_fn.augment
    assert augment.train and augment.pad == 4 and augment.flip is False
    with pytest.raises(ValueError, match="flip"):
        build_loader(MNISTLT(split="train"), {"loader": "torch", "augment_options": {"flip": "no"}}, 64, train=True)


def test_unknown_keys_and_bad_values_are_refused_with_a_suggestion():
    from fastlt.methods.config import ConfigError, check_config

    with pytest.raises(ConfigError, match="unknown config key 'train.epochz': did you mean train.epochs"):
        load_config("mnist_lt_ce", ["train.epochz=3"])
    with pytest.raises(ConfigError, match="unknown config key 'stage2.taw': did you mean stage2.tau"):
        check_config({"stage2": {"name": "tau", "taw": 1.0}})
    with pytest.raises(ConfigError, match="unknown config key 'zzz': known keys: "):
        check_config({"zzz": 1})
    for override, message in (("train.epochs=abc", "an integer >= 1, got 'abc'"), ("train.epochs=0", "got 0"),
                              ("train.epochs=2.5", "got 2.5"), ("train.lr=-0.1", "train.lr must be a number >= 0"),
                              ("train.nesterov=3", "true or false"), ("data.num_workers=true", "an integer")):
        with pytest.raises(ConfigError, match=message):
            load_config("mnist_lt_ce", [override])
    assert load_config("mnist_lt_ce", ["train.epochs=3", "resume=true"])["train"]["epochs"] == 3
    with pytest.raises(ConfigError, match="the config sets no train.lr: add it to the recipe or pass train.lr="):
        load_config("mnist_lt_ce", ["train.lr=null"])


def test_a_recipe_that_is_not_yaml_names_the_file(tmp_path):
    from fastlt.methods.config import ConfigError

    recipe = tmp_path / "mine.yaml"
    recipe.write_text("base: mnist_lt_ce\ntrain: {epochs: 3\n")
    with pytest.raises(ConfigError, match=f"config {recipe} is not valid YAML"):
        load_config(str(recipe))
    recipe.write_text("- a list\n")
    with pytest.raises(ConfigError, match="must be a mapping"):
        load_config(str(recipe))


def test_every_option_the_methods_read_is_a_known_key():
    """A new option read in stage1.py (method section) or stage2.py (stage2 section) must be added to
    config.KNOWN_KEYS, or check_config would refuse it as a misspelling."""
    import re

    from fastlt.methods import stage1, stage2
    from fastlt.methods.config import KNOWN_KEYS

    for module, variable, section in ((stage1, "config", "method"), (stage2, "options", "stage2")):
        with open(module.__file__) as handle:
            read = set(re.findall(rf'\b{variable}(?:\.get\(|\[)"([a-z_]+)"', handle.read()))
        assert read and read <= KNOWN_KEYS[section], sorted(read - KNOWN_KEYS[section])
