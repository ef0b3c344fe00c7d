"""Every packaged recipe loads and builds: its data spec (checked without reading any file), its model (on the meta
device: no memory, no init cost), its method and samplers; and it states the paper's number (or why there is none),
where it comes from, and how the official code and fastlt select the model."""

import glob
import json
import os

import pytest
import torch

from fastlt.data import exponential_counts
from fastlt.methods.builders import build_model, build_sampler, check_data_spec
from fastlt.methods.config import CONFIG_DIR, load_config, read_recipe, resolve_path
from fastlt.methods.options import ConfigError
from fastlt.methods.recipe import parse_recipe
from fastlt.methods.stage1 import build_method, rebuild_options

ALL = sorted(os.path.basename(path)[:-5] for path in glob.glob(os.path.join(CONFIG_DIR, "*.yaml")))
RAW = {name: read_recipe(resolve_path(name)) for name in ALL}  # with their bases merged in
RECIPES = [name for name in ALL if "name" in RAW[name]]  # bases have no name (and no out: load_config refuses them)
CONFIGS = {**RAW, **{name: load_config(name) for name in RECIPES}}
LIST_FILE_CLASSES = {"ImageNet_LT": 1000, "iNaturalist18": 8142, "Places_LT": 365}


def class_counts(data):
    """Synthetic training counts of the recipe's dataset (the real ones need the data files); `data` parsed."""
    if data.name in ("mnist_lt", "fashion_mnist_lt", "digits_lt"):
        counts = exponential_counts(data.n_max, data.ratio, 10)
    elif data.name in ("cifar10_lt", "cifar100_lt"):
        num_classes = 10 if data.name == "cifar10_lt" else 100
        counts = exponential_counts(50_000 // num_classes, data.ratio, num_classes)
    else:
        num_classes = next(value for key, value in LIST_FILE_CLASSES.items() if key in data.train_list)
        counts = exponential_counts(1280, 256, num_classes)
    # ResLT's remap sorts labels by ascending frequency: the tail comes first
    return list(reversed(counts)) if getattr(data, "relabel", False) else list(counts)


_MODELS = {}


def meta_model(config, num_classes):
    key = json.dumps([config["model"], num_classes], sort_keys=True)
    if key not in _MODELS:
        with torch.device("meta"):
            _MODELS[key] = build_model(config["model"], num_classes)
    return _MODELS[key]


def test_there_are_recipes_and_bases():
    assert len(RECIPES) > 100 and len(ALL) > len(RECIPES)


@pytest.mark.parametrize("name", RECIPES)
def test_recipe_builds_model_data_method_and_samplers(name):
    config = CONFIGS[name]
    assert config["name"] == name and config["out"] == f"runs/{name}"
    recipe = parse_recipe(config)
    counts = class_counts(check_data_spec(config["data"]))
    model = meta_model(config, len(counts))
    assert any(True for _ in model.parameters())
    method = build_method(rebuild_options(recipe.method), counts, model)
    assert callable(method.loss_fn)
    assert len(build_sampler(counts, recipe.train.sampler, 0, recipe.train.epochs)) == sum(counts)
    stage2 = recipe.stage2
    if stage2:
        assert getattr(stage2, "select_on", None) != "test", "packaged recipes never select on the test set"
        if hasattr(stage2, "sampler"):
            build_sampler(counts, stage2.sampler, 0, stage2.epochs, getattr(stage2, "samples_per_class", None))


@pytest.mark.parametrize("name", RECIPES)
def test_recipe_states_its_paper_number_source_and_selection(name):
    paper = CONFIGS[name].get("paper")
    assert isinstance(paper, dict), "every recipe states the paper's number (or why there is none)"
    assert paper["top1"] is None or 0 < paper["top1"] <= 100
    where = paper.get("source") if paper["top1"] is not None else (paper.get("note") or paper.get("source"))
    assert isinstance(where, str) and where, "a number needs its source (paper table, README, model zoo row)"
    assert isinstance(paper.get("selection"), str) and paper["selection"], "how the official code and fastlt select"
    if "TEST" in paper["selection"] or "test set" in paper["selection"]:
        assert "fastlt does not" in paper["selection"]


def test_teacher_recipes_exist_for_every_distillation_recipe():
    by_out = {CONFIGS[name]["out"]: CONFIGS[name] for name in RECIPES}
    students = [name for name in RECIPES if CONFIGS[name]["method"].get("teacher")]
    assert {"imagenet_lt_x50_ride3_distill", "imagenet_lt_x50_ride4_distill", "inat18_r50_ride3_distill",
            "inat18_r50_ride4_distill", "cifar100_lt_r100_ride3_distill"} <= set(students)
    for name in students:
        teacher = by_out[CONFIGS[name]["method"]["teacher"]]
        assert teacher["model"]["num_experts"] == 6 and teacher.get("stage2") is None
        assert teacher["model"]["name"] == CONFIGS[name]["model"]["name"]


def test_ride_recipes_without_distillation_quote_a_number_without_distillation():
    """The paper's RIDE numbers use distillation; a recipe that runs without it quotes the model zoo's
    no-distillation row (or none) and keeps the distilled number apart."""
    for name in RECIPES:
        config = CONFIGS[name]
        if config["method"]["name"] != "ride" or config["method"].get("teacher"):
            continue
        source = config["paper"].get("source") or ""
        assert "Distill" not in source and "with distillation" not in source, name
    assert CONFIGS["cifar100_lt_r100_ride3"]["paper"]["top1"] == 48.6
    assert CONFIGS["imagenet_lt_x50_ride3"]["paper"]["top1"] == 55.7


def test_cifar_augmentation_follows_each_official_loader():
    """RIDE's CIFAR loader always applies RandomRotation(15) (its LDAM-DRW, RIDE and Decouple runs); ResLT's has
    none."""
    for name in RECIPES:
        config = CONFIGS[name]
        if not config["data"]["name"].startswith("cifar"):
            continue
        rotation = config["data"].get("augment_options", {}).get("rotation", 0)
        method = config["method"]["name"]
        if method in ("ldam_drw", "ride") or config.get("stage2"):
            assert rotation == 15, name
        if method == "reslt":
            assert rotation == 0, name


def test_epoch_length_follows_the_official_loaders():
    """Decoupling runs floor(N / B) steps per epoch and ResLT's ImageNet-LT / iNat loaders drop the last batch; RIDE's
    loaders keep it."""
    for name in RECIPES:
        config = CONFIGS[name]
        if config["data"]["name"] != "list_file" or config["method"]["name"] not in ("ce", "reslt", "ride"):
            continue
        official_drops = config["method"]["name"] != "ride"
        assert config["train"].get("drop_last", False) is official_drops, name


def test_decoupling_sampler_ablations():
    expected = {"imagenet_lt_x50_ce_class_balanced": ("class_aware", 45.1),
                "imagenet_lt_x50_ce_square_root": ("square_root", 46.8),
                "imagenet_lt_x50_ce_progressive": ("progressive", 47.2)}
    for name, (strategy, top1) in expected.items():
        config = CONFIGS[name]
        sampler = config["train"]["sampler"]
        assert (sampler if isinstance(sampler, str) else sampler["name"]) == strategy
        assert config["paper"]["top1"] == top1
    sqrt = build_sampler([400, 100, 25], CONFIGS["imagenet_lt_x50_ce_square_root"]["train"]["sampler"], 0, 90)
    assert sqrt.options["replacement"] is True


@pytest.mark.parametrize("data, message", [
    ({"name": "imagenet"}, "data.name: unknown dataset 'imagenet'"),
    ({"name": "cifar100_lt", "ratio": 100}, "the config sets no data.root"),
    ({"name": "list_file", "root": "d", "train_list": "t", "val_list": "v.txt", "test_list": "v.txt"}, "test set"),
    ({"name": "mnist_lt", "augment_options": {"rotate": 15}}, "did you mean data.augment_options.rotation"),
    ({"name": "mnist_lt", "augment_options": {"rotation": -5}}, "data.augment_options.rotation must be a number >= 0"),
    ({"name": "mnist_lt", "augment_options": {"flip": "no"}}, "data.augment_options.flip must be true or false"),
    ({"name": "cifar10_lt", "root": "d", "ratio": 100, "n_max": 5}, "unknown config key 'data.n_max'"),
])
def test_bad_data_specs_are_clear_errors(data, message):
    with pytest.raises(ConfigError, match=message):
        check_data_spec(data)


def test_bad_sampler_specs_are_clear_errors():
    with pytest.raises(ConfigError, match="'train.sampler.with_replacement': did you mean train.sampler.replacement"):
        build_sampler([5, 3], {"name": "square_root", "with_replacement": True}, 0, 10)
    with pytest.raises(ConfigError, match="train.sampler.name must be one of sequential, "):
        build_sampler([5, 3], {"name": "sqrt"}, 0, 10)
    with pytest.raises(ConfigError, match="stage2.sampler.q must be a number"):
        build_sampler([5, 3], {"name": "q_power", "q": "half"}, 0, 10, key="stage2.sampler")
