"""The fused head's arguments: the checks and derived values that the op (fastlt/ops/linear_ride_loss.py), its pass
overloads (fastlt/ops/_head_passes.py) and the class-parallel head (fastlt/ops/_class_parallel.py) share. Its own
module so that those import it, not each other, with no import circle."""

import torch
import torch.nn.functional as F

from fastlt.ops import _checks

OP = "fastlt.linear_ride_loss"
CHUNK_ELEMENTS = 1 << 21  # default chunk: about 2M logits (E x B x chunk), 8 MB in fp32, per buffer


def default_chunk_size(num_experts: int, batch: int, num_classes: int) -> int:
    """Classes per chunk: a power of two giving about CHUNK_ELEMENTS logits per [E, B, chunk] buffer, in [128, 8192]."""
    per_class = max(1, num_experts * batch)
    chunk = 1 << max(7, min(13, (CHUNK_ELEMENTS // per_class).bit_length() - 1))
    return min(chunk, num_classes)


def op_logits(features, weight, *, normalize_weight, scale, bias=None, row_bias_scales=None):
    """The logits the op takes the loss of: ``features @ W^T`` (normalize_weight: ``scale * features @
    normalize(W)^T``) plus ``row_bias_scales[b] * bias`` (``row_bias_scales`` None: 1)."""
    if normalize_weight:
        logits = scale * (features @ F.normalize(weight, dim=-1).transpose(-1, -2))
    else:
        logits = features @ weight.transpose(-1, -2)
    if bias is None:
        return logits
    return logits + (bias[:, None, :] if row_bias_scales is None else row_bias_scales[:, None] * bias[:, None, :])


def check_head(op, features, weight, target, bias, chunk_size, ignore_index, num_classes=None):
    """The fused head's tensor checks (features, weight, target, bias, chunk_size), errors naming ``op``: for this op
    and the compositions on it (fastlt.ops.linear_prior_shifted_ce). ``num_classes``: the classes the labels index,
    when the weight holds a shard of them (a class-parallel head; default: the weight's)."""
    label_classes = num_classes
    _checks.tensor(op, "weight", weight, dims=3, floating=True)
    _checks.tensor(op, "features", features, dims=(2, 3), floating=True)
    num_experts, num_classes, dim = weight.shape
    if num_experts > _checks.MAX_EXPERTS:
        raise ValueError(f"{op}: weight has {num_experts} experts; at most {_checks.MAX_EXPERTS} are supported")
    if features.dtype != weight.dtype:
        raise ValueError(f"{op}: features must have weight's dtype {weight.dtype}, got {features.dtype}")
    if features.shape[-1] != dim:
        raise ValueError(f"{op}: features must have D={dim} (weight's last dim) features, got {tuple(features.shape)}")
    if features.dim() == 3 and features.shape[0] != num_experts:
        raise ValueError(f"{op}: features must be [B, D] or [E={num_experts}, B, D], got {tuple(features.shape)}")
    _checks.same_device(op, "features", features, weight, "weight")
    _checks.labels(op, "target", target, features.shape[-2], label_classes or num_classes, ignore_index)
    _checks.same_device(op, "target", target, weight, "weight")
    if bias is not None:
        _checks.tensor(op, "bias", bias, floating=True)
        if tuple(bias.shape) != (num_experts, num_classes) or bias.dtype != weight.dtype:
            raise ValueError(f"{op}: bias must be [E, C]=[{num_experts}, {num_classes}] of dtype {weight.dtype}, "
                             f"got {tuple(bias.shape)} {bias.dtype}")
        _checks.same_device(op, "bias", bias, weight, "weight")
    _checks.chunk_size(op, chunk_size)


def check_row_table(name, table, batch, weight):
    """One per-row table (as csrc/linear_ride_loss_setup.h checks it): [B], floating, on the weight's device, finite
    (the value check is skipped while torch.compile traces)."""
    _checks.tensor(OP, name, table, dims=1, floating=True)
    if table.shape[0] != batch:
        raise ValueError(f"{OP}: {name} must be [B]=[{batch}], got {tuple(table.shape)}")
    _checks.same_device(OP, name, table, weight, "weight")
    if not torch.compiler.is_compiling() and not bool(torch.isfinite(table).all()):
        raise ValueError(f"{OP}: {name} must be finite")


def check_row_tables(row_weights, row_bias_scales, bias, batch, weight):
    """The optional per-row tables (`check_row_table`); row weights >= 0; row bias scales only with a bias."""
    for name, table in (("row_weights", row_weights), ("row_bias_scales", row_bias_scales)):
        if table is not None:
            check_row_table(name, table, batch, weight)
    if row_weights is not None and not torch.compiler.is_compiling() and bool((row_weights < 0).any()):
        raise ValueError(f"{OP}: row_weights must be >= 0")
    if row_bias_scales is not None and bias is None:
        raise ValueError(f"{OP}: row_bias_scales needs a bias")
