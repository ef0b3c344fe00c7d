"""Opt-in speed features that leave the numbers unchanged: channels_last memory format and torch.compile."""

import torch
from torch import nn


def prepare_model(model: nn.Module, device: torch.device, channels_last: bool = False) -> nn.Module:
    """Moves the model to `device`, in channels_last layout if asked (faster convolutions on recent GPUs and
    oneDNN CPUs). Inputs should then be converted with `images.to(memory_format=torch.channels_last)`."""
    model = model.to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model


def maybe_compile(model: nn.Module, enabled: bool = False, **compile_options) -> nn.Module:
    """torch.compile(model, **compile_options) when enabled (off by default: the first step compiles for minutes
    on a CPU). The compiled module shares parameters with `model`; checkpoints unwrap it (see checkpoint.py)."""
    return torch.compile(model, **compile_options) if enabled else model


def unwrap_model(model: nn.Module) -> nn.Module:
    """The plain module under DDP and torch.compile wrappers (their state_dict keys carry prefixes)."""
    while True:
        if isinstance(model, nn.parallel.DistributedDataParallel):
            model = model.module
        elif hasattr(model, "_orig_mod"):
            model = model._orig_mod
        else:
            return model
