"""Run by test_distributed.py under torchrun: a few DDP steps of a tiny model on a fixed global batch."""

import sys
import weakref

import torch
import torch.nn.functional as F

from fastlt.engine import all_gather_concat, build_sgd, init_distributed, shutdown_distributed, unwrap_model, wrap_model
from fastlt.engine.distributed import _all_gather


def make_model_and_data():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))
    images = torch.randn(3, 8, 6)  # 3 steps x global batch 8
    targets = torch.randint(0, 4, (3, 8))
    return model, images, targets


def train(model, images, targets, rank=0, world_size=1):
    optimizer = build_sgd(model, lr=0.1, weight_decay=5e-4, nesterov=True)
    per_rank = images.shape[1] // world_size
    for step in range(images.shape[0]):
        rows = slice(rank * per_rank, (rank + 1) * per_rank)
        optimizer.zero_grad()
        F.cross_entropy(model(images[step, rows]), targets[step, rows]).backward()
        optimizer.step()
    return model


def buffers_still_held_after_return(context, calls=200):
    """How many _all_gather calls returned while gloo still held the tensor they sent (must be 0: a tensor freed
    by gloo's thread once the interpreter is exiting aborts the process). Without the wait, ~4% of calls here."""
    probes = []

    def fresh_tensor():
        tensor = torch.full((256,), float(context.rank))
        probes.append(weakref.ref(tensor))
        return tensor

    held = 0
    for _ in range(calls):
        _all_gather(fresh_tensor(), context)
        held += probes[-1]() is not None
    return held


if __name__ == "__main__":
    context = init_distributed(device="cpu")
    model, images, targets = make_model_and_data()
    model = wrap_model(model, context)
    train(model, images, targets, context.rank, context.world_size)
    held = buffers_still_held_after_return(context)
    gathered = all_gather_concat(torch.full((context.rank + 1, 2), float(context.rank)), context)
    held = int(all_gather_concat(torch.tensor([held]), context).sum())
    if context.is_main:
        torch.save({"state": unwrap_model(model).state_dict(), "gathered": gathered, "held": held}, sys.argv[1])
    shutdown_distributed(context)
