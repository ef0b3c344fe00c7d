"""Speed features that leave the math unchanged: channels_last memory format and torch.compile."""

import torch
from torch import nn


def channels_last_is_faster(device) -> bool:
    """The default of `train.channels_last`: True on CUDA (cuDNN's NHWC convolutions) and on CPUs where torch runs
    convolutions through oneDNN (`torch.backends.mkldnn`: x86-64 and aarch64 builds), whose NCHW path reorders every
    activation into oneDNN's own layout and back while NHWC is native (RIDE ResNet-32 step: BENCHMARKS.md). Without
    oneDNN, torch's own channels_last CPU convolution is no faster, so NCHW stays."""
    device = torch.device(device)
    if device.type == "cuda":
        return True
    return device.type == "cpu" and torch.backends.mkldnn.is_available() and torch.backends.mkldnn.enabled


def prepare_model(model: nn.Module, device: torch.device, channels_last: bool = False) -> nn.Module:
    """Moves the model to `device`, in channels_last layout if asked (see `channels_last_is_faster`). Inputs should
    be channels_last too: `make_loader(..., channels_last=True)` hands batches over that way."""
    model = model.to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model


def maybe_compile(model: nn.Module, enabled: bool = False, **compile_options) -> nn.Module:
    """torch.compile(model, **compile_options) when enabled (off by default: the first steps compile for minutes
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
