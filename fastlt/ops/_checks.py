"""Argument checks shared by the public op functions: clear ValueErrors that name the op and the argument."""

import math
import numbers

import torch

from fastlt._formulas import REDUCTIONS, accumulate_dtype  # noqa: F401 - shared with kernels/

MAX_EXPERTS = 64  # the most experts / branches a kernel takes: kMaxExperts in csrc/include/fastlt/common.h

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)

DEFAULT_IGNORE_INDEX = -100  # torch.nn.functional.cross_entropy's


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


def reduction(op: str, value) -> int:
    """The fused ops' code of a reduction name: 0 "none", 1 "mean", 2 "sum"."""
    if not isinstance(value, str) or value not in REDUCTIONS:
        raise ValueError(f"{op}: reduction must be one of {REDUCTIONS}, got {value!r}")
    return REDUCTIONS.index(value)


INT64_RANGE = (-(2**63), 2**63 - 1)  # the kernels take ignore_index as an int64


def ignore_index(op: str, value) -> int:
    """An integer label value whose rows a loss skips (any int64; negative ones cannot collide with a class)."""
    if isinstance(value, torch.Tensor) and value.numel() == 1 and not value.is_floating_point():
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{op}: ignore_index must be an int, got {type(value).__name__}")
    if not INT64_RANGE[0] <= value <= INT64_RANGE[1]:
        raise ValueError(f"{op}: ignore_index must be an int64, in [-2**63, 2**63 - 1], got {value}")
    return int(value)


def chunk_size(op: str, value) -> None:
    """A fused head's classes per chunk: a positive int, or None (the op picks one)."""
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        raise ValueError(f"{op}: chunk_size must be a positive int or None, got {value!r}")


def labels(op: str, name: str, value, batch: int, num_classes: int, ignore_index=None) -> None:
    """[B] int64 labels in [0, num_classes), or equal to ``ignore_index`` (rows the loss skips); the range check is
    skipped while torch.compile traces."""
    if isinstance(value, torch.Tensor) and value.is_floating_point() and value.dim() == 2:
        raise ValueError(f"{op}: {name} must be [B] int64 labels; this loss takes no probability (soft) targets, got "
                         f"shape {tuple(value.shape)}")
    tensor(op, name, value, dims=1, nonempty=False)
    if value.dtype != torch.int64:
        raise ValueError(f"{op}: {name} must be int64, got {value.dtype}")
    if value.shape[0] != batch:
        raise ValueError(f"{op}: {name} must be [B]=[{batch}], got {tuple(value.shape)}")
    if torch.compiler.is_compiling() or value.numel() == 0:
        return
    low, high = (int(bound) for bound in torch.aminmax(value))
    if ignore_index is not None and (low < 0 or high >= num_classes):  # the extremes may be ignored rows' labels
        value = value[value != ignore_index]
        if value.numel() == 0:
            return
        low, high = (int(bound) for bound in torch.aminmax(value))
    if low < 0 or high >= num_classes:
        bad = low if low < 0 else high
        raise ValueError(f"{op}: {name} must be in [0, {num_classes}), got {bad}")


def loss_conveniences(target, class_counts):
    """What the loss ops accept beyond their kernels' types, converted: integer targets of any width (int32 from
    numpy or a loader) become int64; class counts given as a list / tuple / array become an fp64 tensor."""
    if isinstance(target, torch.Tensor) and target.dtype in (torch.int8, torch.uint8, torch.int16, torch.int32):
        target = target.long()
    if class_counts is not None and not isinstance(class_counts, torch.Tensor):
        try:
            class_counts = torch.as_tensor(class_counts, dtype=torch.float64)
        except (TypeError, ValueError, RuntimeError):
            pass  # expert_loss_inputs names the argument
    return target, class_counts


def probability_targets(op: str, name: str, value, batch: int, num_classes: int) -> None:
    """[B, C] floating targets, finite and >= 0 (class probabilities; the value check is skipped under compile)."""
    tensor(op, name, value, dims=2, floating=True, nonempty=False)
    if tuple(value.shape) != (batch, num_classes):
        raise ValueError(f"{op}: {name} as probabilities must be [B, C]=[{batch}, {num_classes}], got "
                         f"{tuple(value.shape)}")
    if not torch.compiler.is_compiling() and not bool((torch.isfinite(value) & (value >= 0)).all()):
        raise ValueError(f"{op}: {name} probabilities must be finite and >= 0")


def expert_loss_inputs(op: str, expert_logits, target, class_counts, max_experts: int = 64,
                       why_positive: str = "", soft_targets: bool = False, ignore_index=None) -> None:
    """The checks every per-expert loss shares: logits [E, B, C], int64 target [B] in range (or ``ignore_index``),
    positive counts [C]."""
    from fastlt.ops import _lt_constants

    tensor(op, "expert_logits", expert_logits, dims=3, floating=True)
    num_experts, batch, num_classes = expert_logits.shape
    if num_experts > max_experts:
        raise ValueError(f"{op}: expert_logits has {num_experts} experts; at most {max_experts} are supported")
    if soft_targets and isinstance(target, torch.Tensor) and target.is_floating_point():
        probability_targets(op, "target", target, batch, num_classes)
    else:
        labels(op, "target", target, batch, num_classes, ignore_index)
    same_device(op, "target", target, expert_logits, "expert_logits")
    _lt_constants.check_class_counts(op, class_counts, num_classes, why_positive)


# ---- the fused-loss ops' own checks (csrc/loss_checks.h for the C++ ops; these for the Triton ops called raw) ----


def fused_loss_inputs(op: str, logits_name: str, logits, target, max_experts: int = 64, ignore_index=None) -> None:
    """[E, B, C] floating logits (1..max_experts experts, B, C >= 1) and [B] int64 labels in [0, C) (or
    ``ignore_index``) on their device."""
    tensor(op, logits_name, logits, dims=3, floating=True)
    if not 1 <= logits.shape[0] <= max_experts:
        raise ValueError(f"{op}: {logits_name} must have 1..{max_experts} experts / branches, got {logits.shape[0]}")
    labels(op, "target", target, logits.shape[1], logits.shape[2], ignore_index)
    same_device(op, "target", target, logits, logits_name)


def fused_loss_table(op: str, name: str, table, shape: tuple, logits, *, dtype=None) -> None:
    """A per-class table of exactly ``shape`` on the logits' device, floating (or of ``dtype``)."""
    tensor(op, name, table, nonempty=False)
    if tuple(table.shape) != tuple(shape):
        raise ValueError(f"{op}: {name} must be {list(shape)}, got {list(table.shape)}")
    if dtype is None and table.dtype not in FLOAT_DTYPES:
        raise ValueError(f"{op}: {name} must be floating point, got {table.dtype}")
    if dtype is not None and table.dtype != dtype:
        raise ValueError(f"{op}: {name} must be {dtype}, got {table.dtype}")
    same_device(op, name, table, logits, "the logits")

