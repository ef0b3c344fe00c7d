"""`fit`: an interrupted run resumed from run/last.pt ends bit-identical to an uninterrupted one; model selection
uses the validation split (best.pt) or the last epoch, never a test set."""

import random

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import fastlt.engine.trainer as trainer_module
from fastlt.data import LongTailSampler
from fastlt.engine import RunFolder, build_schedule, build_sgd, fit, read_metrics
from fastlt.engine.mix import Mixup
from fastlt.models import create_model
from toy_data import Digits, ResumableShuffle

COUNTS = [8] * 10  # training class counts (all "few"; only the bookkeeping matters here)


class Interrupt(Exception):
    pass


def run_fit(root, *, seed, epochs=3, interrupt=None, resume=False, noisy=True, val=True, real_sampler=False,
            **options):
    """interrupt(epoch, step) raising Interrupt simulates a crash; the same seeds make the 'new process' differ."""
    random.seed(seed), np.random.seed(seed), torch.manual_seed(seed)
    model = create_model("small_cnn", num_classes=10)
    optimizer = build_sgd(model, lr=0.05, weight_decay=5e-4, nesterov=True)
    dataset = Digits(40, noisy=noisy)
    if real_sampler:
        sampler = LongTailSampler(dataset.targets.numpy(), strategy="class_balanced", seed=5)
    else:
        sampler = ResumableShuffle(40, seed=5)
    loader = torch.utils.data.DataLoader(dataset, batch_size=8, sampler=sampler)
    val_loader = torch.utils.data.DataLoader(Digits(20, noisy=False, seed=2), batch_size=10) if val else None
    schedule = build_schedule("warmup_cosine", epochs, warmup_epochs=1)
    state = {"epoch": 0, "step": 0}

    def loss_fn(output, targets):
        state["step"] += 1
        if interrupt is not None:
            interrupt(state["epoch"], state["step"])
        return F.cross_entropy(output.logits, targets)

    def on_epoch_start(epoch):
        state.update(epoch=epoch, step=0)

    result = fit(model, loss_fn, optimizer, schedule, loader, epochs=epochs, device=torch.device("cpu"),
                 run=RunFolder(str(root), config={"seed": seed}), sampler=sampler, val_loader=val_loader,
                 class_counts=COUNTS if val else None, resume=resume, on_epoch_start=on_epoch_start, **options)
    return model, result


def assert_same_parameters(first, second):
    for (name, a), (_, b) in zip(first.state_dict().items(), second.state_dict().items()):
        assert torch.equal(a, b), name


def test_resume_at_epoch_boundary_is_bit_identical(tmp_path):
    reference, reference_result = run_fit(tmp_path / "reference", seed=0)

    def crash_in_epoch_2(epoch, step):
        if epoch == 2:
            raise Interrupt

    with pytest.raises(Interrupt):
        run_fit(tmp_path / "run", seed=0, interrupt=crash_in_epoch_2)
    resumed, result = run_fit(tmp_path / "run", seed=7, resume=True)
    assert_same_parameters(reference, resumed)
    assert [record["epoch"] for record in read_metrics(str(tmp_path / "run" / "metrics.jsonl"))] == [0, 1, 2]
    assert result["best_epoch"] == reference_result["best_epoch"]
    assert result["best_metric"] == reference_result["best_metric"]
    assert result["selected_checkpoint"].endswith("best.pt")


@pytest.mark.parametrize("real_sampler", [False, True], ids=["toy_sampler", "LongTailSampler"])
def test_resume_mid_epoch_restores_sampler_position(tmp_path, real_sampler):
    # Mid-epoch resume is exact when the data draw no global random numbers: the resumed run's fresh DataLoader
    # iterator draws its seed at another moment than the uninterrupted run's.
    options = dict(noisy=False, checkpoint_every_steps=2, real_sampler=real_sampler)
    reference, _ = run_fit(tmp_path / "reference", seed=0, **options)

    def crash_at_step_4_of_epoch_1(epoch, step):
        if (epoch, step) == (1, 4):
            raise Interrupt

    with pytest.raises(Interrupt):
        run_fit(tmp_path / "run", seed=0, interrupt=crash_at_step_4_of_epoch_1, **options)
    state = torch.load(tmp_path / "run" / "last.pt")
    assert (state["epoch"], state["step"]) == (1, 2)
    assert (state["sampler"]["epoch"], state["sampler"]["position"]) == (1, 16)  # 0-based, as the trainer
    resumed, _ = run_fit(tmp_path / "run", seed=7, resume=True, **options)
    assert_same_parameters(reference, resumed)


def test_mixup_resumes_mid_epoch_exactly(tmp_path):
    """The mix draws follow (seed, epoch, step): a run resumed mid-epoch mixes its remaining steps as the
    uninterrupted run did (a mixer restarted at step 0 of the epoch would not)."""
    def mixup():
        return Mixup(mixup_alpha=0.4, cutmix_alpha=1.0, prob=0.8, seed=3)

    options = dict(noisy=False, checkpoint_every_steps=2, real_sampler=True)
    reference, _ = run_fit(tmp_path / "reference", seed=0, mixup=mixup(), **options)
    unmixed, _ = run_fit(tmp_path / "unmixed", seed=0, **options)
    assert any(not torch.equal(a, b) for a, b in zip(reference.state_dict().values(), unmixed.state_dict().values()))

    def crash_at_the_7th_loss_of_epoch_1(epoch, call):  # a mixed step calls the loss once per label set
        if (epoch, call) == (1, 7):
            raise Interrupt

    with pytest.raises(Interrupt):
        run_fit(tmp_path / "run", seed=0, interrupt=crash_at_the_7th_loss_of_epoch_1, mixup=mixup(), **options)
    state = torch.load(tmp_path / "run" / "last.pt")
    assert (state["epoch"], state["step"]) == (1, 2)
    resumed, _ = run_fit(tmp_path / "run", seed=7, resume=True, mixup=mixup(), **options)
    assert_same_parameters(reference, resumed)


def test_without_validation_the_last_epoch_is_selected(tmp_path):
    _, result = run_fit(tmp_path / "run", seed=0, epochs=2, val=False, steps_per_epoch=3)
    assert result["selected_checkpoint"].endswith("last.pt") and result["best_epoch"] is None
    assert [record["steps"] for record in result["history"]] == [3, 3]
    assert not (tmp_path / "run" / "best.pt").exists()
    records = read_metrics(str(tmp_path / "run" / "metrics.jsonl"))
    assert "val_overall" not in records[0] and records[1]["lr"] == pytest.approx(0.05 * 0.5 * (1 + np.cos(np.pi / 2)))


class WriteKiller:
    """Interrupts fit just before or just after its n-th durable write (a checkpoint file or a metrics record)."""

    def __init__(self, monkeypatch, n, after):
        self.n, self.after, self.count = n, after, 0
        save, log = trainer_module.save_checkpoint, RunFolder.log
        monkeypatch.setattr(trainer_module, "save_checkpoint", lambda path, **kw: self.write(save, path, **kw))
        monkeypatch.setattr(RunFolder, "log", lambda run, record: self.write(log, run, record))

    def write(self, function, *args, **kwargs):
        self.count += 1
        if self.count == self.n and not self.after:
            raise Interrupt
        function(*args, **kwargs)
        if self.count == self.n and self.after:
            raise Interrupt


def comparable(records):
    return [{key: value for key, value in record.items() if not key.endswith("_s")} for record in records]


def test_killed_around_any_epoch_end_write_resumes_to_the_uninterrupted_run(tmp_path, monkeypatch):
    """last.pt, best.pt and metrics.jsonl stay consistent whichever write a kill interrupts: the resumed run logs
    every epoch once and its best.pt is the reference run's best epoch (the old order wrote last.pt with the new
    best epoch before best.pt, and the metrics record after both)."""
    _, reference = run_fit(tmp_path / "reference", seed=0, epochs=2)
    assert reference["best_epoch"] == 1  # the second epoch improves: a stale best.pt would show
    expected_metrics = comparable(read_metrics(str(tmp_path / "reference" / "metrics.jsonl")))
    expected_best = torch.load(tmp_path / "reference" / "best.pt")["model"]
    # writes 1-3: epoch 0's record, best, last; 4-6: epoch 1's; after 3 and 6: between last.pt and best.pt
    for n, after in [(n, False) for n in range(1, 7)] + [(3, True), (6, True)]:
        root = tmp_path / f"run_{n}_{after}"
        killer = WriteKiller(monkeypatch, n, after)
        with pytest.raises(Interrupt):
            run_fit(root, seed=0, epochs=2)
        monkeypatch.undo()
        assert killer.count == n
        # a process killed before any last.pt starts afresh from the run's seed; else every RNG state comes
        # from last.pt, whatever the new process seeded
        _, result = run_fit(root, seed=7 if (root / "last.pt").exists() else 0, resume=True, epochs=2)
        assert comparable(read_metrics(str(root / "metrics.jsonl"))) == expected_metrics, (n, after)
        assert result["best_epoch"] == 1 and result["best_metric"] == reference["best_metric"], (n, after)
        best = torch.load(root / "best.pt")
        assert best["epoch"] == 1 and all(torch.equal(best["model"][key], value)
                                          for key, value in expected_best.items()), (n, after)
        assert sorted(path.name for path in root.iterdir()) == ["best.pt", "config.yaml", "last.pt",
                                                                "metrics.jsonl"]


def test_a_reader_of_an_interrupted_run_gets_the_committed_best(tmp_path, monkeypatch):
    """fastlt eval of a run killed between last.pt and the rename of its new best (never resumed)."""
    WriteKiller(monkeypatch, 6, after=True)
    with pytest.raises(Interrupt):
        run_fit(tmp_path / "run", seed=0, epochs=2)
    monkeypatch.undo()
    assert torch.load(tmp_path / "run" / "best.pt")["epoch"] == 0 and (tmp_path / "run" / "best.pt.pending-1").exists()
    assert trainer_module.recover_interrupted_run(str(tmp_path / "run"))
    assert torch.load(tmp_path / "run" / "best.pt")["epoch"] == 1
    assert not trainer_module.recover_interrupted_run(str(tmp_path / "run"))  # nothing left to do
