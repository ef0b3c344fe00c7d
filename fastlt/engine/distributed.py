"""DDP through torchrun: gloo on CPU, nccl on GPU, everything read from torchrun's environment variables.

    torchrun --nproc_per_node 2 -m fastlt.cli train --config ...    # RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT

A plain `python` run (no WORLD_SIZE) is a world of one and never touches torch.distributed.
"""

import os
import time
import warnings
import weakref
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from fastlt import class_shards
from fastlt.errors import DeviceUnavailableError

DEVICES = ("auto", "cpu", "cuda")


@dataclass(frozen=True)
class DistributedContext:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        """Rank 0 writes the run folder, checkpoints and the progress bar."""
        return self.rank == 0

    @property
    def is_distributed(self) -> bool:
        return self.world_size > 1


def uses_cuda(device: str = "auto") -> bool:
    """Whether `device` ("auto": CUDA when available, "cpu" or "cuda") runs on CUDA here; a DeviceUnavailableError
    naming the setting when it cannot run here (an unknown name, or cuda without a GPU)."""
    if device not in DEVICES:
        raise DeviceUnavailableError(f"device={device!r} is not a device fastlt runs on: set device=auto, cpu or cuda")
    available = torch.cuda.is_available()
    if device == "cuda" and not available:
        why = "torch is a CPU build" if torch.version.cuda is None else "no CUDA GPU or driver is visible"
        raise DeviceUnavailableError(f"device=cuda but torch.cuda.is_available() is False ({why}): set device=auto "
                                     "or device=cpu")
    return device == "cuda" or (device == "auto" and available)


def init_distributed(device: str = "auto") -> DistributedContext:
    """Joins the process group torchrun describes (env://), or returns a single-process context.

    device: "auto" (CUDA when available, else CPU), "cpu" or "cuda" (`uses_cuda`). The backend follows the device:
    nccl for CUDA, gloo for CPU. Each CUDA rank uses GPU LOCAL_RANK.
    """
    use_cuda = uses_cuda(device)
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    target = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(target)
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if use_cuda else "gloo", init_method="env://",
                                rank=rank, world_size=world_size)
    return DistributedContext(rank=rank, world_size=world_size, local_rank=local_rank, device=target)


def wrap_model(model: nn.Module, context: DistributedContext, **ddp_options) -> nn.Module:
    """DistributedDataParallel over `model` (already on context.device) when the world has more than one rank.

    Gradients are averaged over ranks, so a run on W ranks with per-rank batch B matches a 1-rank run with batch
    W*B, up to BatchNorm (per-rank statistics, as the papers' DataParallel / DDP runs). Parameters sharded by class
    (a class-parallel head, fastlt.class_shards) and their module's buffers stay out of DDP: each rank's are its own
    classes, with complete gradients.
    """
    if not context.is_distributed:
        return model
    ignored = class_shards.names_outside_ddp(model)
    if ignored:
        nn.parallel.DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, ignored)
    device_ids = [context.device.index] if context.device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(model, device_ids=device_ids, **ddp_options)


def all_gather_concat(tensor: torch.Tensor, context: DistributedContext) -> torch.Tensor:
    """Concatenates every rank's tensor along dim 0 (rank order); rows per rank may differ (e.g. eval shards)."""
    if not context.is_distributed:
        return tensor
    sizes = [int(rows) for rows in _all_gather(torch.tensor([tensor.shape[0]], device=tensor.device), context)]
    padding = tensor.new_zeros((max(sizes) - tensor.shape[0], *tensor.shape[1:]))
    parts = _all_gather(torch.cat([tensor, padding]), context)
    return torch.cat([part[:rows] for part, rows in zip(parts, sizes)])


def _all_gather(sent: torch.Tensor, context: DistributedContext, timeout_s: float = 10.0) -> list:
    """dist.all_gather that returns only once the process group has let go of its buffers; `sent` must be a tensor
    that no one else holds (pass a fresh one).

    gloo's worker thread may drop its last reference to a collective's tensors just after the call returned (4% of
    calls on this 2-core machine). Freeing a tensor made in Python needs the GIL; if the interpreter is exiting by
    then, that thread aborts the process ("terminate called without an active exception"). So we return copies and
    wait, GIL released, until the originals are freed.
    """
    received = [torch.empty_like(sent) for _ in range(context.world_size)]
    dist.all_gather(received, sent)
    copies = [part.clone() for part in received]
    buffers = [weakref.ref(part) for part in (sent, *received)]
    del sent, received
    deadline = time.monotonic() + timeout_s
    while any(buffer() is not None for buffer in buffers):
        if time.monotonic() > deadline:
            warnings.warn(f"all_gather: the process group still holds its buffers after {timeout_s} s", stacklevel=3)
            break
        time.sleep(0.001)
    return copies


def barrier(context: DistributedContext) -> None:
    if context.is_distributed:
        dist.barrier()


def shutdown_distributed(context: DistributedContext) -> None:
    """Waits for every rank, then leaves the process group (call it once no more collectives will run).

    A rank that left while a peer still waited on a collective would fail that peer; after the barrier none does.
    """
    if context.is_distributed and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
