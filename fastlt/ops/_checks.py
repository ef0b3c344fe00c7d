"""Argument checks shared by the public op functions: clear ValueErrors that name the op and the argument."""

import math
import numbers

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def tensor(op: str, name: str, value, *, dims=None, floating=False, nonempty=True) -> None:
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(value).__name__}")
    if dims is not None and value.dim() not in (dims if isinstance(dims, tuple) else (dims,)):
        raise ValueError(f"{op}: {name} must have {dims} dims, got shape {tuple(value.shape)}")
    if floating and value.dtype not in FLOAT_DTYPES:
        raise ValueError(f"{op}: {name} must be float16/bfloat16/float32/float64, got {value.dtype}")
    if nonempty and value.numel() == 0:
        raise ValueError(f"{op}: {name} must not be empty, got shape {tuple(value.shape)}")


def same_device(op: str, name: str, value: torch.Tensor, reference: torch.Tensor, reference_name: str) -> None:
    if value.device != reference.device:
        raise ValueError(f"{op}: {name} is on {value.device} but {reference_name} is on {reference.device}")


def nonnegative_number(op: str, name: str, value) -> float:
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise ValueError(f"{op}: {name} must be a number, got a tensor of shape {tuple(value.shape)}")
        value = value.item()
    value = float(value)
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"{op}: {name} must be a finite number >= 0, got {value}")
    return value


def number(op: str, name: str, value, *, low=-math.inf, high=math.inf, low_open=False, high_open=False) -> float:
    """A finite real number in [low, high] (``low_open`` / ``high_open`` exclude the bound) as a float; ValueError
    naming ``name`` otherwise (TypeError for a value that is not a number)."""
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise ValueError(f"{op}: {name} must be a number, got a tensor of shape {tuple(value.shape)}")
        value = value.item()
    if not isinstance(value, numbers.Real):
        raise TypeError(f"{op}: {name} must be a number, got {type(value).__name__}")
    value = float(value)
    below = value <= low if low_open else value < low
    above = value >= high if high_open else value > high
    if not math.isfinite(value) or below or above:
        left = "(" if low_open or low == -math.inf else "["
        right = ")" if high_open or high == math.inf else "]"
        interval = f"{left}{low:g}, {high:g}{right}"
        domain = "a finite number" + ("" if interval == "(-inf, inf)" else f" in {interval}")
        raise ValueError(f"{op}: {name} must be {domain}, got {value}")
    return value


def accumulate_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp32 accumulation for fp16/bf16/fp32, fp64 for fp64 (as the kernels do)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def labels(op: str, name: str, value, batch: int, num_classes: int) -> None:
    """[B] int64 labels in [0, num_classes) (the range check is skipped while torch.compile traces)."""
    tensor(op, name, value, dims=1, nonempty=False)
    if value.dtype != torch.int64:
        raise ValueError(f"{op}: {name} must be int64, got {value.dtype}")
    if value.shape[0] != batch:
        raise ValueError(f"{op}: {name} must be [B]=[{batch}], got {tuple(value.shape)}")
    if torch.compiler.is_compiling() or value.numel() == 0:
        return
    low, high = int(value.min()), int(value.max())
    if low < 0 or high >= num_classes:
        bad = low if low < 0 else high
        raise ValueError(f"{op}: {name} must be in [0, {num_classes}), got {bad}")


def expert_loss_inputs(op: str, expert_logits, target, class_counts, max_experts: int = 64) -> None:
    """The checks every per-expert loss shares: logits [E, B, C], int64 target [B] in range, positive counts [C]."""
    from fastlt.ops import _lt_constants

    tensor(op, "expert_logits", expert_logits, dims=3, floating=True)
    num_experts, batch, num_classes = expert_logits.shape
    if num_experts > max_experts:
        raise ValueError(f"{op}: expert_logits has {num_experts} experts; at most {max_experts} are supported")
    labels(op, "target", target, batch, num_classes)
    same_device(op, "target", target, expert_logits, "expert_logits")
    _lt_constants.check_class_counts(op, class_counts, num_classes)
