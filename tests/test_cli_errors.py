"""What the `fastlt` command does with a user error (one line on stderr, exit code 2, the setting named) and with a
bug (its traceback), and that `fastlt --help` answers without importing torch."""

import json
import math
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import torch
from test_cli import DIGITS, one_line_error

import fastlt.engine.trainer
from fastlt.cli import main

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HEAVY_MODULES = ("torch", "numpy", "numba", "triton", "yaml", "tqdm", "matplotlib")


@pytest.mark.parametrize("argv", [["--help"], ["train", "--help"], ["eval", "--help"], ["bench", "--help"],
                                  ["data", "--help"]])
def test_help_imports_no_torch(argv):
    code = (f"import sys\nfrom fastlt import cli\ntry:\n    cli.main({argv!r})\nexcept SystemExit as exited:\n"
            f"    assert exited.code == 0, exited.code\n"
            f"print(sorted(m for m in sys.modules if m.split('.')[0] in {HEAVY_MODULES!r}))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert result.returncode == 0, result.stderr
    *usage, imported = result.stdout.strip().splitlines()
    assert imported == "[]"
    assert any(line.startswith("usage: fastlt") for line in usage)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a CUDA GPU")
def test_cuda_without_a_gpu_is_a_one_line_error(capsys):
    error = one_line_error(capsys, ["train", "--config", "mnist_lt_ce", *DIGITS, "device=cuda", "--no-progress"])
    assert "device=cuda but torch.cuda.is_available() is False" in error and "set device=auto or device=cpu" in error


@pytest.mark.parametrize("overrides, expected", [
    (["device=gpu"], "device='gpu' is not a device fastlt runs on: set device=auto, cpu or cuda"),
    (["train.sampler={name: class_balanced, num_samples: -1}"],
     "train.sampler.num_samples must be an integer >= 1 or null, got -1"),
    (["train.sampler={name: class_balanced, num_samples: 0}"],  # an epoch of 0 steps
     "train.sampler.num_samples must be an integer >= 1 or null, got 0"),
    (["train.sampler={name: class_balanced, num_samples: 2.7}"],  # not truncated to 2
     "train.sampler.num_samples must be an integer >= 1 or null, got 2.7"),
    (["train.sampler={name: q_power, q: abc}"], "train.sampler.q must be a number or null, got 'abc'"),
    (["train.sampler={name: q_power}"], "train.sampler: strategy 'q_power' needs q"),  # the sampler's own check
    (["train.sampler={name: class_aware, samples_per_class: 0.5}"],
     "train.sampler.samples_per_class must be an integer >= 1 or null, got 0.5"),
    (["train.mixup={mixup_alpha: 0}"], "train.mixup: mixup_alpha or cutmix_alpha must be > 0"),
    (["train.drop_last=true", "train.batch_size=100000"],  # every batch dropped: 0 steps
     "train.drop_last=true with train.batch_size=100000 trains 0 steps: an epoch has 609 samples"),
])
def test_bad_run_settings_are_one_line_errors(capsys, tmp_path, overrides, expected):
    error = one_line_error(capsys, ["train", "--config", "mnist_lt_ce", *DIGITS, *overrides, f"out={tmp_path}",
                                    "--no-progress"])
    assert expected in error and error.startswith("fastlt train: error:"), error


def write_list_file_data(root, broken=None):
    """Three classes of 16x16 JPEGs under `root`, train.txt and test.txt; `broken` ("missing" or "truncated") spoils
    the second training image. Returns the overrides of a list_file run on them."""
    from PIL import Image

    rng = np.random.default_rng(0)
    lines = {"train": [], "test": []}
    for cls, count in enumerate((8, 4, 2)):
        for index in range(count + 2):
            name = f"c{cls}_{index}.jpg"
            Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(os.path.join(root, name))
            lines["train" if index < count else "test"].append(f"{name} {cls}")
    spoilt = os.path.join(root, "c0_1.jpg")
    if broken == "missing":
        os.remove(spoilt)
    elif broken == "truncated":
        with open(spoilt, "r+b") as handle:
            handle.truncate(200)
    for split, split_lines in lines.items():
        with open(os.path.join(root, f"{split}.txt"), "w") as handle:
            handle.write("\n".join(split_lines) + "\n")
    return ["data.name=list_file", f"data.root={root}", f"data.train_list={root}/train.txt",
            f"data.test_list={root}/test.txt", "data.loader=torch", "data.num_workers=0",
            "data.augment_options={flip: false, image_size: 16, resize_size: 16}", "model.in_channels=3",
            "train.epochs=1", "train.batch_size=4", "train.schedule.milestones=[1]", "train.schedule.warmup_epochs=0"]


@pytest.mark.parametrize("broken, workers", [("missing", 0), ("truncated", 0), ("truncated", 2)])
def test_unreadable_list_file_image_is_a_one_line_error(capsys, tmp_path, broken, workers):
    data = write_list_file_data(str(tmp_path), broken)
    error = one_line_error(capsys, ["train", "--config", "mnist_lt_ce", *data, f"data.num_workers={workers}",
                                    f"out={tmp_path / 'run'}", "--no-progress"])
    assert f"cannot read image {tmp_path / 'c0_1.jpg'}" in error and "data.skip_corrupt=true" in error
    assert "DataLoader worker" not in error


def test_skip_corrupt_is_a_data_option(tmp_path):
    data = write_list_file_data(str(tmp_path), "truncated")
    with pytest.warns(RuntimeWarning, match="skipping unreadable image .*c0_1.jpg"):
        main(["train", "--config", "mnist_lt_ce", *data, "data.skip_corrupt=true", f"out={tmp_path / 'run'}",
              "--no-progress"])
    with open(tmp_path / "run" / "results.json") as handle:
        assert 0 <= json.load(handle)["overall"] <= 100


def strict_json(text):
    """json.loads refusing NaN and Infinity, which Python writes and reads but JSON does not have."""
    return json.loads(text, parse_constant=lambda constant: pytest.fail(f"{constant} in a JSON file"))


def test_an_empty_shot_group_is_null_in_the_results_files(tmp_path):
    run = tmp_path / "run"  # n_max 90: no class has more than 100 training images, so "many" has no class
    main(["train", "--config", "mnist_lt_ce", *DIGITS, "data.n_max=90", "train.epochs=1", f"out={run}",
          "--no-progress"])
    results = strict_json((run / "results.json").read_text())
    assert results["many"] is None and 0 <= results["few"] <= 100
    records = [strict_json(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert records[0]["val_many"] is None and not math.isnan(records[0]["val_overall"])


def test_stage2_without_a_run_folder_is_a_one_line_error(capsys):
    assert "give the stage-1 run folder" in one_line_error(capsys, ["stage2", "tau"])


@pytest.mark.parametrize("bug", [ZeroDivisionError("division by zero"), ValueError("__len__() should return >= 0")])
def test_a_bug_keeps_its_traceback(monkeypatch, tmp_path, bug):
    def broken(*args, **kwargs):
        raise bug

    monkeypatch.setattr(fastlt.engine.trainer, "train_one_epoch", broken)
    with pytest.raises(type(bug), match=re.escape(str(bug))):  # not turned into SystemExit(2) and a one-line message
        main(["train", "--config", "mnist_lt_ce", *DIGITS, f"out={tmp_path}", "--no-progress"])


def test_exit_codes_of_the_installed_command(tmp_path):
    """A user error: exit 2 and one line on stderr; a bug: exit 1 and the traceback."""
    command = [sys.executable, "-m", "fastlt.cli", "train", "--config", "mnist_lt_ce", *DIGITS, "device=gpu",
               f"out={tmp_path}"]
    result = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert result.returncode == 2 and result.stderr.count("\n") == 1, result.stderr
    assert result.stderr.startswith("fastlt train: error: device='gpu'")
    bug = ("import fastlt.engine.trainer as trainer\n"
           "def broken(*args, **kwargs):\n    raise ZeroDivisionError('injected')\n"
           "trainer.train_one_epoch = broken\n"
           f"from fastlt.cli import main\nmain({command[3:-2] + [f'out={tmp_path}', '--no-progress']!r})\n")
    result = subprocess.run([sys.executable, "-c", bug], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert result.returncode == 1
    assert "Traceback (most recent call last)" in result.stderr and "ZeroDivisionError: injected" in result.stderr


@pytest.mark.parametrize("value, said", [("0", "at least 2"), ("1", "at least 2"), ("-3", "at least 2"),
                                         ("abc", "whole number")])
def test_bench_world_size_below_two_is_refused_at_parse(capsys, value, said):
    """--world-size 0 used to run the one-process benchmark silently (0 is falsy)."""
    with pytest.raises(SystemExit) as exited:
        main(["bench", "fused-head", "--world-size", value])
    assert exited.value.code == 2
    last_line = capsys.readouterr().err.strip().splitlines()[-1]
    assert "--world-size" in last_line and said in last_line, last_line
