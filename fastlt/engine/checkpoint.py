"""Exact checkpoints: resuming from one continues training bit for bit on CPU.

A checkpoint holds the model, optimizer, GradScaler, schedule and sampler state, the epoch and step, and the
Python / NumPy / torch (CPU and CUDA) random generator states. It is written to a temporary file that is then
renamed over the target (os.replace is atomic), so a crash mid-write leaves the previous checkpoint intact (and a
`<name>.tmp-<pid>` file that `remove_stale_temporaries` deletes once that process is gone).

Usage::

    save_checkpoint("run/last.pt", model=model, optimizer=optimizer, epoch=3, step=1200)
    state = load_checkpoint("run/last.pt", model=model, optimizer=optimizer)
    start_epoch = state["epoch"] + 1
"""

import os
import pickle
import random
import re
import zipfile
from typing import Any, Optional

import numpy as np
import torch
from torch import nn

from fastlt import class_shards
from fastlt.engine.acceleration import unwrap_model
from fastlt.engine.crash_points import crash_point
from fastlt.errors import MissingFileError, UserError

FORMAT_VERSION = 1
_TEMPORARY = re.compile(r"\.tmp-(\d+)$")


class CheckpointError(UserError, ValueError):
    """A checkpoint file that exists but cannot be read (truncated, corrupt or not a fastlt checkpoint)."""


def capture_rng_state() -> dict:
    """Every global generator the training loop draws from. NumPy's state is stored as a tensor so the file
    loads with torch.load(weights_only=True)."""
    kind, keys, position, has_gauss, cached_gaussian = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "position": int(position),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached_gaussian)},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict) -> None:
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))
    numpy_state = state["numpy"]
    np.random.set_state((numpy_state["kind"], numpy_state["keys"].numpy().astype(np.uint32), numpy_state["position"],
                         numpy_state["has_gauss"], numpy_state["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(
    path: str,
    *,
    model: nn.Module,
    optimizer: Optional[torch.optim.Optimizer] = None,
    scaler: Optional[torch.amp.GradScaler] = None,
    schedule=None,
    sampler=None,
    sampler_consumed: Optional[int] = None,
    epoch: int,
    step: int,
    extra: Optional[dict] = None,
    write: bool = True,
) -> None:
    """Writes a checkpoint atomically (call it on the main rank only, or, for a model with class-sharded parameters,
    on every rank with ``write`` true on the main rank alone).

    sampler: any object with state_dict() (fastlt.data samplers); sampler_consumed, when given, is passed as
    state_dict(consumed=...) so a mid-epoch checkpoint records the samples actually trained on rather than what
    DataLoader workers have read ahead. extra: small picklable values (best metric, config name, ...).
    Class-sharded parameters (fastlt.class_shards: a class-parallel head) and their optimizer state are saved whole,
    gathered from every rank, so the checkpoint resumes on any number of ranks.
    """
    if sampler is None:
        sampler_state = None
    elif sampler_consumed is None:
        sampler_state = sampler.state_dict()
    else:
        sampler_state = sampler.state_dict(consumed=sampler_consumed)
    model_state = unwrap_model(model).state_dict()  # gathers class-sharded parameters: every rank calls it
    optimizer_state = None
    if optimizer is not None:
        optimizer_state = class_shards.gather_optimizer_state(optimizer, optimizer.state_dict())
    if not write:
        return
    state = {
        "format_version": FORMAT_VERSION,
        "model": model_state,
        "optimizer": optimizer_state,
        "scaler": scaler.state_dict() if scaler is not None else None,
        "schedule": schedule.state_dict() if schedule is not None else None,
        "sampler": sampler_state,
        "epoch": epoch,
        "step": step,
        "rng": capture_rng_state(),
        "extra": extra or {},
    }
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    temporary = f"{path}.tmp-{os.getpid()}"
    try:
        with open(temporary, "wb") as handle:
            torch.save(state, handle)
            crash_point("checkpoint: temporary file partly written")
            handle.flush()
            os.fsync(handle.fileno())
        crash_point("checkpoint: temporary file complete")
        os.replace(temporary, path)
    except BaseException:
        if os.path.exists(temporary):
            os.remove(temporary)
        raise
    crash_point("checkpoint: renamed")
    _fsync_directory(directory)


def load_checkpoint(
    path: str,
    *,
    model: Optional[nn.Module] = None,
    optimizer: Optional[torch.optim.Optimizer] = None,
    scaler: Optional[torch.amp.GradScaler] = None,
    sampler=None,
    restore_rng: bool = True,
    strict: bool = True,
    map_location: Any = "cpu",
    weights_only: bool = True,
) -> dict:
    """Restores what it is given and returns the whole checkpoint dict (epoch, step, schedule, extra, ...).

    The schedule needs no restoring: it is a function of the epoch (schedules.py). weights_only=True refuses
    arbitrary pickled objects; pass False only for a file you trust whose sampler or extra state needs it.
    """
    if not os.path.isfile(path):
        raise MissingFileError(f"checkpoint {path} not found")
    try:
        state = torch.load(path, map_location=map_location, weights_only=weights_only)
    except (RuntimeError, EOFError, OSError, pickle.UnpicklingError, zipfile.BadZipFile) as error:
        raise CheckpointError(f"checkpoint {path} cannot be read (truncated or corrupt: {error}); delete it and "
                              f"train again, or use another checkpoint") from error
    if not isinstance(state, dict) or state.get("format_version") != FORMAT_VERSION:
        version = state.get("format_version") if isinstance(state, dict) else None
        raise CheckpointError(f"checkpoint {path} has format {version}, expected {FORMAT_VERSION}: not a fastlt "
                              f"checkpoint of this version")
    if model is not None:
        unwrap_model(model).load_state_dict(state["model"], strict=strict)
    if optimizer is not None:  # class-sharded parameters' state was saved whole: each rank takes its shard
        optimizer.load_state_dict(class_shards.shard_optimizer_state(optimizer, state["optimizer"]))
    if scaler is not None and state["scaler"] is not None:
        scaler.load_state_dict(state["scaler"])
    if sampler is not None and state["sampler"] is not None:
        sampler.load_state_dict(state["sampler"])
    if restore_rng:
        restore_rng_state(state["rng"])
    return state


def remove_stale_temporaries(directory: str) -> list:
    """Deletes the `*.tmp-<pid>` files in `directory` left by processes that no longer run (killed mid-write);
    returns their paths. Files of a live process (this one included) are left alone."""
    removed = []
    for name in sorted(os.listdir(directory)) if os.path.isdir(directory) else ():
        match = _TEMPORARY.search(name)
        if match and not _process_alive(int(match.group(1))):
            path = os.path.join(directory, name)
            os.remove(path)
            removed.append(path)
    return removed


def _process_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def _fsync_directory(directory: str) -> None:
    """Makes the rename itself durable (POSIX); a no-op where directories cannot be opened."""
    try:
        descriptor = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)
