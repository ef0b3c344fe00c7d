"""The recipe keys of the training step: train.channels_last (default: where it is faster) and train.compile."""

import pytest
import torch

from fastlt.engine import channels_last_is_faster, read_metrics
from fastlt.methods import load_config, pipeline
from fastlt.methods.config import ConfigError

DIGITS = ["data.name=digits_lt", "data.n_max=150", "data.ratio=10", "data.num_workers=0", "data.loader=torch"]


class Stop(Exception):
    """Raised by the recording fit: the test needs what the trainer was given, not a trained model."""


@pytest.fixture
def fit_arguments(monkeypatch):
    seen = {}

    def recording_fit(model, loss_fn, optimizer, schedule, train_loader, **options):
        seen.update(model=model, batch=next(iter(train_loader))[0], **options)
        raise Stop

    monkeypatch.setattr(pipeline, "fit", recording_fit)
    return seen


def trainer_inputs(seen, tmp_path, *overrides):
    with pytest.raises(Stop):
        pipeline.train(load_config("mnist_lt_ride", [*DIGITS, f"out={tmp_path}", *overrides]), progress_bar=False)
    conv = next(module for module in seen["model"].modules() if isinstance(module, torch.nn.Conv2d) and
                module.in_channels > 1)
    return seen["channels_last"], conv.weight.is_contiguous(memory_format=torch.channels_last), seen["batch"]


def test_channels_last_defaults_to_where_it_is_faster_and_reaches_model_and_loader(fit_arguments, tmp_path):
    default = channels_last_is_faster("cpu")
    assert trainer_inputs(fit_arguments, tmp_path)[:2] == (default, default)
    channels_last, weights_nhwc, batch = trainer_inputs(fit_arguments, tmp_path, "train.channels_last=true")
    assert channels_last and weights_nhwc and batch.is_contiguous(memory_format=torch.channels_last)
    assert trainer_inputs(fit_arguments, tmp_path, "train.channels_last=false")[:2] == (False, False)


def test_compile_wraps_the_trained_model(fit_arguments, tmp_path, monkeypatch):
    compiled = []
    monkeypatch.setattr(torch, "compile", lambda model, **options: compiled.append(model) or model)
    trainer_inputs(fit_arguments, tmp_path)
    assert compiled == []  # off by default: the first steps compile for minutes on a CPU
    trainer_inputs(fit_arguments, tmp_path, "train.compile=true")
    assert compiled == [fit_arguments["model"]]


@pytest.mark.parametrize("key, value", [("train.channels_last", "auto"), ("train.compile", "1")])
def test_step_keys_take_booleans(key, value):
    with pytest.raises(ConfigError, match=f"{key} must be true or false"):
        load_config("mnist_lt_ride", [f"{key}={value}"])


def test_channels_last_trains_the_same_model(tmp_path):
    """One epoch in each layout: the same losses up to the convolutions' summation order."""
    losses = {}
    for layout in ("true", "false"):
        summary = pipeline.train(load_config("mnist_lt_ride", [*DIGITS, "train.epochs=1", f"out={tmp_path / layout}",
                                                               f"train.channels_last={layout}"]),
                                 progress_bar=False, verbose=False)
        losses[layout] = summary["stage1"]["overall"], read_metrics(str(tmp_path / layout / "metrics.jsonl"))[0]
    assert losses["true"][1]["train_loss"] == pytest.approx(losses["false"][1]["train_loss"], rel=1e-4)
    assert losses["true"][1]["val_overall"] == pytest.approx(losses["false"][1]["val_overall"], abs=1.0)
    assert losses["true"][0] == pytest.approx(losses["false"][0], abs=1.0)  # test accuracy, %
