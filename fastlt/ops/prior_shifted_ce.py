"""fastlt.ops.prior_shifted_ce: cross-entropy of prior-shifted logits summed over experts, fused.

    L = sum_k (1 / N) * sum_{i kept} CE(z_k(x_i) + tau_k * log(pi), y_i),     pi_j = n_j / sum(n)

N is the number of kept rows (labels other than ``ignore_index``) under ``reduction="mean"``; ``"sum"`` drops it and
``"none"`` gives the per-row sums (docs/methods.md 6.5). Balanced Softmax is one expert with tau = 1; logit-adjusted
training uses other taus. Shifts: ``_lt_constants.prior_logit_shifts``. Per-row math:
csrc/include/fastlt/prior_shifted_ce.h; kernels: csrc/cpu/prior_shifted_ce.cpp, csrc/cuda/prior_shifted_ce.cu,
kernels/prior_shifted_ce.py (the op's ``triton`` overload); tests: tests/ops/test_prior_shifted_ce.py;
benchmark: bench/losses.py.

As ride_loss, the kernel computes the row terms and d loss / d logits in one pass per row and the backward only
scales the saved gradient (second-order gradients and torch.func: the eager formula, fastlt/ops/_fused_loss.py).
"""

import torch
import torch.nn.functional as F

from fastlt import _extension
from fastlt.ops import _backend, _checks, _fused_loss, _library, _lt_constants, _selfcheck

OP = "fastlt.prior_shifted_ce"
# The arguments of fastlt::prior_shifted_ce, as csrc/cpu/prior_shifted_ce.cpp defines them (its Triton overload
# takes the same); reduction is a code of _checks.REDUCTIONS. Returns (loss, grad_logits, row_terms [B, E]).
SCHEMA = ("(Tensor expert_logits, Tensor target, Tensor logit_shifts, int reduction, int ignore_index, "
          "bool compute_grad) -> (Tensor, Tensor, Tensor)")
MEAN = _checks.REDUCTIONS.index("mean")


def prior_shifted_ce_reference(expert_logits, target, class_counts, *, taus, label_smoothing=0.0, reduction="mean",
                               ignore_index=_checks.DEFAULT_IGNORE_INDEX, return_components=False):
    """Eager PyTorch reference written from the formula (per-expert ``F.cross_entropy`` rows); fp32 math for
    fp16/bf16 inputs. Same arguments and results as :func:`prior_shifted_ce`."""
    expert_logits, target, class_counts, tau_table, reduction, ignore_index = _prepare(
        expert_logits, target, class_counts, taus, label_smoothing, reduction, ignore_index)
    shifts = _lt_constants.prior_logit_shifts(class_counts.to(expert_logits.device), tau_table)
    row_terms = _row_terms(expert_logits, target, shifts, reduction, ignore_index, label_smoothing)
    return _result(_fused_loss.reduce_row_terms(row_terms, reduction), row_terms, reduction, return_components)


def _row_terms(expert_logits, target, logit_shifts, reduction, ignore_index, label_smoothing=0.0):
    """The ``[B, E]`` row terms in eager PyTorch: expert k's CE of row i over the normaliser, 0 for an ignored row.
    The normaliser is taken at least 1, so an all-ignored batch gives 0 where ``F.cross_entropy`` gives NaN."""
    logits = expert_logits.to(_checks.accumulate_dtype(expert_logits.dtype))
    shifts = logit_shifts.to(logits)
    if target.is_floating_point():  # probabilities: every row is kept
        target = target.to(logits)
        kept_rows = torch.tensor(target.shape[0], device=logits.device)
        ignored = {}
    else:
        kept = target != ignore_index
        kept_rows = kept.sum()
        ignored = dict(ignore_index=ignore_index)
        # an ignored row's logits are replaced, not only its terms: a zero gradient even for inf / NaN logits there
        logits = torch.where(kept[:, None], logits, torch.zeros((), dtype=logits.dtype, device=logits.device))
    terms = torch.stack([F.cross_entropy(expert + shift, target, reduction="none", label_smoothing=label_smoothing,
                                         **ignored) for expert, shift in zip(logits, shifts)], dim=1)
    return terms / kept_rows.clamp_min(1) if reduction == MEAN else terms


def _loss_formula(expert_logits, target, logit_shifts, reduction=MEAN, ignore_index=_checks.DEFAULT_IGNORE_INDEX,
                  label_smoothing=0.0):
    """The loss from the fused op's arguments in eager PyTorch: the fused ops' second-order path."""
    return _fused_loss.reduce_row_terms(
        _row_terms(expert_logits, target, logit_shifts, reduction, ignore_index, label_smoothing), reduction)


def _result(loss, row_terms, reduction, return_components):
    if not return_components:
        return loss
    return loss, _fused_loss.components(row_terms, {"ce": slice(0, row_terms.shape[1])}, reduction)


def prior_shifted_ce(expert_logits: torch.Tensor, target: torch.Tensor, class_counts: torch.Tensor, *,
                     taus, label_smoothing: float = 0.0, reduction: str = "mean",
                     ignore_index: int = _checks.DEFAULT_IGNORE_INDEX, return_components: bool = False):
    """Sum over experts of the cross-entropy of ``z_k + tau_k * log(pi)``, with its gradient in one pass.

    Args:
        expert_logits: ``[E, B, C]`` logits, any strides; fp32/fp16/bf16 (accumulated in fp32) or fp64. A single
            head's ``[B, C]`` logits are read as E = 1.
        target: ``[B]`` integer labels in ``[0, C)`` or equal to ``ignore_index`` (int32 and narrower are widened
            to int64), or ``[B, C]`` class probabilities (soft targets: Mixup / CutMix), finite and >= 0, as
            ``F.cross_entropy`` takes them.
        class_counts: ``[C]`` positive training counts per class (a tensor or a list; pi = counts / counts.sum()).
            A class without training samples is refused: its shift log(pi) would be -inf.
        taus: E finite numbers (a sequence or a 1-D tensor), one per expert, or one number for every expert.
        label_smoothing: in [0, 1], as ``F.cross_entropy``'s (applied to each expert's shifted logits).
        reduction: ``"mean"``, ``"sum"`` or ``"none"`` (below).
        ignore_index: an int; rows with this label are skipped (below).
        return_components: also return the per-expert terms (below).

    ``reduction`` (docs/methods.md 6.5): ``"mean"`` (the default, the papers' loss) divides each expert's sum over
    the kept rows by N, the number of kept rows; ``"sum"`` does not divide; ``"none"`` returns the ``[B]`` per-row
    losses (the sum over experts of a row's CE; they add up to the ``"sum"`` loss). A row is kept unless its label
    equals ``ignore_index`` (default -100, as torch's): an ignored row adds nothing to the loss or to N, its label is
    never read as a class, and its logits get a zero gradient. When every row is ignored the loss is 0 with a zero
    gradient (``F.cross_entropy`` gives NaN). Soft (probability) targets have no ignored rows, as in
    ``F.cross_entropy``: ``ignore_index`` does not apply to them.

    ``return_components=True`` returns ``(loss, components)``: ``{"ce": [E]}``, each expert's CE reduced as the loss
    (``[B, E]`` under ``"none"``), detached, adding up to the loss.

    Soft targets and ``label_smoothing > 0`` run the eager formula (``F.cross_entropy`` per expert, reduced as
    above), not the fused kernel, on every backend.

    Returns the loss in the accumulation dtype (fp32 for fp16/bf16 inputs; the gradient keeps
    ``expert_logits.dtype``): a scalar, or ``[B]`` under ``"none"``; differentiable in ``expert_logits``. A NaN
    logit makes the loss and the gradient of its row NaN.

    >>> counts = torch.linspace(500, 5, 100).floor()
    >>> loss = fastlt.ops.prior_shifted_ce(torch.randn(1, 8, 100), torch.randint(0, 100, (8,)), counts, taus=[1.0])
    """
    expert_logits, target, class_counts, tau_table, reduction, ignore_index = _prepare(
        expert_logits, target, class_counts, taus, label_smoothing, reduction, ignore_index)
    shifts = _lt_constants.prior_logit_shifts(class_counts.to(expert_logits.device), tau_table)
    loss, row_terms = _shifted_ce(expert_logits, target, shifts, label_smoothing, reduction, ignore_index)
    return _result(loss, row_terms, reduction, return_components)


def shifted_ce(expert_logits: torch.Tensor, target: torch.Tensor, logit_shifts: torch.Tensor, *,
               label_smoothing: float = 0.0, reduction: str = "mean", ignore_index: int = _checks.DEFAULT_IGNORE_INDEX,
               return_components: bool = False):
    """Sum over experts of the cross-entropy of ``z_k + logit_shifts[k]``: :func:`prior_shifted_ce` with an
    explicit ``[E, C]`` shift table, for shifts that are not ``tau_k * log(pi)`` (SADE's backward expert
    ``log pi - tau * log pi_bar``). Same kernel, arguments (``reduction``, ``ignore_index``, ``return_components``
    included) and return value as :func:`prior_shifted_ce`; the shifts must be finite. ``reduction="mean"`` divides
    by the number of kept rows (labels other than ``ignore_index``), an all-ignored batch gives 0 with a zero
    gradient, and the components are ``{"ce": [E]}`` (``[B, E]`` under ``"none"``): docs/methods.md 6.5.

    >>> shifts = torch.zeros(2, 10)                             # two experts, no shift: plain CE summed
    >>> loss = fastlt.ops.shifted_ce(torch.randn(2, 4, 10), torch.tensor([0, 3, 9, 2]), shifts)
    """
    target, _ = _checks.loss_conveniences(target, None)
    reduction, ignore_index = _checks.reduction(OP, reduction), _checks.ignore_index(OP, ignore_index)
    if isinstance(expert_logits, torch.Tensor) and expert_logits.dim() == 2:  # one head: E = 1
        expert_logits = expert_logits.unsqueeze(0)
    _checks.tensor(OP, "expert_logits", expert_logits, dims=3, floating=True)
    if target.is_floating_point():
        _checks.probability_targets(OP, "target", target, expert_logits.shape[1], expert_logits.shape[2])
    else:
        _checks.fused_loss_inputs(OP, "expert_logits", expert_logits, target, _checks.MAX_EXPERTS, ignore_index)
    _checks.fused_loss_table(OP, "logit_shifts", logit_shifts, expert_logits.shape[::2], expert_logits)
    if not torch.compiler.is_compiling() and not bool(torch.isfinite(logit_shifts).all()):
        raise ValueError(f"{OP}: logit_shifts must be finite")
    validate_hyperparameters(label_smoothing=label_smoothing)
    loss, row_terms = _shifted_ce(expert_logits, target, logit_shifts, label_smoothing, reduction, ignore_index)
    return _result(loss, row_terms, reduction, return_components)


def _shifted_ce(expert_logits, target, logit_shifts, label_smoothing, reduction, ignore_index):
    """The checked loss and its ``[B, E]`` row terms on the active backend: the fused kernel, or the eager formula
    where the kernel does not apply (soft targets, label smoothing, torch.func transforms)."""
    backend = _backend.resolve(OP, expert_logits)
    eager_only = target.is_floating_point() or label_smoothing != 0
    if backend == "reference" or eager_only:
        row_terms = _row_terms(expert_logits, target, logit_shifts, reduction, ignore_index, label_smoothing)
        return _fused_loss.reduce_row_terms(row_terms, reduction), row_terms
    shifts = logit_shifts.to(_checks.accumulate_dtype(expert_logits.dtype))
    compute_grad = expert_logits.requires_grad and torch.is_grad_enabled()
    fused_op = _library.overload("prior_shifted_ce", backend)
    loss, _, row_terms = fused_op(expert_logits, target, shifts, reduction, ignore_index, compute_grad)
    return loss, row_terms


def _prepare(expert_logits, target, class_counts, taus, label_smoothing, reduction, ignore_index):
    """The arguments checked, in the kernels' form: (expert_logits [E, B, C], target, class_counts, taus [E],
    the reduction's code, ignore_index)."""
    target, class_counts = _checks.loss_conveniences(target, class_counts)
    reduction, ignore_index = _checks.reduction(OP, reduction), _checks.ignore_index(OP, ignore_index)
    if isinstance(expert_logits, torch.Tensor) and expert_logits.dim() == 2:  # one head: E = 1
        expert_logits = expert_logits.unsqueeze(0)
    _checks.expert_loss_inputs(OP, expert_logits, target, class_counts, _checks.MAX_EXPERTS, soft_targets=True,
                               why_positive="the log prior of a class without training samples is -inf",
                               ignore_index=ignore_index)
    tau_table = validate_hyperparameters(taus=taus, label_smoothing=label_smoothing,
                                         num_experts=expert_logits.shape[0])
    return expert_logits, target, class_counts, tau_table, reduction, ignore_index


def validate_hyperparameters(*, label_smoothing, taus=None, num_experts=None, op=OP):
    """ValueError naming the first hyper-parameter of the prior-shifted CE outside its domain: the one check of every
    op and module computing it (prior_shifted_ce, shifted_ce and their reference on every backend,
    linear_prior_shifted_ce, PriorShiftedCE). Returns ``taus`` (E finite numbers, or one for every expert; not
    checked when None) as an fp64 [E] tensor, [E] checked when ``num_experts`` is given."""
    _checks.number(op, "label_smoothing", label_smoothing, low=0.0, high=1.0)
    if taus is None:
        return None
    tau_table = torch.as_tensor(taus, dtype=torch.float64)
    if tau_table.dim() == 0 and num_experts is not None:  # one tau for every expert
        tau_table = tau_table.expand(num_experts)
    if tau_table.dim() > 1 or (num_experts is not None and tuple(tau_table.shape) != (num_experts,)):
        raise ValueError(f"{op}: taus must hold one value per expert ({num_experts}), got shape "
                         f"{tuple(tau_table.shape)}")
    if not torch.compiler.is_compiling() and not bool(torch.isfinite(tau_table).all()):
        raise ValueError(f"{op}: taus must be finite, got {tau_table.tolist()}")
    return tau_table


def _num_terms(expert_logits, *args):
    return expert_logits.shape[0]


if _extension.AVAILABLE:
    _fused_loss.register("fastlt::prior_shifted_ce", _loss_formula, _fused_loss.fake_loss_forward(_num_terms))


def _prior_shifted_ce_triton(expert_logits, target, logit_shifts, reduction, ignore_index, compute_grad):
    from fastlt.kernels import prior_shifted_ce as kernel

    if reduction not in range(len(_checks.REDUCTIONS)):  # as csrc/loss_checks.h's check_reduction
        raise ValueError(f"{OP}: reduction must be 0 (none), 1 (mean) or 2 (sum), got {reduction}")
    _checks.fused_loss_inputs(OP, "expert_logits", expert_logits, target, _checks.MAX_EXPERTS, ignore_index)
    _checks.fused_loss_table(OP, "logit_shifts", logit_shifts, expert_logits.shape[::2], expert_logits)
    return kernel.forward(expert_logits, target, logit_shifts, reduction, ignore_index, compute_grad)


_library.define_triton("prior_shifted_ce", SCHEMA, _prior_shifted_ce_triton)
_fused_loss.register("fastlt::prior_shifted_ce.triton", _loss_formula, _fused_loss.fake_loss_forward(_num_terms))


@_selfcheck.case(OP)
def selfcheck_case(device, dtype, tiny):
    """The op's self-check (`fastlt doctor`, the CUDA kernel's first use; fastlt/ops/_selfcheck.py): ``(call,
    inputs)``."""
    logits, target, counts = _selfcheck.loss_sample(device, dtype, tiny, scale=3)
    taus = [float(k) for k in range(logits.shape[0])]
    return (lambda x: prior_shifted_ce(x, target, counts, taus=taus)), (logits,)
