"""Resuming from a checkpoint continues training bit for bit on CPU, and a crash mid-save keeps the old file."""

import os
import random

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fastlt.engine import build_schedule, build_sgd, grad_scaler, load_checkpoint, save_checkpoint, train_one_epoch
from fastlt.models import create_model
from toy_data import Digits, ResumableShuffle

BATCH = 8  # 6 steps per epoch


def make_run(seed):
    torch.manual_seed(seed)
    model = create_model("small_cnn", num_classes=10)
    optimizer = build_sgd(model, lr=0.05, weight_decay=5e-4, nesterov=True)
    sampler = ResumableShuffle(48, seed=3)
    loader = torch.utils.data.DataLoader(Digits(), batch_size=BATCH, sampler=sampler)
    schedule = build_schedule("ride_custom", 4, warmup_epochs=2, milestones=(3,), gamma=0.1)
    return model, optimizer, sampler, loader, schedule


def train(model, optimizer, sampler, loader, schedule, epochs, stop_after=None, on_step=None):
    """Epochs from sampler.epoch; `stop_after` steps into the last epoch simulates the interruption."""
    for epoch in epochs:
        if sampler.position == 0:  # a resumed sampler already knows its epoch and position
            sampler.set_epoch(epoch)
        schedule.apply(optimizer, epoch)
        train_one_epoch(model, loader, lambda output, y: F.cross_entropy(output.logits, y), optimizer,
                        device=torch.device("cpu"), max_steps=stop_after, on_step=on_step)


def full_state(model, optimizer):
    tensors = dict(model.state_dict())
    for index, state in optimizer.state_dict()["state"].items():
        tensors[f"optimizer.{index}"] = state["momentum_buffer"]
    return tensors


def test_resume_after_interruption_is_bit_identical(tmp_path):
    path = str(tmp_path / "last.pt")
    random.seed(0), np.random.seed(0)
    model, optimizer, sampler, loader, schedule = make_run(seed=0)
    scaler = grad_scaler("cpu", "fp32")
    train(model, optimizer, sampler, loader, schedule, epochs=[0])
    # interrupted 2 steps into epoch 1: checkpoint exactly there, as a trainer's on_step hook would
    sampler.set_epoch(1)
    train(model, optimizer, sampler, loader, schedule, epochs=[1], stop_after=2)
    save_checkpoint(path, model=model, optimizer=optimizer, scaler=scaler, schedule=schedule, sampler=sampler,
                    sampler_consumed=2 * BATCH, epoch=1, step=8)
    # the uninterrupted run goes on: rest of epoch 1 (fresh iterator restarts the sampler, so resume it by hand)
    sampler.position = 2 * BATCH
    train(model, optimizer, sampler, loader, schedule, epochs=[1])
    train(model, optimizer, sampler, loader, schedule, epochs=[2, 3])
    expected = full_state(model, optimizer)

    random.seed(123), np.random.seed(123)  # a new process: different RNG states and initial weights
    model, optimizer, sampler, loader, schedule = make_run(seed=99)
    state = load_checkpoint(path, model=model, optimizer=optimizer, scaler=grad_scaler("cpu", "fp32"),
                            sampler=sampler)
    assert (state["epoch"], state["step"], sampler.position) == (1, 8, 2 * BATCH)
    train(model, optimizer, sampler, loader, schedule, epochs=[1])
    train(model, optimizer, sampler, loader, schedule, epochs=[2, 3])
    resumed = full_state(model, optimizer)
    assert expected.keys() == resumed.keys()
    for name in expected:
        assert torch.equal(expected[name], resumed[name]), name


def test_rng_states_round_trip(tmp_path):
    model = torch.nn.Linear(2, 2)
    save_checkpoint(str(tmp_path / "c.pt"), model=model, epoch=0, step=0)
    drawn = (random.random(), float(np.random.rand()), float(torch.rand(())))
    load_checkpoint(str(tmp_path / "c.pt"), model=model)
    assert (random.random(), float(np.random.rand()), float(torch.rand(()))) == drawn


def test_crash_while_saving_keeps_previous_checkpoint(tmp_path, monkeypatch):
    path = str(tmp_path / "last.pt")
    model = torch.nn.Linear(3, 2)
    save_checkpoint(path, model=model, epoch=1, step=10)

    def crash(obj, handle, *args, **kwargs):
        handle.write(b"partial")
        raise KeyboardInterrupt("killed mid-write")

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(path, model=model, epoch=2, step=20)
    monkeypatch.undo()
    assert load_checkpoint(path, model=model)["epoch"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.pt"]


def test_temporaries_of_dead_processes_are_removed(tmp_path):
    import subprocess
    import sys

    from fastlt.engine.checkpoint import remove_stale_temporaries

    finished = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead = int(finished.stdout)
    for name in (f"last.pt.tmp-{dead}", f"best.pt.tmp-{dead}", f"last.pt.tmp-{os.getpid()}", "notes.tmp-x"):
        (tmp_path / name).write_bytes(b"partial")
    removed = remove_stale_temporaries(str(tmp_path))
    assert sorted(os.path.basename(path) for path in removed) == [f"best.pt.tmp-{dead}", f"last.pt.tmp-{dead}"]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([f"last.pt.tmp-{os.getpid()}", "notes.tmp-x"])


def test_missing_or_truncated_checkpoint_names_the_file(tmp_path):
    from fastlt.engine.checkpoint import CheckpointError

    model = torch.nn.Linear(3, 2)
    path = tmp_path / "last.pt"
    with pytest.raises(FileNotFoundError, match="last.pt not found"):
        load_checkpoint(str(path), model=model)
    save_checkpoint(str(path), model=model, epoch=1, step=10)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(CheckpointError, match=f"checkpoint {path} cannot be read .*truncated"):
        load_checkpoint(str(path), model=model)
    torch.save({"weights": torch.zeros(2)}, path)
    with pytest.raises(CheckpointError, match="not a fastlt checkpoint"):
        load_checkpoint(str(path), model=model)
