"""Checks the three fused losses (ride_loss, reslt_loss, prior_shifted_ce) share, each run from the op's own test file:
the second-order / torch.func checks (the fused ops' backward recomputes through the eager formula when
differentiated) and the registered ops' refusal of bad arguments (the Triton ops check as the C++ ops do)."""

import pytest
import torch
from op_helpers import backend, long_tail_counts, raw_op

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


def _penalised_gradients(fn, features, weight, target, args, kwargs):
    """d/d(features, weight) of loss + ||d loss / d logits||^2 with logits = features @ weight (a gradient penalty)."""
    features, weight = features.clone().requires_grad_(True), weight.clone().requires_grad_(True)
    logits = features @ weight
    loss = fn(logits, target, *args, **kwargs)
    (grad_logits,) = torch.autograd.grad(loss, logits, create_graph=True)
    return torch.autograd.grad(loss + grad_logits.square().sum(), (features, weight))


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
        return [logits, target, nested_groups(E, C), 0.9, 1e-7, 1, -100, True]
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
