"""Checks the three fused losses (ride_loss, reslt_loss, prior_shifted_ce) share, each run from the op's own test file:
the fp16 / bf16 / CUDA tolerance table, the second-order / torch.func checks (the fused ops' backward recomputes
through the eager formula when differentiated) and the registered ops' refusal of bad arguments (the Triton ops
check as the C++ ops do)."""

import pytest
import torch
from op_helpers import TOLERANCES, assert_close, backend, long_tail_counts, loss_and_grad, on_cpu, on_cuda, raw_op

from fastlt.ops import prior_shifted_ce, prior_shifted_ce_reference, reslt_loss, reslt_loss_reference
from fastlt.ops import ride_loss, ride_loss_reference


def nested_groups(num_branches, num_classes):
    """Nested groups as ResLT builds them: all classes, then ever smaller tails at high labels."""
    masks = torch.ones(num_branches, num_classes, dtype=torch.bool)
    for branch in range(1, num_branches):
        masks[branch, : num_classes * branch // num_branches] = False
    return masks


def ride_tables(num_classes, weights):
    """Random (margins, class_weights or None, temperatures) tables of the raw ride_loss op."""
    return (torch.rand(num_classes), (torch.rand(num_classes) + 0.5 if weights else None),
            torch.rand(num_classes) + 0.5)


# ---- the dtype tolerance table ----


def tolerance_cases(triton_experts=3, cuda_experts=3):
    """(backend, device, shape, dtype) of a fused loss's tolerance table: fp16 / bf16 on the CPU for the C++ kernel
    (3 x 6 x 300) and Triton (E x 4 x 40, the interpreter is slow), every TOLERANCES dtype on CUDA (E x 64 x 8142)."""
    return ([on_cpu("cpp", (3, 6, 300), dtype) for dtype in [torch.float16, torch.bfloat16]]
            + [on_cpu("triton", (triton_experts, 4, 40), dtype) for dtype in [torch.float16, torch.bfloat16]]
            + [on_cuda(name, (cuda_experts, 64, 8142), dtype) for name in ["cpp", "triton"] for dtype in TOLERANCES])


def check_within_dtype_tolerance(op, reference, name, dtype, logits, target, *args, **kwargs):
    """``op`` on backend ``name`` against its eager ``reference``: the loss in fp32 (or wider), the gradient in the
    logits' dtype, both within TOLERANCES[dtype] (the gradient's atol relative to its largest entry)."""
    expected_loss, expected_grad = loss_and_grad(reference, logits, target, *args, **kwargs)
    with backend(name):
        loss, grad = loss_and_grad(op, logits, target, *args, **kwargs)
    assert loss.dtype == torch.promote_types(dtype, torch.float32) and grad.dtype == dtype
    assert_close(loss, expected_loss, dtype)
    assert_close(grad, expected_grad, dtype, magnitude=expected_grad.abs().max().item())


# ---- second order and torch.func ----

# case -> num_classes -> (op, reference, extra positional arguments, keyword arguments) on 2 experts / branches
SECOND_ORDER_CASES = {
    "ride_loss": lambda C: (ride_loss, ride_loss_reference, (long_tail_counts(C),), dict(scale=3.0, drw=True)),
    "ride_loss_without_diversity": lambda C: (ride_loss, ride_loss_reference, (long_tail_counts(C),),
                                              dict(scale=3.0, drw=True, diversity_factor=0.0)),
    "reslt_loss": lambda C: (reslt_loss, reslt_loss_reference, (nested_groups(2, C),), dict(beta=0.7, log_eps=0.01)),
    "prior_shifted_ce": lambda C: (prior_shifted_ce, prior_shifted_ce_reference, (long_tail_counts(C),),
                                   dict(taus=[1.0, 0.5])),
}


def _penalised_gradients(fn, features, weight, target, args, kwargs, row_weights=None, ignored_row=None):
    """d/d(features, weight) of L + ||d L / d logits||^2 with logits = features @ weight (a gradient penalty), L the
    loss or, with ``row_weights``, sum_b w_b loss_b of the per-row losses (reduction="none"); the ignored row's
    d L / d logits must be 0."""
    features, weight = features.clone().requires_grad_(True), weight.clone().requires_grad_(True)
    logits = features @ weight
    loss = fn(logits, target, *args, **kwargs)
    (grad_logits,) = torch.autograd.grad(loss, logits, row_weights, create_graph=True)
    if ignored_row is not None:
        assert (grad_logits[:, ignored_row] == 0).all()
    total = loss if row_weights is None else (loss * row_weights).sum()
    return torch.autograd.grad(total + grad_logits.square().sum(), (features, weight))


def check_create_graph_keeps_the_second_order_term(case, name):
    op, reference, args, kwargs = SECOND_ORDER_CASES[case](4)
    features, weight = torch.randn(2, 3, 5, dtype=torch.float64), torch.randn(5, 4, dtype=torch.float64)
    target = torch.tensor([0, 1, 3])
    expected = _penalised_gradients(reference, features, weight, target, args, kwargs)
    first_order_only = torch.autograd.grad(reference(features @ weight.requires_grad_(True), target, *args, **kwargs),
                                           weight)[0]
    with backend(name):
        actual = _penalised_gradients(op, features, weight, target, args, kwargs)
    for got, want in zip(actual, expected):
        torch.testing.assert_close(got, want)
    assert (actual[1] - first_order_only).abs().max() > 1e-6  # the penalty's term is there


def check_create_graph_with_reduction_none(case, name):
    """The gradient penalty through per-row losses weighted row by row (an ignored row among them): the backward of
    reduction="none" is differentiated too, and matches the reference's."""
    op, reference, args, kwargs = SECOND_ORDER_CASES[case](4)
    kwargs = dict(kwargs, reduction="none")
    features, weight = torch.randn(2, 3, 5, dtype=torch.float64), torch.randn(5, 4, dtype=torch.float64)
    target, row_weights = torch.tensor([0, -100, 3]), torch.linspace(0.5, 2.0, 3, dtype=torch.float64)
    expected = _penalised_gradients(reference, features, weight, target, args, kwargs, row_weights, ignored_row=1)
    with backend(name):
        actual = _penalised_gradients(op, features, weight, target, args, kwargs, row_weights, ignored_row=1)
    for got, want in zip(actual, expected):
        torch.testing.assert_close(got, want)


def check_torch_compile_fullgraph_with_reduction_none(case, name):
    """The per-row losses (an ignored row among them) under torch.compile(fullgraph=True) and their backward with a
    row-weighted grad_output equal the eager reference's."""
    op, reference, args, kwargs = SECOND_ORDER_CASES[case](9)
    kwargs = dict(kwargs, reduction="none")
    logits, target = 3 * torch.randn(2, 4, 9, requires_grad=True), torch.tensor([0, -100, 5, 8])
    grad_output = torch.linspace(0.5, 2.0, 4)
    compiled = torch.compile(lambda z: op(z, target, *args, **kwargs), fullgraph=True, backend="aot_eager")
    expected = reference(logits, target, *args, **kwargs)
    (expected_grad,) = torch.autograd.grad(expected, logits, grad_output)
    with backend(name):
        loss = compiled(logits)
        (grad,) = torch.autograd.grad(loss, logits, grad_output)
    assert_close(loss.detach(), expected.detach())
    assert_close(grad, expected_grad)
    assert (grad[:, 1] == 0).all()


def check_gradgradcheck_fp64(case, name):
    op, _, args, kwargs = SECOND_ORDER_CASES[case](3)
    logits, target = torch.randn(2, 2, 3, dtype=torch.float64, requires_grad=True), torch.tensor([0, 2])
    with backend(name):
        assert torch.autograd.gradgradcheck(lambda z: op(z, target, *args, **kwargs), (logits,))


def check_torch_func_grad_and_vmap(case, name):
    op, reference, args, kwargs = SECOND_ORDER_CASES[case](4)
    logits, target = torch.randn(2, 3, 4, dtype=torch.float64), torch.tensor([0, 1, 3])
    batched = torch.randn(5, 2, 3, 4, dtype=torch.float64)

    def loss_of(fn):
        return lambda z: fn(z, target, *args, **kwargs)

    with backend(name):
        grad = torch.func.grad(loss_of(op))(logits)
        per_sample = torch.vmap(loss_of(op))(batched)
    torch.testing.assert_close(grad, torch.func.grad(loss_of(reference))(logits))
    torch.testing.assert_close(per_sample, torch.stack([loss_of(reference)(z) for z in batched]))


# ---- the registered ops called directly refuse what the wrappers refuse ----


def raw_arguments(op_name, E=2, B=3, C=10):
    """Valid arguments of the registered op ``op_name`` (as its wrapper builds them), on random logits."""
    logits, target = torch.randn(E, B, C), torch.randint(0, C, (B,))
    if op_name == "ride_loss":
        return [logits, target, *ride_tables(C, weights=True), -0.45, 1, -100, True]
    if op_name == "reslt_loss":
        return [logits, target, nested_groups(E, C), 0.9, 1e-7, 0.0, 1, -100, True]
    return [logits, target, torch.zeros(E, C), 1, -100, True]


def _with(arguments, index, value):
    arguments = list(arguments)
    arguments[index] = value
    return arguments


# what -> (op name, arguments) -> the arguments changed; shared by the three ops
_SHARED_REFUSALS = {
    "target = C": lambda name, a: _with(a, 1, torch.full_like(a[1], a[0].shape[2])),
    "negative target": lambda name, a: _with(a, 1, a[1] - a[1].max() - 1),
    "int32 target": lambda name, a: _with(a, 1, a[1].int()),
    "target of B - 1 rows": lambda name, a: _with(a, 1, a[1][:-1]),
    "2-d logits": lambda name, a: _with(a, 0, a[0][0]),
    "integer logits": lambda name, a: _with(a, 0, a[0].long()),
    "table one class short": lambda name, a: _with(a, 2, a[2][..., :-1]),
    "table of wrong rank": lambda name, a: _with(a, 2, a[2].reshape(-1)[:3] if name == "ride_loss" else a[2][0]),
}
# op name -> what -> arguments -> the arguments changed
_OWN_REFUSALS = {
    "ride_loss": {
        "class_weights of 3": lambda a: _with(a, 3, torch.ones(3)),
        "temperatures one short": lambda a: _with(a, 4, a[4][:-1]),
        "NaN diversity_factor": lambda a: _with(a, 5, float("nan")),
    },
    "reslt_loss": {
        "float group_masks": lambda a: _with(a, 2, a[2].float()),
        "an all-False group_masks row": lambda a: _with(a, 2, torch.cat([a[2][:1], ~a[2][:1] & a[2][:1]])),
        "beta 1.5": lambda a: _with(a, 3, 1.5),
        "NaN log_eps": lambda a: _with(a, 4, float("nan")),
        "negative fused_log_eps": lambda a: _with(a, 5, -1e-7),
    },
    "prior_shifted_ce": {
        "shifts [E, C - 1]": lambda a: _with(a, 2, a[2][:, :-1]),
        "shifts [E - 1, C]": lambda a: _with(a, 2, a[2][:1]),
    },
}


def raw_refusals(op_name):
    """Parameters ``change`` (arguments -> bad arguments) the registered op ``op_name`` must refuse, with ids."""
    shared = [pytest.param(lambda a, change=change: change(op_name, a), id=what)
              for what, change in _SHARED_REFUSALS.items()]
    return shared + [pytest.param(change, id=what) for what, change in _OWN_REFUSALS[op_name].items()]


def check_raw_op_refuses_with_value_error(overload, change):
    """``overload``: ``"<op>"`` (the compiled op) or ``"<op>.triton"`` (:func:`op_helpers.raw_op`)."""
    op_name = overload.partition(".")[0]
    op = raw_op(overload)
    op(*raw_arguments(op_name))  # the unchanged arguments are fine
    with pytest.raises(ValueError, match=rf"fastlt\.{op_name}"):
        op(*change(raw_arguments(op_name)))
