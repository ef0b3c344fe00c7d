"""fastlt.ops.ride_loss: RIDE's stage-1 loss (per-expert LDAM-DRW + distribution-aware diversity), fused.

    L = sum_k [ CE_w(z_k - s * m_y * onehot(y), y) + lambda * Tbar^2 * KL(pbar || softmax(z_k / T)) ]

with ``pbar = softmax(mean_k(z_k) / T)`` detached, KL reduced as ``batchmean`` and the CE weighted (DRW) or not: the
``reduction="mean"`` loss. Sum and per-row reductions, ignored rows and the loss's components: docs/methods.md 6.5.
Constants (margins m, DRW weights w, temperatures T): fastlt/ops/_lt_constants.py. Per-row math:
csrc/include/fastlt/ride_loss.h; kernels: csrc/cpu/ride_loss.cpp, csrc/cuda/ride_loss.cu, kernels/ride_loss.py;
tests: tests/ops/test_ride_loss.py; benchmark: bench/losses.py.
docs/methods.md 3.2 and 6.3 give the definition.

The kernels compute the loss and d loss / d logits in one pass per row; the backward only scales the saved gradient
by ``grad_output`` (in place in eager mode, so fwd+bwd needs no memory beyond one gradient). Second-order gradients
(``create_graph=True``) and ``torch.func`` transforms go through the eager formula (fastlt/ops/_fused_loss.py).
"""

import torch
import torch.nn.functional as F

from fastlt import _extension
from fastlt.ops import _backend, _checks, _fused_loss, _library, _lt_constants, _selfcheck

OP = "fastlt.ride_loss"
# The arguments of fastlt::ride_loss, as csrc/cpu/ride_loss.cpp defines them (its Triton overload takes the same).
SCHEMA = ("(Tensor expert_logits, Tensor target, Tensor target_margins, Tensor? class_weights, Tensor temperatures, "
          "float diversity_factor, int reduction, int ignore_index, bool compute_grad) -> (Tensor, Tensor, Tensor)")


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
                        temperature_factor=0.05, base_temperature=1.0, drw=False, drw_beta=0.9999, reduction="mean",
                        ignore_index=_checks.DEFAULT_IGNORE_INDEX, return_components=False):
    """Eager PyTorch reference written from the formulas (docs/methods.md 6.3, reductions and ignored rows as in 6.5);
    fp32 math for fp16/bf16 inputs. Same arguments and results as :func:`ride_loss`."""
    target, class_counts = _checks.loss_conveniences(target, class_counts)
    reduction_code, ignore_index = _validate(
        expert_logits, target, class_counts, reduction, ignore_index, scale=scale, max_margin=max_margin,
        diversity_factor=diversity_factor, temperature_factor=temperature_factor, base_temperature=base_temperature,
        drw_beta=drw_beta)
    tables = ride_tables(class_counts, scale=scale, max_margin=max_margin, temperature_factor=temperature_factor,
                         base_temperature=base_temperature, drw=drw, drw_beta=drw_beta,
                         dtype=_checks.accumulate_dtype(expert_logits.dtype), device=expert_logits.device)
    row_terms = _row_terms_formula(expert_logits, target, *tables, diversity_factor, reduction_code, ignore_index)
    loss = _fused_loss.reduce_row_terms(row_terms, reduction_code)
    if return_components:
        return loss, _components(row_terms, reduction_code)
    return loss


def _row_terms_formula(expert_logits, target, target_margins, class_weights, temperatures, diversity_factor,
                       reduction, ignore_index):
    """The ``[B, 2E]`` row terms in eager PyTorch (columns: each expert's CE, then each expert's diversity term), each
    already divided by its normaliser under mean (docs/methods.md 6.5); an ignored row's terms are 0."""
    kept = target != ignore_index
    # An ignored row's logits are not read (a NaN there changes nothing, as in the kernels) and get a zero gradient.
    logits = torch.where(kept[:, None], expert_logits, 0).to(_checks.accumulate_dtype(expert_logits.dtype))
    num_classes = logits.shape[-1]
    target_margins, temperatures = target_margins.to(logits), temperatures.to(logits)
    labels = torch.where(kept, target, 0)  # an ignored row's label is never an index
    row_weights = kept.to(logits) if class_weights is None else class_weights.to(logits)[labels] * kept
    ce_coefs, div_coef = row_weights, diversity_factor * temperatures.mean() ** 2
    if reduction == 1:  # mean: W = the kept rows' DRW weights (their count without DRW), N = the kept rows
        weight_total, kept_rows = row_weights.sum(), kept.sum().to(logits)
        ce_coefs = torch.where(weight_total > 0, ce_coefs / weight_total, 0.0)
        div_coef = torch.where(kept_rows > 0, div_coef / kept_rows, 0.0)
    with torch.no_grad():
        mean_distribution = F.softmax(logits.mean(0) / temperatures, dim=-1)
        negative_entropy = torch.special.xlogy(mean_distribution, mean_distribution).sum(-1)
    target_onehot = F.one_hot(labels, num_classes).to(logits)
    ce_terms, diversity_terms = [], []
    for expert in logits:
        margin_logits = expert - target_margins[labels][:, None] * target_onehot
        ce_terms.append(ce_coefs * F.cross_entropy(margin_logits, labels, reduction="none"))
        if diversity_factor == 0:  # the term is dropped (as the kernels do), not computed and multiplied by 0
            diversity_terms.append(torch.zeros_like(ce_terms[-1]))
            continue
        expert_log_distribution = F.log_softmax(expert / temperatures, dim=-1)
        kl = negative_entropy - (mean_distribution * expert_log_distribution).sum(-1)  # F.kl_div's, per row
        diversity_terms.append(torch.where(kept, div_coef * kl, 0.0))
    return torch.stack(ce_terms + diversity_terms, dim=1)


def _loss_formula(expert_logits, target, target_margins, class_weights, temperatures, diversity_factor, reduction,
                  ignore_index):
    """The loss from the fused op's arguments in eager PyTorch: the fused ops' second-order path."""
    row_terms = _row_terms_formula(expert_logits, target, target_margins, class_weights, temperatures,
                                   diversity_factor, reduction, ignore_index)
    return _fused_loss.reduce_row_terms(row_terms, reduction)


def _components(row_terms, reduction):
    """``return_components``: {"ce": [E], "diversity": [E]} (a leading [B] under none), adding up to the loss."""
    num_experts = row_terms.shape[1] // 2
    names = {"ce": slice(0, num_experts), "diversity": slice(num_experts, 2 * num_experts)}
    return _fused_loss.components(row_terms, names, reduction)


def ride_loss(expert_logits: torch.Tensor, target: torch.Tensor, class_counts: torch.Tensor, *, scale: float = 30.0,
              max_margin: float = 0.5, diversity_factor: float = -0.45, temperature_factor: float = 0.05,
              base_temperature: float = 1.0, drw: bool = False, drw_beta: float = 0.9999, reduction: str = "mean",
              ignore_index: int = _checks.DEFAULT_IGNORE_INDEX, return_components: bool = False):
    """RIDE's stage-1 loss over all experts, computed with its gradient in one pass over the logits.

    Args:
        expert_logits: ``[E, B, C]`` logits of E experts, already multiplied by ``scale`` (cosine classifier), any
            strides; fp32/fp16/bf16 (accumulated in fp32) or fp64.
        target: ``[B]`` integer labels in ``[0, C)`` or equal to ``ignore_index`` (int32 and narrower are widened to
            int64).
        class_counts: ``[C]`` positive training counts per class (a tensor or a list). A class without training
            samples is refused: its LDAM margin would be infinite.
        scale: LDAM's ``s``: the target logit loses ``scale * m_y``.
        max_margin: LDAM margin of the rarest class.
        diversity_factor: lambda of the diversity term (negative in RIDE: experts are pushed apart). ``0`` drops
            the term; unlike the official code it does not switch to a collaborative loss.
        temperature_factor, base_temperature: the per-class diversity temperatures (used with ``drw``).
        drw: deferred re-weighting phase on (RIDE: epochs > 160): DRW class weights and per-class temperatures.
        drw_beta: beta of the effective-number weights.
        reduction: ``"mean"`` (RIDE's loss: the CE terms divided by W, the sum of the kept rows' DRW weights, or
            their count without DRW; the diversity terms by N, the number of kept rows), ``"sum"`` (no normaliser)
            or ``"none"`` (the ``[B]`` per-row losses, which add up to the ``"sum"`` loss). docs/methods.md 6.5.
        ignore_index: rows whose label equals it add nothing to the loss or to W and N, and get a zero gradient.
            When every row is ignored the loss is 0 with a zero gradient (``F.cross_entropy`` gives NaN there).
        return_components: also return ``{"ce": [E], "diversity": [E]}``, each expert's CE and diversity term,
            reduced as the loss (a leading ``[B]`` dimension under ``"none"``), detached; they add up to the loss.

    Returns the loss (scalar, or ``[B]`` under ``"none"``) in the accumulation dtype (fp32 for fp16/bf16 inputs,
    whose loss can exceed the fp16 range; the gradient keeps ``expert_logits.dtype``), differentiable in
    ``expert_logits``; ``(loss, components)`` with ``return_components``. A NaN logit in a kept row makes the loss
    and the gradient of its row NaN.

    >>> logits = torch.randn(3, 8, 100) * 30                   # 3 experts, batch 8, 100 classes
    >>> counts = torch.linspace(500, 5, 100).floor()
    >>> loss = fastlt.ops.ride_loss(logits, torch.randint(0, 100, (8,)), counts, drw=True)
    >>> loss, parts = fastlt.ops.ride_loss(logits, torch.randint(0, 100, (8,)), counts, return_components=True)
    >>> parts["ce"].shape, parts["diversity"].shape
    (torch.Size([3]), torch.Size([3]))
    """
    target, class_counts = _checks.loss_conveniences(target, class_counts)
    reduction_code, ignore_index = _validate(
        expert_logits, target, class_counts, reduction, ignore_index, scale=scale, max_margin=max_margin,
        diversity_factor=diversity_factor, temperature_factor=temperature_factor, base_temperature=base_temperature,
        drw_beta=drw_beta)
    backend = _backend.resolve(OP, expert_logits)
    if backend == "reference":
        return ride_loss_reference(expert_logits, target, class_counts, scale=scale, max_margin=max_margin,
                                   diversity_factor=diversity_factor, temperature_factor=temperature_factor,
                                   base_temperature=base_temperature, drw=drw, drw_beta=drw_beta, reduction=reduction,
                                   ignore_index=ignore_index, return_components=return_components)
    target_margins, class_weights, temperatures = ride_tables(
        class_counts, scale=scale, max_margin=max_margin, temperature_factor=temperature_factor,
        base_temperature=base_temperature, drw=drw, drw_beta=drw_beta,
        dtype=_checks.accumulate_dtype(expert_logits.dtype), device=expert_logits.device)
    compute_grad = expert_logits.requires_grad and torch.is_grad_enabled()
    loss, _, row_terms = _library.overload("ride_loss", backend)(
        expert_logits, target, target_margins, class_weights, temperatures, float(diversity_factor), reduction_code,
        ignore_index, compute_grad)
    if return_components:
        return loss, _components(row_terms, reduction_code)
    return loss


def _validate(expert_logits, target, class_counts, reduction, ignore_index, **hyperparameters):
    """Every check of the public functions; returns (the reduction's code, ignore_index as an int)."""
    reduction_code = _checks.reduction(OP, reduction)
    ignore_index = _checks.ignore_index(OP, ignore_index)
    _checks.expert_loss_inputs(OP, expert_logits, target, class_counts, _checks.MAX_EXPERTS,
                               why_positive="LDAM's margin n^-1/4 of a class without training samples is infinite",
                               ignore_index=ignore_index)
    validate_hyperparameters(**hyperparameters)
    return reduction_code, ignore_index


def validate_hyperparameters(*, scale, max_margin, diversity_factor, temperature_factor, base_temperature, drw_beta,
                             op=OP, scale_name="scale"):
    """ValueError naming the first hyper-parameter of RIDE's loss outside its domain: the one check of every op and
    module computing the loss (ride_loss and its reference on every backend, linear_ride_loss and its reference,
    RIDELoss, LinearRIDELoss). ``op`` names the caller in the message, ``scale_name`` its name for LDAM's s."""
    _checks.number(op, scale_name, scale, low=0.0)
    _checks.number(op, "max_margin", max_margin, low=0.0)
    _checks.number(op, "diversity_factor", diversity_factor)
    _checks.number(op, "temperature_factor", temperature_factor, low=0.0, high=1.0)
    _checks.number(op, "base_temperature", base_temperature, low=0.0, low_open=True)
    _checks.number(op, "drw_beta", drw_beta, low=0.0, high=1.0, high_open=True)


def _num_terms(expert_logits, *args):
    return 2 * expert_logits.shape[0]


if _extension.AVAILABLE:
    _fused_loss.register("fastlt::ride_loss", _loss_formula, _fused_loss.fake_loss_forward(_num_terms))


def _ride_loss_triton(expert_logits, target, target_margins, class_weights, temperatures, diversity_factor, reduction,
                      ignore_index, compute_grad):
    from fastlt.kernels import ride_loss as kernel

    _checks.fused_loss_inputs(OP, "expert_logits", expert_logits, target, _checks.MAX_EXPERTS, ignore_index)
    num_classes = expert_logits.shape[2]
    _checks.fused_loss_table(OP, "target_margins", target_margins, (num_classes,), expert_logits)
    if class_weights is not None:
        _checks.fused_loss_table(OP, "class_weights", class_weights, (num_classes,), expert_logits)
    _checks.fused_loss_table(OP, "temperatures", temperatures, (num_classes,), expert_logits)
    _checks.number(OP, "diversity_factor", diversity_factor)
    if reduction not in range(len(_checks.REDUCTIONS)):
        raise ValueError(f"{OP}: reduction must be 0 (none), 1 (mean) or 2 (sum), got {reduction}")
    return kernel.forward(expert_logits, target, target_margins, class_weights, temperatures, diversity_factor,
                          reduction, ignore_index, compute_grad)


_library.define_triton("ride_loss", SCHEMA, _ride_loss_triton)
_fused_loss.register("fastlt::ride_loss.triton", _loss_formula, _fused_loss.fake_loss_forward(_num_terms))


@_selfcheck.case(OP)
def selfcheck_case(device, dtype, tiny):
    """The op's self-check (`fastlt doctor`, the CUDA kernel's first use; fastlt/ops/_selfcheck.py): ``(call,
    inputs)``."""
    logits, target, counts = _selfcheck.loss_sample(device, dtype, tiny, scale=10)
    return (lambda x: ride_loss(x, target, counts, drw=True)), (logits,)
