"""`fastlt bench step`'s format rows (layout x precision x torch.compile per model) and their plot, on the small
28x28 models so that the check takes seconds."""

import pytest
import torch

from fastlt.bench import step


pytestmark = pytest.mark.usefixtures("one_intra_op_thread")


class Bar:
    def __init__(self):
        self.updates = 0

    def update(self):
        self.updates += 1


def test_format_rows_time_every_format_against_nchw_fp32_and_plot(monkeypatch, tmp_path):
    models = ["small_cnn", "ride_small_cnn"]
    monkeypatch.setattr(step, "MODELS", [("small_cnn", {}, (1, 28, 28), 10, "ce", {}),
                                         ("ride_small_cnn", {"num_experts": 2}, (1, 28, 28), 10, "ride", {})])
    bar = Bar()
    rows = step.format_rows(quick=True, batch=16, steps=2, warmup=1, bar=bar)
    uncompiled = [name for name, (_, _, compiled) in step.FORMATS.items() if not compiled]
    assert [(row["model"], row["format"]) for row in rows] == [(model, name) for model in models for name in uncompiled]
    assert bar.updates == len(rows) and [row["loss"] for row in rows] == ["ce"] * 3 + ["ride"] * 3
    for row in rows:
        assert row["step_ms"] == pytest.approx(row["data_ms"] + row["compute_ms"] + row["loss_ms"])
        assert row["speedup"] > 0 and row["first_step_s"] > 0 and row["threads"] == 1 and row["batch"] == 16
    assert [row["speedup"] for row in rows if row["format"] == step.BASELINE] == [1.0, 1.0]
    path = tmp_path / "plots" / "step.png"
    step.plot_formats(rows, str(path))
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_quick_leaves_out_the_compiled_rows_only():
    quick, full = step.format_cases(quick=True), step.format_cases(quick=False)
    assert set(quick) == set(full) == {model for model, *_ in step.MODELS}
    compiled = {name for name, (_, _, on) in step.FORMATS.items() if on}
    assert compiled and all({case[-1] for case in full[model]} - {case[-1] for case in quick[model]} == compiled
                            for model in full)


def test_the_format_rows_cover_the_cifar_and_fashion_mnist_models():
    """ResNet-32 and RIDE ResNet-32 on 32x32 RGB, the Fashion-MNIST-LT RIDE ResNet-8 on 28x28 grey images: each
    model builds and takes its images."""
    assert [model for model, *_ in step.MODELS] == ["resnet32", "ride_resnet32", "ride_resnet8"]
    for name, options, shape, classes, _, _ in step.MODELS:
        output = step.create_model(name, num_classes=classes, **options).eval()(torch.zeros(2, *shape))
        assert output.logits.shape == (2, classes)
