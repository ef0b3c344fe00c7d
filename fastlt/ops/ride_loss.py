"""fastlt.ops.ride_loss: RIDE's stage-1 loss (per-expert LDAM-DRW + distribution-aware diversity), fused.

    L = sum_k [ CE_w(z_k - s * m_y * onehot(y), y) + lambda * Tbar^2 * KL(pbar || softmax(z_k / T)) ]

with ``pbar = softmax(mean_k(z_k) / T)`` detached, KL reduced as ``batchmean`` and the CE weighted (DRW) or not.
Constants (margins m, DRW weights w, temperatures T): fastlt/ops/_lt_constants.py. Per-row math:
csrc/include/fastlt/ride_loss.h; kernels: csrc/cpu/ride_loss.cpp, csrc/cuda/ride_loss.cu, kernels/ride_loss.py;
tests: tests/ops/test_ride_loss.py, tests/ops/test_loss_backends.py; benchmark: bench/losses.py.
docs/methods.md 3.2 and 6.3 give the definition.

The kernels compute the loss and d loss / d logits in one pass per row; the backward only scales the saved gradient
by ``grad_output`` (in place in eager mode, so fwd+bwd needs no memory beyond one gradient). Second-order gradients
(``create_graph=True``) and ``torch.func`` transforms go through the eager formula (fastlt/ops/_fused_loss.py).
"""

from typing import Optional

import torch
import torch.nn.functional as F

from fastlt import _extension
from fastlt.ops import _backend, _checks, _fused_loss, _lt_constants

OP = "fastlt.ride_loss"


def ride_tables(class_counts, *, scale, max_margin, temperature_factor, base_temperature, drw, drw_beta, dtype,
                device):
    """The kernels' [C] inputs derived from the class counts: (target_margins = scale * m, DRW class weights or
    None, temperatures T)."""
    counts = class_counts.to(device)
    target_margins = (scale * _lt_constants.ldam_margins(counts, max_margin)).to(dtype)
    class_weights = _lt_constants.drw_weights(counts, drw_beta).to(dtype) if drw else None
    temperatures = _lt_constants.ride_temperatures(counts, temperature_factor, base_temperature, drw).to(dtype)
    return target_margins, class_weights, temperatures


def ride_loss_reference(expert_logits, target, class_counts, *, scale=30.0, max_margin=0.5, diversity_factor=-0.45,
                        temperature_factor=0.05, base_temperature=1.0, drw=False, drw_beta=0.9999):
    """Eager PyTorch reference written from the formulas (docs/methods.md 6.3); fp32 math for fp16/bf16 inputs."""
    target, class_counts = _checks.loss_conveniences(target, class_counts)
    _validate(expert_logits, target, class_counts, scale=scale, max_margin=max_margin,
              diversity_factor=diversity_factor, temperature_factor=temperature_factor,
              base_temperature=base_temperature, drw_beta=drw_beta)
    tables = ride_tables(class_counts, scale=scale, max_margin=max_margin, temperature_factor=temperature_factor,
                         base_temperature=base_temperature, drw=drw, drw_beta=drw_beta,
                         dtype=_checks.accumulate_dtype(expert_logits.dtype), device=expert_logits.device)
    return _loss_formula(expert_logits, target, *tables, diversity_factor)


def _loss_formula(expert_logits, target, target_margins, class_weights, temperatures, diversity_factor):
    """The loss from the fused op's arguments in eager PyTorch: the reference, and the fused ops' second-order path."""
    logits = expert_logits.to(_checks.accumulate_dtype(expert_logits.dtype))
    num_classes = logits.shape[-1]
    target_margins, temperatures = target_margins.to(logits), temperatures.to(logits)
    weights = None if class_weights is None else class_weights.to(logits)
    mean_temperature = temperatures.mean()
    with torch.no_grad():
        mean_distribution = F.softmax(logits.mean(0) / temperatures, dim=-1)
    target_onehot = F.one_hot(target, num_classes).to(logits)
    loss = logits.new_zeros(())
    for expert in logits:
        margin_logits = expert - target_margins[target][:, None] * target_onehot
        loss = loss + F.cross_entropy(margin_logits, target, weight=weights)
        if diversity_factor != 0:
            expert_log_distribution = F.log_softmax(expert / temperatures, dim=-1)
            loss = loss + diversity_factor * mean_temperature**2 * F.kl_div(
                expert_log_distribution, mean_distribution, reduction="batchmean")
    return loss


def ride_loss(expert_logits: torch.Tensor, target: torch.Tensor, class_counts: torch.Tensor, *, scale: float = 30.0,
              max_margin: float = 0.5, diversity_factor: float = -0.45, temperature_factor: float = 0.05,
              base_temperature: float = 1.0, drw: bool = False, drw_beta: float = 0.9999) -> torch.Tensor:
    """RIDE's stage-1 loss over all experts, computed with its gradient in one pass over the logits.

    Args:
        expert_logits: ``[E, B, C]`` logits of E experts, already multiplied by ``scale`` (cosine classifier), any
            strides; fp32/fp16/bf16 (accumulated in fp32) or fp64.
        target: ``[B]`` integer labels in ``[0, C)`` (int32 and narrower are widened to int64).
        class_counts: ``[C]`` positive training counts per class (a tensor or a list). A class without training
            samples is refused: its LDAM margin would be infinite.
        scale: LDAM's ``s``: the target logit loses ``scale * m_y``.
        max_margin: LDAM margin of the rarest class.
        diversity_factor: lambda of the diversity term (negative in RIDE: experts are pushed apart). ``0`` drops
            the term; unlike the official code it does not switch to a collaborative loss.
        temperature_factor, base_temperature: the per-class diversity temperatures (used with ``drw``).
        drw: deferred re-weighting phase on (RIDE: epochs > 160): DRW class weights and per-class temperatures.
        drw_beta: beta of the effective-number weights.

    Returns the scalar loss in the accumulation dtype (fp32 for fp16/bf16 inputs, whose loss can exceed the fp16
    range; the gradient keeps ``expert_logits.dtype``), differentiable in ``expert_logits``. A NaN logit makes the
    loss and the gradient of its row NaN.

    >>> logits = torch.randn(3, 8, 100) * 30                   # 3 experts, batch 8, 100 classes
    >>> counts = torch.linspace(500, 5, 100).floor()
    >>> loss = fastlt.ops.ride_loss(logits, torch.randint(0, 100, (8,)), counts, drw=True)
    """
    target, class_counts = _checks.loss_conveniences(target, class_counts)
    _validate(expert_logits, target, class_counts, scale=scale, max_margin=max_margin,
              diversity_factor=diversity_factor, temperature_factor=temperature_factor,
              base_temperature=base_temperature, drw_beta=drw_beta)
    backend = _backend.resolve(expert_logits, OP)
    if backend == "reference" or _fused_loss.use_reference(expert_logits):
        return ride_loss_reference(expert_logits, target, class_counts, scale=scale, max_margin=max_margin,
                                   diversity_factor=diversity_factor, temperature_factor=temperature_factor,
                                   base_temperature=base_temperature, drw=drw, drw_beta=drw_beta)
    target_margins, class_weights, temperatures = ride_tables(
        class_counts, scale=scale, max_margin=max_margin, temperature_factor=temperature_factor,
        base_temperature=base_temperature, drw=drw, drw_beta=drw_beta,
        dtype=_checks.accumulate_dtype(expert_logits.dtype), device=expert_logits.device)
    compute_grad = expert_logits.requires_grad and torch.is_grad_enabled()
    fused_op = torch.ops.fastlt.ride_loss_triton if backend == "triton" else torch.ops.fastlt.ride_loss
    loss, _ = fused_op(expert_logits, target, target_margins, class_weights, temperatures, float(diversity_factor),
                 compute_grad)
    return loss


def _validate(expert_logits, target, class_counts, **hyperparameters):
    _checks.expert_loss_inputs(OP, expert_logits, target, class_counts, _checks.MAX_EXPERTS,
                               why_positive="LDAM's margin n^-1/4 of a class without training samples is infinite")
    validate_hyperparameters(**hyperparameters)


def validate_hyperparameters(*, scale, max_margin, diversity_factor, temperature_factor, base_temperature, drw_beta):
    """ValueError naming the first hyper-parameter outside its domain (every backend, and RIDELoss, check here)."""
    _checks.number(OP, "scale", scale, low=0.0)
    _checks.number(OP, "max_margin", max_margin, low=0.0)
    _checks.number(OP, "diversity_factor", diversity_factor)
    _checks.number(OP, "temperature_factor", temperature_factor, low=0.0, high=1.0)
    _checks.number(OP, "base_temperature", base_temperature, low=0.0, low_open=True)
    _checks.number(OP, "drw_beta", drw_beta, low=0.0, high=1.0, high_open=True)


if _extension.AVAILABLE:
    _fused_loss.register("fastlt::ride_loss", _loss_formula)


@torch.library.custom_op("fastlt::ride_loss_triton", mutates_args=())
def _ride_loss_triton(expert_logits: torch.Tensor, target: torch.Tensor, target_margins: torch.Tensor,
                      class_weights: Optional[torch.Tensor], temperatures: torch.Tensor, diversity_factor: float,
                      compute_grad: bool) -> tuple[torch.Tensor, torch.Tensor]:
    from fastlt.kernels import ride_loss as kernel

    _checks.fused_loss_inputs(OP, "expert_logits", expert_logits, target, _checks.MAX_EXPERTS)
    num_classes = expert_logits.shape[2]
    _checks.fused_loss_table(OP, "target_margins", target_margins, (num_classes,), expert_logits)
    if class_weights is not None:
        _checks.fused_loss_table(OP, "class_weights", class_weights, (num_classes,), expert_logits)
    _checks.fused_loss_table(OP, "temperatures", temperatures, (num_classes,), expert_logits)
    _checks.number(OP, "diversity_factor", diversity_factor)
    return kernel.forward(expert_logits, target, target_margins, class_weights, temperatures, diversity_factor,
                          compute_grad)


_fused_loss.register("fastlt::ride_loss_triton", _loss_formula)
