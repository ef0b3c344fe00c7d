"""Recipes: inheritance, overrides, and every packaged recipe resolving to a complete config."""

import glob
import os

import pytest

from fastlt.methods.config import CONFIG_DIR, ConfigError, apply_overrides, check_config, load_config, merge
from fastlt.methods.registry import method_names
from fastlt.models import list_models

RECIPES = sorted(os.path.basename(path)[:-5] for path in glob.glob(os.path.join(CONFIG_DIR, "*.yaml"))
                 if not path.endswith("_base.yaml"))


def test_merge_and_overrides():
    assert merge({"a": {"b": 1, "c": 2}}, {"a": {"c": 3}}) == {"a": {"b": 1, "c": 3}}
    config = apply_overrides({"train": {"epochs": 200}}, ["train.epochs=5", "method.cutoffs=[35, 70]"])
    assert config == {"train": {"epochs": 5}, "method": {"cutoffs": [35, 70]}}
    with pytest.raises(ValueError, match="key=value"):
        apply_overrides({}, ["epochs"])


def test_a_section_naming_another_method_keeps_only_the_keys_that_method_declares():
    """crt's training settings carry over to lws (the same keys), not to tau, whose declaration has none of them: a
    recipe extending a crt base, or an override naming another method, gets no key its method would refuse."""
    crt = {"stage2": {"name": "crt", "epochs": 10, "lr": 0.2, "batch_size": 512}}
    assert merge(crt, {"stage2": {"name": "lws", "epochs": 5}}) == {
        "stage2": {"name": "lws", "epochs": 5, "lr": 0.2, "batch_size": 512}}
    tau = {"stage2": {"name": "tau", "select_on": "val"}}
    assert merge(crt, tau) == tau
    ride = load_config("mnist_lt_ride")
    for overrides in (["method.name=ldam_drw", "method.drw_epoch=3"], ["method.drw_epoch=3", "method.name=ldam_drw"]):
        method = load_config("mnist_lt_ride", overrides)["method"]
        assert method == {"name": "ldam_drw", "max_margin": ride["method"]["max_margin"], "drw_epoch": 3}
    assert load_config("mnist_lt_ride", ["train.schedule.name=cosine"])["train"]["schedule"] == {"name": "cosine"}
    assert load_config("mnist_lt_ce", ["stage2.name=tau"])["stage2"] == {"name": "tau"}


@pytest.mark.parametrize("recipe", RECIPES)
def test_every_recipe_is_complete(recipe):
    config = load_config(recipe)
    assert config["name"] == recipe and config["out"] == f"runs/{recipe}"
    assert config["model"]["name"] in list_models()
    assert config["method"]["name"] in method_names(1)
    assert {"epochs", "batch_size", "lr", "schedule"} <= set(config["train"])
    if config.get("stage2"):
        assert config["stage2"]["name"] in method_names(2)
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
    with pytest.raises(ConfigError, match="data.augment_options.flip must be true or false"):
        build_loader(MNISTLT(split="train"), {"name": "mnist_lt", "augment_options": {"flip": "no"}}, 64, train=True)


def test_unknown_keys_and_bad_values_are_refused_with_a_suggestion():
    with pytest.raises(ConfigError, match="unknown config key 'train.epochz': did you mean train.epochs"):
        load_config("mnist_lt_ce", ["train.epochz=3"])
    with pytest.raises(ConfigError, match="unknown config key 'stage2.taw': did you mean stage2.tau"):
        load_config("mnist_lt_ce", ["stage2.name=tau", "stage2.taw=1.0"])
    with pytest.raises(ConfigError, match="unknown config key 'zzz': known keys: data, device, method, model, "):
        load_config("mnist_lt_ce", ["zzz=1"])
    for override, message in (("train.epochs=abc", "an integer >= 1, got 'abc'"), ("train.epochs=0", "got 0"),
                              ("train.epochs=2.5", "got 2.5"), ("train.lr=-0.1", "train.lr must be a number >= 0"),
                              ("train.nesterov=3", "true or false"), ("data.num_workers=true", "an integer"),
                              ("train.lr=.inf", "train.lr must be a number >= 0, got inf")):
        with pytest.raises(ConfigError, match=message):
            load_config("mnist_lt_ce", [override])
    assert load_config("mnist_lt_ce", ["train.epochs=3", "resume=true"])["train"]["epochs"] == 3
    with pytest.raises(ConfigError, match="the config sets no train.lr: add it to the recipe or pass train.lr="):
        load_config("mnist_lt_ce", ["train.lr=null"])


@pytest.mark.parametrize("overrides, message", [
    (["epochss=3"], "unknown config key 'epochss': did you mean train.epochs?"),  # the closest key of any section
    (["train.n_maxx=3"], "unknown config key 'train.n_maxx': did you mean data.n_max?"),
    (["train.schedule.gamma=abc"], "train.schedule.gamma must be a number, got 'abc'"),
    (["train.schedule.gama=0.1"], "did you mean train.schedule.gamma?"),
    (["train.schedule.name=cosin"], "train.schedule.name: unknown schedule 'cosin'; did you mean cosine?"),
    (["model.name=bogus"], "model.name: unknown model 'bogus'; expected one of "),
    (["model.name=small_cn"], "model.name: unknown model 'small_cn'; did you mean small_cnn?"),
    (["model.widthh=3"], "unknown config key 'model.widthh': known keys: in_channels, name"),
    (["model.in_channel=3"], "did you mean model.in_channels?"),
    (["method.name=ride", "method.max_margin=abc"], "method.max_margin must be a number >= 0, got 'abc'"),
    (["method.name=ride", "method.drw_beta=1"], r"method.drw_beta must be a number in \[0, 1\), got 1"),
    (["method.name=reslt", "method.cutoffs=[35, x]"],
     r"method.cutoffs must be a list of integers >= 0 or null, got \[35, 'x'"),
    (["method.name=rid"], "method.name: unknown method 'rid'; did you mean ride?"),
    (["stage2.name=tau", "stage2.select_on=tst"], "stage2.select_on must be one of train, val, test, got 'tst'"),
    (["data.name=list_file"], "the config sets no data.root"),
])
def test_every_section_is_checked_against_its_declaration(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config("mnist_lt_ce", overrides)


def test_a_misspelt_recipe_name_gets_a_suggestion():
    with pytest.raises(FileNotFoundError, match="did you mean mnist_lt_ride?"):
        load_config("mnist_lt_rid")
    with pytest.raises(FileNotFoundError, match="not found") as error:
        load_config("no_such_recipe")
    assert "did you mean" not in str(error.value)


def test_a_recipe_that_is_not_yaml_names_the_file(tmp_path):
    from fastlt.methods.config import ConfigError

    recipe = tmp_path / "mine.yaml"
    recipe.write_text("base: mnist_lt_ce\ntrain: {epochs: 3\n")
    with pytest.raises(ConfigError, match=f"config {recipe} is not valid YAML"):
        load_config(str(recipe))
    recipe.write_text("- a list\n")
    with pytest.raises(ConfigError, match="must be a mapping"):
        load_config(str(recipe))


def test_check_config_returns_the_config_unchanged():
    config = load_config("mnist_lt_ride")
    assert check_config(config) is config and "drw_beta" not in config["method"]  # defaults are not written in
