"""The method registry: every packaged method declares its options completely and builds from its defaults alone; a
new method is one file (here, one test) plus its registration, and the recipe checks, `fastlt methods` and
`fastlt train --help` pick it up with no other edit."""

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from fastlt.cli import main
from fastlt.methods import build_method, load_config, registry
from fastlt.methods.options import REQUIRED, ConfigError, Named, declared, declared_fields, option
from fastlt.methods.stage1 import Method
from fastlt.models import create_model

COUNTS = torch.tensor([500.0, 200, 90, 40, 15, 5])
MODEL_OF = {"ce": "small_cnn", "ldam_drw": "small_cnn", "balanced_softmax": "small_cnn", "reslt": "reslt_small_cnn"}


@pytest.mark.parametrize("stage", [1, 2])
def test_every_option_of_every_method_has_a_type_a_default_and_a_meaning(stage):
    assert len(registry.method_names(stage)) >= 7
    for name in registry.method_names(stage):
        method = registry.get_method(name, stage)
        assert method.summary, f"{name}: its builder's docstring says what it is"
        for key, field in declared_fields(method.options).items():
            if key == "name":
                continue
            assert field.default is not REQUIRED, f"{name}.{key}: a method option has a default"
            assert field.metadata["doc"] and "\n" not in field.metadata["doc"], f"{name}.{key}: one line of meaning"


@pytest.mark.parametrize("name", registry.method_names(1))
def test_every_stage1_method_builds_from_its_defaults_alone(name):
    """Each builder reads only declared options (a typo in an attribute fails here, not in a user's run)."""
    model = create_model(MODEL_OF.get(name, "ride_small_cnn"), num_classes=len(COUNTS))
    method = build_method({"name": name}, COUNTS, model)
    output = model(torch.randn(4, 1, 28, 28))
    loss = method.loss_fn(output, torch.arange(4))
    assert loss.dim() == 0 and torch.isfinite(loss)


@declared
class ToyOptions(Named):
    """A toy method's one option."""

    smoothing: float = option(0.1, "label smoothing of the toy cross-entropy", low=0, high=1, high_open=True)


def toy(options: ToyOptions, counts, model) -> Method:
    """Toy: cross-entropy with label smoothing."""
    return Method("toy", lambda output, targets: F.cross_entropy(output.logits, targets,
                                                                 label_smoothing=options.smoothing))


@pytest.fixture
def toy_method():
    registry.register_method("toy", ToyOptions)(toy)  # what a method's own file does at import, as a decorator
    yield
    registry.unregister_method("toy", stage=1)


def test_a_new_method_is_its_file_plus_its_registration(toy_method, capsys):
    config = load_config("mnist_lt_ce", ["method.name=toy", "method.smoothing=0.2"])
    assert config["method"] == {"name": "toy", "smoothing": 0.2}
    with pytest.raises(ConfigError, match="unknown config key 'method.smoothin': did you mean method.smoothing?"):
        load_config("mnist_lt_ce", ["method.name=toy", "method.smoothin=0.2"])
    with pytest.raises(ConfigError, match=r"method.smoothing must be a number in \[0, 1\), got 1"):
        load_config("mnist_lt_ce", ["method.name=toy", "method.smoothing=1"])
    model = create_model("small_cnn", num_classes=len(COUNTS))
    method = build_method(config["method"], COUNTS, model)
    output, targets = model(torch.randn(4, 1, 28, 28)), torch.arange(4)
    assert torch.allclose(method.loss_fn(output, targets), F.cross_entropy(output.logits, targets, label_smoothing=0.2))
    capsys.readouterr()
    main(["methods"])
    assert "  toy               Toy: cross-entropy with label smoothing." in capsys.readouterr().out
    main(["methods", "toy"])
    text = capsys.readouterr().out
    assert "toy: stage-1 method (method: {name: toy, ...}), tests/methods/test_method_registry.py" in text
    assert "  method.smoothing  (a number in [0, 1); default 0.1)\n      label smoothing of the toy" in text
    with pytest.raises(SystemExit) as exited:
        main(["train", "--config", "mnist_lt_ce", "method.name=toy", "--help"])
    assert exited.value.code == 0
    text = capsys.readouterr().out
    assert text.startswith("usage: fastlt train")
    assert "  method.smoothing = 0.1  (a number in [0, 1); default 0.1)" in text


def test_a_name_is_registered_once_per_stage_and_a_stage2_method_says_how_to_reload():
    with pytest.raises(ValueError, match="a stage-1 method named 'ride' is already registered"):
        registry.register_method("ride", ToyOptions)(toy)
    with pytest.raises(TypeError, match="needs_model and reload"):
        registry.register_method("toy2", ToyOptions, stage=2)
    with pytest.raises(TypeError, match="@declared subclass of options.Named"):
        registry.register_method("toy2", dataclasses.make_dataclass("Plain", []))


def test_fastlt_methods_lists_both_stages_and_suggests_a_close_name(capsys):
    main(["methods", "sade"])
    text = capsys.readouterr().out
    assert "sade: stage-1 method" in text and "sade: stage-2 method" in text and "stage2.adapt_on" in text
    with pytest.raises(SystemExit) as exited:
        main(["methods", "rid"])
    assert exited.value.code == 2 and "unknown method 'rid'; did you mean ride?" in capsys.readouterr().err


def test_train_help_with_a_recipe_lists_its_every_key(capsys):
    with pytest.raises(SystemExit) as exited:
        main(["train", "--config", "mnist_lt_ride", "--help"])
    assert exited.value.code == 0
    text = capsys.readouterr().out
    assert "  method.drw_epoch = 24  (an integer >= 0; default 160)\n      0-based epoch from which DRW is on" in text
    assert "  train.schedule.milestones = [24, 27]  (a list of integers; default required)" in text
    assert "  data.n_max = 500  (an integer >= 1; default 500)" in text and "  model.num_experts = 3  " in text
    with pytest.raises(SystemExit) as exited:
        main(["train", "--config", "mnist_lt_rid", "--help"])
    error = capsys.readouterr().err
    assert exited.value.code == 2 and error.count("\n") == 1 and "did you mean mnist_lt_ride?" in error
