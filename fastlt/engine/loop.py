"""One training epoch and batched prediction: the inner loops every method shares.

A method supplies `loss_fn(output, targets) -> scalar`, where `output` is the model's ModelOutput in fp32 (the
RIDE loss reads output.expert_logits, the ResLT loss output.branch_logits, CE output.logits); with
`loss_needs_images=True` it is called as `loss_fn(output, targets, images)` (distillation runs a teacher on them).
With a `Mixup` (fastlt.engine.mix) a mixed step's loss is lam * loss_fn(output, y_a) + (1 - lam) * loss_fn(output,
y_b), on the mixed images.

Usage (fastlt.engine.fit runs this loop with validation, checkpoints and resuming)::

    optimizer = build_sgd(model, lr=0.1, weight_decay=5e-4, nesterov=True)
    schedule = build_schedule("ride_custom", total_epochs=200, warmup_epochs=5, milestones=(160, 180), gamma=0.01)
    for epoch in range(200):
        schedule.apply(optimizer, epoch)
        stats = train_one_epoch(model, loader, loss_fn, optimizer, device=torch.device("cpu"))
"""

import dataclasses
import itertools
import time
from typing import Callable, Optional, Tuple

import torch
from torch import nn

from fastlt.engine.amp import autocast, grad_scaler
from fastlt.engine.mix import Mixup


def to_float32(output):
    """The floating-point tensors of a ModelOutput (or a bare tensor) in fp32, so losses never run in bf16/fp16."""
    if isinstance(output, torch.Tensor):
        return output.float()
    changes = {field.name: getattr(output, field.name).float() for field in dataclasses.fields(output)
               if isinstance(getattr(output, field.name), torch.Tensor)}
    return dataclasses.replace(output, **changes)


def move_batch(images: torch.Tensor, targets: torch.Tensor, device: torch.device, channels_last: bool):
    images = images.to(device, non_blocking=True)  # keeps the layout: a channels_last loader's batch stays NHWC
    if channels_last:  # a no-op for the batches of make_loader(..., channels_last=True)
        images = images.contiguous(memory_format=torch.channels_last)
    return images, targets.to(device, non_blocking=True)


def train_one_epoch(
    model: nn.Module,
    loader,
    loss_fn: Callable,
    optimizer: torch.optim.Optimizer,
    *,
    device: torch.device,
    precision: str = "fp32",
    scaler: Optional[torch.amp.GradScaler] = None,
    channels_last: bool = False,
    max_steps: Optional[int] = None,
    progress: Callable = lambda iterable: iterable,
    on_step: Optional[Callable[[int, torch.Tensor], None]] = None,
    loss_needs_images: bool = False,
    mixup: Optional[Mixup] = None,
) -> dict:
    """Trains over `loader` (at most `max_steps` batches: Decoupling ends an epoch after floor(N / B) steps).

    progress: wraps the loader (e.g. RunFolder.progress); on_step(step, loss) runs after every optimizer step
    (mid-epoch checkpoints, logging) with the detached loss tensor: reading it (`float(loss)`) waits for the
    device, so a callback that ignores it leaves CUDA steps unsynchronised; mixup: mixes the batches it picks
    (Mixup.set_epoch first). Returns the mean loss, step and sample counts, and data vs compute seconds (on CUDA the
    split is approximate: kernels run asynchronously until the loss is read).
    """
    model.train()
    scaler = scaler if scaler is not None else grad_scaler(device.type, precision)
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    steps = samples = 0
    data_time = compute_time = 0.0
    tick = time.perf_counter()
    batches = loader if max_steps is None else itertools.islice(loader, max_steps)
    for images, targets in progress(batches):
        images, targets = move_batch(images, targets, device, channels_last)
        started = time.perf_counter()
        data_time += started - tick
        mixed = None if mixup is None else mixup(images, targets)
        if mixed is not None:
            images = mixed.images
        optimizer.zero_grad(set_to_none=True)
        with autocast(device.type, precision):
            output = model(images)
        output, extra = to_float32(output), ((images,) if loss_needs_images else ())
        loss = loss_fn(output, targets, *extra) if mixed is None else mixed.loss(loss_fn, output, *extra)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        loss_sum += loss.detach()
        steps += 1
        samples += targets.shape[0]
        compute_time += time.perf_counter() - started
        if on_step is not None:
            on_step(steps, loss.detach())
        tick = time.perf_counter()  # time spent in on_step (checkpoints) counts as neither data nor compute
    return {
        "loss": float(loss_sum) / max(steps, 1),
        "steps": steps,
        "samples": samples,
        "data_time_s": data_time,
        "compute_time_s": compute_time,
    }


@torch.no_grad()
def predict(
    model: nn.Module,
    loader,
    *,
    device: torch.device,
    precision: str = "fp32",
    channels_last: bool = False,
    progress: Callable = lambda iterable: iterable,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """(logits [N, C] fp32, targets [N]) on the CPU, model in eval mode, in loader order."""
    model.eval()
    all_logits, all_targets = [], []
    for images, targets in progress(loader):
        images, targets = move_batch(images, targets, device, channels_last)
        with autocast(device.type, precision):
            output = model(images)
        logits = output if isinstance(output, torch.Tensor) else output.logits
        all_logits.append(logits.float().cpu())
        all_targets.append(targets.cpu())
    return torch.cat(all_logits), torch.cat(all_targets)
