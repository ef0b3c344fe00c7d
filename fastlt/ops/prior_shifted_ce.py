"""fastlt.ops.prior_shifted_ce: cross-entropy of prior-shifted logits summed over experts, fused.

    L = sum_k (1 / B) * sum_i CE(z_k(x_i) + tau_k * log(pi), y_i),     pi_j = n_j / sum(n)

Balanced Softmax is one expert with tau = 1; logit-adjusted training uses other taus. Shifts:
``_lt_constants.prior_logit_shifts``. Per-row math: csrc/include/fastlt/prior_shifted_ce.h; kernels:
csrc/cpu/prior_shifted_ce.cpp, csrc/cuda/prior_shifted_ce.cu, kernels/prior_shifted_ce.py; tests:
tests/ops/test_prior_shifted_ce.py, tests/ops/test_loss_backends.py; benchmark: bench/losses.py.

As ride_loss, the kernel computes the loss and d loss / d logits in one pass per row and the backward only scales
the saved gradient (second-order gradients and torch.func: the eager formula, fastlt/ops/_fused_loss.py).
"""

import torch
import torch.nn.functional as F

from fastlt import _extension
from fastlt.ops import _backend, _checks, _fused_loss, _lt_constants

OP = "fastlt.prior_shifted_ce"


def prior_shifted_ce_reference(expert_logits, target, class_counts, *, taus, label_smoothing=0.0):
    """Eager PyTorch reference written from the formula; fp32 math for fp16/bf16 inputs."""
    expert_logits, target, class_counts, tau_table = _prepare(expert_logits, target, class_counts, taus,
                                                              label_smoothing)
    shifts = _lt_constants.prior_logit_shifts(class_counts.to(expert_logits.device), tau_table)
    return _loss_formula(expert_logits, target, shifts, label_smoothing)


def _loss_formula(expert_logits, target, logit_shifts, label_smoothing=0.0):
    """The loss from the fused op's arguments in eager PyTorch: the reference, and the fused ops' second-order path."""
    logits = expert_logits.to(_checks.accumulate_dtype(expert_logits.dtype))
    shifts = logit_shifts.to(logits)
    target = target.to(logits) if target.is_floating_point() else target
    return sum(F.cross_entropy(expert + shift, target, label_smoothing=label_smoothing)
               for expert, shift in zip(logits, shifts))


def prior_shifted_ce(expert_logits: torch.Tensor, target: torch.Tensor, class_counts: torch.Tensor, *,
                     taus, label_smoothing: float = 0.0) -> torch.Tensor:
    """Sum over experts of the cross-entropy of ``z_k + tau_k * log(pi)``, with its gradient in one pass.

    Args:
        expert_logits: ``[E, B, C]`` logits, any strides; fp32/fp16/bf16 (accumulated in fp32) or fp64. A single
            head's ``[B, C]`` logits are read as E = 1.
        target: ``[B]`` integer labels in ``[0, C)`` (int32 and narrower are widened to int64), or ``[B, C]``
            class probabilities (soft targets: Mixup / CutMix), finite and >= 0, as ``F.cross_entropy`` takes them.
        class_counts: ``[C]`` positive training counts per class (a tensor or a list; pi = counts / counts.sum()).
            A class without training samples is refused: its shift log(pi) would be -inf.
        taus: E finite numbers (a sequence or a 1-D tensor), one per expert, or one number for every expert.
        label_smoothing: in [0, 1], as ``F.cross_entropy``'s (applied to each expert's shifted logits).

    Soft targets and ``label_smoothing > 0`` run the eager formula (``F.cross_entropy`` per expert), not the fused
    kernel, on every backend.

    Returns the scalar loss in the accumulation dtype (fp32 for fp16/bf16 inputs; the gradient keeps
    ``expert_logits.dtype``), differentiable in ``expert_logits``. A NaN logit makes the loss and the gradient of
    its row NaN.

    >>> counts = torch.linspace(500, 5, 100).floor()
    >>> loss = fastlt.ops.prior_shifted_ce(torch.randn(1, 8, 100), torch.randint(0, 100, (8,)), counts, taus=[1.0])
    """
    expert_logits, target, class_counts, tau_table = _prepare(expert_logits, target, class_counts, taus,
                                                              label_smoothing)
    shifts = _lt_constants.prior_logit_shifts(class_counts.to(expert_logits.device), tau_table)
    return _shifted_ce(expert_logits, target, shifts, label_smoothing)


def shifted_ce(expert_logits: torch.Tensor, target: torch.Tensor, logit_shifts: torch.Tensor, *,
               label_smoothing: float = 0.0) -> torch.Tensor:
    """Sum over experts of the cross-entropy of ``z_k + logit_shifts[k]``: :func:`prior_shifted_ce` with an
    explicit ``[E, C]`` shift table, for shifts that are not ``tau_k * log(pi)`` (SADE's backward expert
    ``log pi - tau * log pi_bar``). Same kernel, arguments and return value as :func:`prior_shifted_ce`; the shifts
    must be finite.

    >>> shifts = torch.zeros(2, 10)                             # two experts, no shift: plain CE summed
    >>> loss = fastlt.ops.shifted_ce(torch.randn(2, 4, 10), torch.tensor([0, 3, 9, 2]), shifts)
    """
    target, _ = _checks.loss_conveniences(target, None)
    if isinstance(expert_logits, torch.Tensor) and expert_logits.dim() == 2:  # one head: E = 1
        expert_logits = expert_logits.unsqueeze(0)
    _checks.tensor(OP, "expert_logits", expert_logits, dims=3, floating=True)
    if target.is_floating_point():
        _checks.probability_targets(OP, "target", target, expert_logits.shape[1], expert_logits.shape[2])
    else:
        _checks.fused_loss_inputs(OP, "expert_logits", expert_logits, target, _checks.MAX_EXPERTS)
    _checks.fused_loss_table(OP, "logit_shifts", logit_shifts, expert_logits.shape[::2], expert_logits)
    if not torch.compiler.is_compiling() and not bool(torch.isfinite(logit_shifts).all()):
        raise ValueError(f"{OP}: logit_shifts must be finite")
    _checks.number(OP, "label_smoothing", label_smoothing, low=0.0, high=1.0)
    return _shifted_ce(expert_logits, target, logit_shifts, label_smoothing)


def _shifted_ce(expert_logits, target, logit_shifts, label_smoothing):
    """The checked loss on the active backend: the fused kernel, or the eager formula where the kernel does not
    apply (soft targets, label smoothing, torch.func transforms)."""
    backend = _backend.resolve(expert_logits, OP)
    eager_only = target.is_floating_point() or label_smoothing != 0
    if backend == "reference" or eager_only or _fused_loss.use_reference(expert_logits):
        return _loss_formula(expert_logits, target, logit_shifts, label_smoothing)
    shifts = logit_shifts.to(_checks.accumulate_dtype(expert_logits.dtype))
    compute_grad = expert_logits.requires_grad and torch.is_grad_enabled()
    fused_op = torch.ops.fastlt.prior_shifted_ce_triton if backend == "triton" else torch.ops.fastlt.prior_shifted_ce
    loss, _ = fused_op(expert_logits, target, shifts, compute_grad)
    return loss


def _prepare(expert_logits, target, class_counts, taus, label_smoothing):
    """The arguments checked, in the kernels' form: (expert_logits [E, B, C], target, class_counts, taus [E])."""
    target, class_counts = _checks.loss_conveniences(target, class_counts)
    if isinstance(expert_logits, torch.Tensor) and expert_logits.dim() == 2:  # one head: E = 1
        expert_logits = expert_logits.unsqueeze(0)
    tau_table = _validate(expert_logits, target, class_counts, taus)
    _checks.number(OP, "label_smoothing", label_smoothing, low=0.0, high=1.0)
    return expert_logits, target, class_counts, tau_table


def _validate(expert_logits, target, class_counts, taus) -> torch.Tensor:
    """Checks the arguments; returns the taus as an fp64 [E] tensor."""
    _checks.expert_loss_inputs(OP, expert_logits, target, class_counts, _checks.MAX_EXPERTS, soft_targets=True,
                               why_positive="the log prior of a class without training samples is -inf")
    num_experts = expert_logits.shape[0]
    tau_table = torch.as_tensor(taus, dtype=torch.float64)
    if tau_table.dim() == 0:  # one tau for every expert
        tau_table = tau_table.expand(num_experts)
    if tuple(tau_table.shape) != (num_experts,):
        raise ValueError(f"{OP}: taus must hold one value per expert ({num_experts}), got shape "
                         f"{tuple(tau_table.shape)}")
    if not torch.compiler.is_compiling() and not bool(torch.isfinite(tau_table).all()):
        raise ValueError(f"{OP}: taus must be finite, got {tau_table.tolist()}")
    return tau_table


if _extension.AVAILABLE:
    _fused_loss.register("fastlt::prior_shifted_ce", _loss_formula)


@torch.library.custom_op("fastlt::prior_shifted_ce_triton", mutates_args=())
def _prior_shifted_ce_triton(expert_logits: torch.Tensor, target: torch.Tensor, logit_shifts: torch.Tensor,
                             compute_grad: bool) -> tuple[torch.Tensor, torch.Tensor]:
    from fastlt.kernels import prior_shifted_ce as kernel

    _checks.fused_loss_inputs(OP, "expert_logits", expert_logits, target, _checks.MAX_EXPERTS)
    _checks.fused_loss_table(OP, "logit_shifts", logit_shifts, expert_logits.shape[::2], expert_logits)
    return kernel.forward(expert_logits, target, logit_shifts, compute_grad)


_fused_loss.register("fastlt::prior_shifted_ce_triton", _loss_formula)
