"""`fit`: the epoch loop that ties the engine together: schedule, sampler epochs, training, validation, model
selection, checkpoints and resuming.

Epochs are 0-based everywhere in fastlt (schedules, checkpoints, metrics.jsonl, `sampler.set_epoch`, the methods'
epoch hooks), as torch's `DistributedSampler.set_epoch` and Lightning count them.

Model selection: with a validation loader, `best.pt` holds the epoch with the best validation accuracy; without
one, the last epoch is the model. The test set is never looked at here.

Crash consistency: `last.pt` is the commit point of an epoch. At its end the record is appended to metrics.jsonl,
an improved model is written to `best.pt.pending-<epoch>`, then `last.pt`, then the pending file is renamed to
`best.pt`. A process killed anywhere in between is resumed from `last.pt`: a pending file that `last.pt` names as
its best epoch is renamed, any other is deleted, and the metrics records of epochs `last.pt` does not hold are
dropped (they are trained and logged again). So `best.pt` is always the best epoch `last.pt` records.

Usage::

    result = fit(model, loss_fn, optimizer, schedule, train_loader, epochs=200, device=torch.device("cpu"),
                 run=RunFolder("runs/ride"), sampler=sampler, val_loader=val_loader, class_counts=counts)
    result["selected_checkpoint"]  # 'runs/ride/best.pt' (validation) or 'runs/ride/last.pt' (no validation)
"""

import math
import os
import re
from typing import Callable, Optional

import torch
from torch import nn

from fastlt import class_shards
from fastlt.engine.acceleration import unwrap_model
from fastlt.engine.amp import grad_scaler
from fastlt.engine.checkpoint import load_checkpoint, remove_stale_temporaries, save_checkpoint
from fastlt.engine.crash_points import crash_point
from fastlt.engine.distributed import DistributedContext, barrier
from fastlt.engine.evaluate import evaluate_logits
from fastlt.engine.loop import predict, train_one_epoch
from fastlt.engine.mix import Mixup
from fastlt.engine.run_folder import RunFolder

SINGLE_PROCESS = DistributedContext(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
_PENDING_BEST = re.compile(r"^best\.pt\.pending-(\d+)$")


def pending_best_path(run: RunFolder, epoch: int) -> str:
    return run.path(f"best.pt.pending-{epoch}")


def settle_run_folder(run: RunFolder, progress: dict, resumed: bool) -> None:
    """Brings the files of an interrupted run in line with last.pt (see the module docstring); on a fresh start
    (nothing resumed) removes the checkpoints and epoch records a previous run left in the folder."""
    remove_stale_temporaries(run.root)
    for name in sorted(os.listdir(run.root)):
        match = _PENDING_BEST.match(name)
        if match is None:
            continue
        if resumed and int(match.group(1)) == progress["best_epoch"]:
            os.replace(run.path(name), run.path("best.pt"))  # last.pt committed it; the rename did not happen
        else:
            os.remove(run.path(name))
    if not resumed:
        for name in ("last.pt", "best.pt"):
            if os.path.exists(run.path(name)):
                os.remove(run.path(name))
    run.drop_epoch_records(progress["epoch"] if resumed else 0)


def recover_interrupted_run(root: str) -> bool:
    """Settles a folder whose `fit` was killed after writing last.pt but before renaming its new best, for a reader
    that does not resume it (fastlt eval / stage2). Returns whether a pending best was found."""
    last = os.path.join(root, "last.pt")
    if not os.path.exists(last) or not any(_PENDING_BEST.match(name) for name in os.listdir(root)):
        return False
    progress = load_checkpoint(last, restore_rng=False)["extra"]["progress"]
    next_epoch = progress["epoch"] + (1 if progress["epoch_complete"] else 0)
    settle_run_folder(RunFolder(root), {**progress, "epoch": next_epoch}, resumed=True)
    return True


def fit(
    model: nn.Module,
    loss_fn: Callable,
    optimizer: torch.optim.Optimizer,
    schedule,
    train_loader,
    *,
    epochs: int,
    device: torch.device,
    run: RunFolder,
    sampler=None,
    val_loader=None,
    class_counts=None,
    precision: str = "fp32",
    channels_last: bool = False,
    steps_per_epoch: Optional[int] = None,
    checkpoint_every_steps: Optional[int] = None,
    resume: bool = False,
    selection_metric: str = "overall",
    on_epoch_start: Optional[Callable[[int], None]] = None,
    loss_needs_images: bool = False,
    mixup: Optional[Mixup] = None,
    context: DistributedContext = SINGLE_PROCESS,
) -> dict:
    """Trains `epochs` epochs (continuing from run/last.pt when resume=True and it exists).

    loss_fn(output, targets) gets the fp32 ModelOutput (and the batch's images as a third argument when
    loss_needs_images: distillation); on_epoch_start(epoch) lets a method switch phases (e.g.
    RIDE's DRW after epoch 160). steps_per_epoch caps an epoch (Decoupling: floor(N / B) with any sampler).
    mixup (fastlt.engine.mix.Mixup) mixes the training batches; its draws follow (epoch, step): they resume exactly.
    checkpoint_every_steps also writes mid-epoch checkpoints with the sampler position (needs loader.batch_size).
    Returns {"history": [per-epoch records], "best_epoch", "best_metric", "selected_checkpoint"}.
    """
    if val_loader is not None and class_counts is None:
        raise ValueError("fit: a validation loader needs the training class_counts for many / medium / few")
    if checkpoint_every_steps and getattr(train_loader, "batch_size", None) is None:
        raise ValueError("fit: checkpoint_every_steps needs train_loader.batch_size to record the sampler position")
    scaler = grad_scaler(device.type, precision)
    last_path, best_path = run.path("last.pt"), run.path("best.pt")
    progress = {"epoch": 0, "steps_done": 0, "epoch_complete": False, "best_metric": -math.inf, "best_epoch": None}
    resuming_mid_epoch = False
    resumed = resume and os.path.exists(last_path)
    if resumed:
        state = load_checkpoint(last_path, model=model, optimizer=optimizer, scaler=scaler, sampler=sampler,
                                map_location=device)
        progress.update(state["extra"]["progress"])
        resuming_mid_epoch = not progress["epoch_complete"]
        if progress["epoch_complete"]:
            progress.update(epoch=progress["epoch"] + 1, steps_done=0)
    if context.is_main:
        settle_run_folder(run, progress, resumed)

    class_parallel = class_shards.has_class_shards(unwrap_model(model))  # a class-sharded head: all ranks take part

    def checkpoint(epoch_complete: bool, steps_done: int, path: str = last_path) -> None:
        if not context.is_main and not class_parallel:
            return
        progress.update(epoch_complete=epoch_complete, steps_done=steps_done)
        mid_epoch = not epoch_complete and sampler is not None
        save_checkpoint(path, model=model, optimizer=optimizer, scaler=scaler, schedule=schedule,
                        sampler=sampler if mid_epoch else None,
                        sampler_consumed=steps_done * train_loader.batch_size if mid_epoch else None,
                        epoch=progress["epoch"], step=steps_done, extra={"progress": dict(progress)},
                        write=context.is_main)

    history = []
    for epoch in range(progress["epoch"], epochs):
        progress["epoch"] = epoch
        steps_before = progress["steps_done"] if resuming_mid_epoch else 0
        if sampler is not None and not resuming_mid_epoch:
            sampler.set_epoch(epoch)
        resuming_mid_epoch = False
        lr_factor = schedule.apply(optimizer, epoch)
        if on_epoch_start is not None:
            on_epoch_start(epoch)
        if mixup is not None:
            mixup.set_epoch(epoch, steps_before)

        def on_step(step: int, loss: torch.Tensor) -> None:
            if checkpoint_every_steps and step % checkpoint_every_steps == 0:
                checkpoint(False, steps_before + step)

        max_steps = None if steps_per_epoch is None else steps_per_epoch - steps_before
        stats = train_one_epoch(model, train_loader, loss_fn, optimizer, device=device, precision=precision,
                                scaler=scaler, channels_last=channels_last, max_steps=max_steps,
                                progress=lambda batches: run.progress(batches, desc=f"epoch {epoch}"),
                                on_step=on_step, loss_needs_images=loss_needs_images, mixup=mixup)
        record = {"epoch": epoch, "lr": optimizer.param_groups[0]["lr"], "lr_factor": lr_factor,
                  "train_loss": stats["loss"], "steps": stats["steps"], "data_time_s": stats["data_time_s"],
                  "compute_time_s": stats["compute_time_s"]}
        improved = False
        if val_loader is not None and (context.is_main or class_parallel):
            # the unwrapped model: DDP's forward would wait for the other ranks, which do not validate (with a
            # class-parallel head every rank validates the same batches: each holds some classes' logits)
            logits, targets = predict(unwrap_model(model), val_loader, device=device, precision=precision,
                                      channels_last=channels_last)
            results = evaluate_logits(logits, targets, class_counts)
            record.update({f"val_{key}": value for key, value in results.items() if key != "per_class"})
            improved = results[selection_metric] > progress["best_metric"]
            if improved:
                progress.update(best_metric=results[selection_metric], best_epoch=epoch)
        run.log(record)
        crash_point("epoch end: record logged")
        steps_done = stats["steps"] + steps_before
        if improved:
            checkpoint(True, steps_done, path=pending_best_path(run, epoch))
            crash_point("epoch end: pending best written")
        checkpoint(True, steps_done)
        crash_point("epoch end: last.pt written")
        if improved and context.is_main:
            os.replace(pending_best_path(run, epoch), best_path)
            crash_point("epoch end: best.pt in place")
        history.append(record)
        barrier(context)
    selected = best_path if val_loader is not None and progress["best_epoch"] is not None else last_path
    return {"history": history, "best_epoch": progress["best_epoch"], "best_metric": progress["best_metric"],
            "selected_checkpoint": selected}
