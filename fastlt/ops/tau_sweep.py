"""fastlt.ops.tau_sweep: predictions of a tau-normalised classifier for many taus at once.

    predictions[k, i] = argmax_j  features_i . w_j / max(||w_j||, eps) ** taus[k]  (+ bias_j)

features @ weight.T is computed once (in row blocks) and each tau is an argmax over rescaled raw logits: no K
logit matrices. Math: csrc/include/fastlt/tau_sweep.h; kernels: csrc/cpu/tau_sweep.cpp, csrc/cuda/tau_sweep.cu,
kernels/tau_sweep.py; tests: tests/ops/test_tau_sweep.py; benchmark: bench/ops.py.
"""

from typing import Optional, Sequence, Union

import numpy as np
import torch

from fastlt import _extension
from fastlt.ops import _backend, _checks, _library, _selfcheck
from fastlt.ops.tau_normalize import check_eps, tau_normalize_reference
from fastlt.splits import split_accuracies

OP = "fastlt.tau_sweep"
# The arguments of fastlt::tau_sweep, as csrc/cpu/tau_sweep.cpp defines them (its Triton overload takes the same).
SCHEMA = "(Tensor features, Tensor weight, Tensor taus, Tensor? bias, float eps) -> Tensor"
DEFAULT_TAUS = tuple(round(0.1 * i, 1) for i in range(21))  # Decoupling's grid 0.0, 0.1, ..., 2.0


def tau_sweep_reference(features, weight, taus, *, bias=None, eps=1e-12):
    """Eager reference: one tau-normalised matmul + argmax per tau (what Decoupling's tau_norm.py does)."""
    taus, eps = _validate(features, weight, taus, bias, eps)
    acc = _checks.accumulate_dtype(torch.promote_types(features.dtype, weight.dtype))
    predictions = []
    for tau in taus.tolist():
        logits = features.to(acc) @ tau_normalize_reference(weight.to(acc), tau, eps=eps).t()
        if bias is not None:
            logits = logits + bias.to(acc)
        predictions.append(logits.argmax(1))
    return torch.stack(predictions)


def tau_sweep(
    features: torch.Tensor,
    weight: torch.Tensor,
    taus: Union[torch.Tensor, Sequence[float]] = DEFAULT_TAUS,
    *,
    bias: Optional[torch.Tensor] = None,
    eps: float = 1e-12,
) -> torch.Tensor:
    """Predicted class of every row of ``features`` ``[N, D]`` for every tau in ``taus`` ``[K]``: LongTensor ``[K, N]``.

    Args:
        features: ``[N, D]`` pooled features (e.g. of a validation split).
        weight: ``[C, D]`` stage-1 classifier weight.
        taus: the taus to try (default Decoupling's grid 0.0..2.0 step 0.1); each >= 0.
        bias: optional ``[C]`` added after normalisation (Decoupling's tau-norm drops it: leave None).
        eps: the norm clamp max(||w_j||, eps), a finite number > 0.

    >>> features, targets = torch.randn(50, 16), torch.randint(0, 10, (50,))   # a validation split's features
    >>> weight, taus = torch.randn(10, 16), torch.linspace(0, 2, 21)             # the stage-1 fc.weight
    >>> preds = fastlt.ops.tau_sweep(features, weight, taus)
    >>> preds.shape
    torch.Size([21, 50])
    >>> train_counts = torch.tensor([500, 300, 150, 90, 60, 40, 25, 15, 10, 5])
    >>> rows = fastlt.ops.shot_accuracy_per_tau(preds, targets, train_counts, taus)
    >>> len(rows), sorted(rows[0])
    (21, ['few', 'many', 'medium', 'overall', 'tau'])
    """
    taus, eps = _validate(features, weight, taus, bias, eps)
    backend = _backend.resolve(OP, features)
    if backend == "reference":
        return tau_sweep_reference(features, weight, taus, bias=bias, eps=eps)
    return _library.overload("tau_sweep", backend)(features, weight, taus, bias, eps)


def shot_accuracy_per_tau(predictions, targets, class_counts, taus=None):
    """Turn ``tau_sweep`` predictions into accuracy rows, one per tau.

    Every accuracy is the mean of per-class accuracies (classes without evaluation samples are left out); many /
    medium / few use the training counts (> 100, 20..100, < 20 images; ``fastlt.splits.split_accuracies``, as
    ``fastlt.engine.evaluate`` reports them). Returns ``[{"tau", "overall", "many", "medium", "few"}, ...]`` with
    accuracies in percent (NaN for an empty split).
    """
    predictions = torch.as_tensor(predictions)
    if predictions.dim() == 1:
        predictions = predictions.unsqueeze(0)
    targets = torch.as_tensor(targets, dtype=torch.long, device=predictions.device)
    class_counts = np.asarray(class_counts)
    num_classes = len(class_counts)
    if predictions.shape[1] != targets.shape[0]:
        raise ValueError("shot_accuracy_per_tau: predictions [K, N] and targets [N] disagree on N")
    if targets.numel() and (int(targets.min()) < 0 or int(targets.max()) >= num_classes):
        raise ValueError(f"shot_accuracy_per_tau: targets must lie in [0, {num_classes})")
    taus = [None] * predictions.shape[0] if taus is None else _row_taus(taus, predictions.shape[0])
    correct = (predictions == targets).double()
    per_class_correct = torch.zeros(predictions.shape[0], num_classes, dtype=torch.float64, device=predictions.device)
    per_class_correct.index_add_(1, targets, correct)
    samples = torch.bincount(targets, minlength=num_classes).double()
    per_class = (100.0 * per_class_correct / samples).cpu().numpy()  # 0 / 0 = NaN: a class without samples
    rows = []
    for tau, row in zip(taus, per_class):
        split = split_accuracies(row, class_counts)
        rows.append({"tau": tau, "overall": split["class_mean"], "many": split["many"], "medium": split["medium"],
                     "few": split["few"]})
    return rows


def _row_taus(taus, num_rows):
    """The taus of shot_accuracy_per_tau's rows as floats: one per row of predictions."""
    values = torch.as_tensor(taus, dtype=torch.float64)
    if values.dim() > 1 or values.numel() != num_rows:
        raise ValueError(
            f"shot_accuracy_per_tau: taus must hold one value per row of predictions ({num_rows}), got shape "
            f"{tuple(values.shape)}"
        )
    return values.reshape(-1).tolist()


def _validate(features, weight, taus, bias, eps):
    """The one argument check of every backend (the wrapper, the reference and the Triton op call it; the C++ op
    runs the same checks, csrc/ops_common.h check_tau_sweep_inputs). Returns (taus on the features' device, eps)."""
    _checks.tensor(OP, "features", features, dims=2, floating=True)
    _checks.tensor(OP, "weight", weight, dims=2, floating=True)
    _checks.same_device(OP, "weight", weight, features, "features")
    if features.shape[1] != weight.shape[1]:
        raise ValueError(
            f"{OP}: features [N, D] and weight [C, D] disagree on D ({features.shape[1]} vs {weight.shape[1]})"
        )
    taus = torch.as_tensor(taus, dtype=torch.float64) if not isinstance(taus, torch.Tensor) else taus
    _checks.tensor(OP, "taus", taus, dims=1, floating=True)
    taus = taus.to(device=features.device)
    if not torch.compiler.is_compiling() and not bool(((taus >= 0) & torch.isfinite(taus)).all()):
        raise ValueError(f"{OP}: every tau must be a finite number >= 0, got {taus.tolist()}")
    if bias is not None:
        _checks.tensor(OP, "bias", bias, dims=1, floating=True)
        _checks.same_device(OP, "bias", bias, features, "features")
        if bias.shape[0] != weight.shape[0]:
            raise ValueError(f"{OP}: bias must be [C]=[{weight.shape[0]}], got {tuple(bias.shape)}")
    return taus, check_eps(OP, eps)


def _fake(features, weight, taus, bias, eps):
    return features.new_empty((taus.shape[0], features.shape[0]), dtype=torch.long)


if _extension.AVAILABLE:
    _library.register_fake("fastlt::tau_sweep", _fake)


def _tau_sweep_triton(features, weight, taus, bias, eps):
    from fastlt.kernels import tau_sweep as kernel

    taus, eps = _validate(features, weight, taus, bias, eps)
    return kernel.forward(features, weight, taus, bias, eps)


_library.define_triton("tau_sweep", SCHEMA, _tau_sweep_triton)
_library.register_fake("fastlt::tau_sweep.triton", _fake)


@_selfcheck.case(OP)
def selfcheck_case(device, dtype, tiny):
    """The op's self-check (`fastlt doctor`, the CUDA kernel's first use; fastlt/ops/_selfcheck.py): ``(call,
    inputs)``."""
    N, C, D = (6, 5, 8) if tiny else (40, 11, 24)
    features = torch.randn(N, D, device=device).to(dtype)
    weight = (torch.randn(C, D, device=device) * torch.linspace(0.2, 3, C, device=device)[:, None]).to(dtype)
    taus = torch.linspace(0, 2, 5)
    return (lambda f, w: tau_sweep(f, w, taus)), (features, weight)
