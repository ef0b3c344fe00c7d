"""What every differentiable fastlt op guarantees through the shared glue (fastlt/ops/_fused_loss.py,
fastlt/ops/_backend.py, fastlt/ops/_library.py), checked on every backend against the reference: a gradient already
returned never changes (a second backward through the same graph recomputes instead of scaling the buffer it
handed out), a differentiated backward (``create_graph=True``, gradient penalties) keeps the second-order terms,
``torch.func.grad`` goes through the reference, and each loss's hyper-parameters and ``ignore_index`` are refused
alike by its plain op, its fused-head op, their references and its module."""

import contextlib
import importlib
import math

import pytest
import torch
from op_helpers import backend, long_tail_counts, needs_cpp

import fastlt
from fastlt import _extension, ops

_linear_ride_loss_module = importlib.import_module("fastlt.ops.linear_ride_loss")
HEAD_OPS = ("linear_ride_loss", "linear_prior_shifted_ce", "linear_reslt_loss")


def _groups(num_branches, num_classes):
    masks = torch.ones(num_branches, num_classes, dtype=torch.bool)
    masks[1:, : num_classes // 2] = False
    return masks


def _case(name):
    """(loss of the differentiable inputs, the inputs: fp64 leaves) of the op ``name`` on small random inputs."""
    generator = torch.Generator().manual_seed(0)

    def randn(*shape, scale=1.0):
        return (scale * torch.randn(*shape, generator=generator, dtype=torch.float64)).requires_grad_()

    E, B, C, D = 2, 3, 6, 4
    target, counts = torch.tensor([0, 5, 2]), long_tail_counts(C)
    if name in ("ride_loss", "ride_loss sum"):
        reduction = "sum" if name.endswith("sum") else "mean"
        return (lambda z: ops.ride_loss(z, target, counts, scale=3.0, drw=True, reduction=reduction)), [randn(E, B, C)]
    if name == "prior_shifted_ce":
        return (lambda z: ops.prior_shifted_ce(z, target, counts, taus=[1.0, 0.5])), [randn(E, B, C, scale=3.0)]
    if name == "shifted_ce":
        shifts = torch.randn(E, C, generator=generator)
        return (lambda z: ops.shifted_ce(z, target, shifts)), [randn(E, B, C, scale=3.0)]
    if name == "reslt_loss":
        return (lambda z: ops.reslt_loss(z, target, _groups(E, C), beta=0.7)), [randn(E, B, C, scale=3.0)]
    if name == "expert_aggregate":
        return (lambda z, w: ops.expert_aggregate(z, weights=w).square().sum()), [randn(E, B, C), randn(E)]
    if name == "tau_normalize":
        return (lambda w: ops.tau_normalize(w, 0.7).square().sum()), [randn(C, D)]
    if name == "linear_ride_loss":
        return ((lambda x, w, b: ops.linear_ride_loss(x, w, target, counts, normalize=False, bias=b, margin_scale=3.0,
                                                      drw=True, chunk_size=4)),
                [randn(E, B, D), randn(E, C, D), randn(E, C)])
    if name == "linear_ride_loss cosine":
        return ((lambda x, w: ops.linear_ride_loss(x, w, target, counts, scale=4.0, margin_scale=3.0, chunk_size=4)),
                [randn(E, B, D), randn(E, C, D)])
    if name == "linear_prior_shifted_ce":
        return ((lambda x, w: ops.linear_prior_shifted_ce(x, w, target, counts, taus=[1.0, 0.0], normalize=False,
                                                          chunk_size=4)),
                [randn(E, B, D), randn(E, C, D)])
    assert name == "linear_reslt_loss"
    return ((lambda x, w, b: ops.linear_reslt_loss(x, w, target, _groups(E, C), beta=0.7, bias=b, chunk_size=4)),
            [randn(E, B, D), randn(C, D), randn(C)])


CASES = ["ride_loss", "ride_loss sum", "prior_shifted_ce", "shifted_ce", "reslt_loss", "expert_aggregate",
         "tau_normalize", "linear_ride_loss", "linear_ride_loss cosine", "linear_prior_shifted_ce",
         "linear_reslt_loss"]


# (case, backend): cpp, triton, and for the fused heads their chunked PyTorch loop ("torch")
CASE_IMPLEMENTATIONS = [pytest.param(case, name, marks=[needs_cpp] if name == "cpp" else [])
                        for case in CASES for name in ("cpp", "triton", "torch")
                        if name != "torch" or case.startswith(HEAD_OPS)]


@contextlib.contextmanager
def _implementation(name, monkeypatch):
    if name == "torch":  # no compiled kernel: the fused heads' chunked PyTorch loop
        monkeypatch.setattr(_linear_ride_loss_module, "_compiled_op", lambda device: None)
        name = "auto"
    with backend(name):
        yield


def _penalised_gradients(loss_of, inputs):
    """d/d inputs of L + ||d L / d inputs||^2 (a gradient penalty: the backward differentiated)."""
    loss = loss_of(*inputs)
    grads = torch.autograd.grad(loss, inputs, create_graph=True)
    return torch.autograd.grad(loss + sum(g.square().sum() for g in grads), inputs)


@pytest.mark.parametrize("case, implementation", CASE_IMPLEMENTATIONS)
def test_a_returned_gradient_never_changes(case, implementation, monkeypatch):
    loss_of, inputs = _case(case)
    with _implementation(implementation, monkeypatch):
        loss = loss_of(*inputs)
        first = torch.autograd.grad(loss, inputs, retain_graph=True)
        kept = [g.clone() for g in first]
        second = torch.autograd.grad(loss * 3, inputs, retain_graph=True)
        for grad, copy, tripled in zip(first, kept, second):
            assert torch.equal(grad, copy)
            torch.testing.assert_close(tripled, 3 * copy)
        for _ in range(3):  # accumulated into .grad, backward after backward (AccumulateGrad owns the first one)
            (2 * loss).backward(retain_graph=True)
    for leaf, grad in zip(inputs, kept):
        torch.testing.assert_close(leaf.grad, 6 * grad)


@pytest.mark.parametrize("case, implementation", CASE_IMPLEMENTATIONS)
def test_a_gradient_penalty_keeps_the_second_order_terms(case, implementation, monkeypatch):
    loss_of, inputs = _case(case)
    with backend("reference"):
        expected = _penalised_gradients(loss_of, inputs)
    with _implementation(implementation, monkeypatch):
        actual = _penalised_gradients(loss_of, inputs)
    for got, want in zip(actual, expected):
        torch.testing.assert_close(got, want)


@pytest.mark.parametrize("case, implementation", CASE_IMPLEMENTATIONS)
def test_torch_func_grad_takes_the_reference(case, implementation, monkeypatch):
    loss_of, inputs = _case(case)
    values = [x.detach() for x in inputs]
    argnums = tuple(range(len(values)))
    with backend("reference"):
        expected = torch.func.grad(loss_of, argnums)(*values)
    with _implementation(implementation, monkeypatch):
        actual = torch.func.grad(loss_of, argnums)(*values)
    for got, want in zip(actual, expected):
        torch.testing.assert_close(got, want)


# ---- hyper-parameters and ignore_index: one check for the plain op, the fused head, references and modules ----

C = 6
_COUNTS = long_tail_counts(C)


def _ride_calls(**head):
    """Every way to compute RIDE's loss with the hyper-parameters ``head`` (the fused head's names: LDAM's s is
    ``margin_scale`` there, ``scale`` in ride_loss and RIDELoss)."""
    bad = {("scale" if key == "margin_scale" else key): value for key, value in head.items()}
    x, w, y = torch.randn(2, 3, 4), torch.randn(2, C, 4), torch.tensor([0, 1, 5])
    return {
        "linear_ride_loss": lambda: ops.linear_ride_loss(x, w, y, _COUNTS, drw=True, **head),
        "linear_ride_loss_reference": lambda: ops.linear_ride_loss_reference(x, w, y, _COUNTS, drw=True, **head),
        "LinearRIDELoss": lambda: fastlt.LinearRIDELoss(_COUNTS, 2, 4, drw_epoch=0, **head)(x, y),
        "ride_loss": lambda: ops.ride_loss(torch.randn(2, 3, C), y, _COUNTS, drw=True, **bad),
        "RIDELoss": lambda: fastlt.RIDELoss(_COUNTS, drw_epoch=0, **bad)(torch.randn(2, 3, C), y),
    }


RIDE_HYPERPARAMETERS = [(dict(margin_scale=-30.0), "margin_scale"), (dict(drw_beta=1.0), "drw_beta"),
                        (dict(temperature_factor=2.0), "temperature_factor"), (dict(max_margin=-1.0), "max_margin"),
                        (dict(base_temperature=0.0), "base_temperature"), (dict(max_margin=math.inf), "max_margin")]


@pytest.mark.parametrize("entry", list(_ride_calls()))
@pytest.mark.parametrize("bad, name", RIDE_HYPERPARAMETERS, ids=lambda value: str(value))
def test_rides_hyperparameters_are_refused_by_every_op_and_module(entry, bad, name):
    call = _ride_calls(**bad)[entry]
    if entry in ("ride_loss", "RIDELoss") and name == "margin_scale":
        name = "scale"  # LDAM's s is ride_loss's scale
    for backend_name in ("reference", "cpp" if _extension.AVAILABLE else "triton"):
        with backend(backend_name), pytest.raises(ValueError, match=rf"\b{name} must be"):
            call()


def _reslt_and_prior_calls(**bad):
    """Every way to compute ResLT's loss (beta, log_eps) or the prior-shifted CE (taus, label_smoothing) with the
    hyper-parameters ``bad``, those that take them."""
    x, w, logits, y = torch.randn(2, 3, 4), torch.randn(C, 4), torch.randn(2, 3, C), torch.tensor([0, 1, 5])
    reslt = dict(beta=0.7, log_eps=0.0, fused_log_eps=None)
    reslt.update({key: value for key, value in bad.items() if key in reslt})
    prior = dict(taus=[1.0, 0.0], label_smoothing=0.0)
    prior.update({key: value for key, value in bad.items() if key in prior})
    calls = {}
    if {"beta", "log_eps", "fused_log_eps"} & bad.keys():
        calls.update({
            "reslt_loss": lambda: ops.reslt_loss(logits, y, _groups(2, C), **reslt),
            "reslt_loss_reference": lambda: ops.reslt_loss_reference(logits, y, _groups(2, C), **reslt),
            "linear_reslt_loss": lambda: ops.linear_reslt_loss(x, w, y, _groups(2, C), **reslt),
            "ResLTLoss": lambda: fastlt.ResLTLoss(_groups(2, C), **reslt)(logits, y),
        })
    if "label_smoothing" in bad:
        calls["shifted_ce"] = lambda: ops.shifted_ce(logits, y, torch.zeros(2, C),
                                                     label_smoothing=bad["label_smoothing"])
    if {"taus", "label_smoothing"} & bad.keys():
        calls.update({
            "prior_shifted_ce": lambda: ops.prior_shifted_ce(logits, y, _COUNTS, **prior),
            "prior_shifted_ce_reference": lambda: ops.prior_shifted_ce_reference(logits, y, _COUNTS, **prior),
            "PriorShiftedCE": lambda: fastlt.PriorShiftedCE(_COUNTS, **prior)(logits, y),
        })
    if "taus" in bad:
        calls["linear_prior_shifted_ce"] = lambda: ops.linear_prior_shifted_ce(x, torch.randn(2, C, 4), y, _COUNTS,
                                                                                taus=prior["taus"])
    return calls


OTHER_HYPERPARAMETERS = [(dict(beta=1.5), "beta"), (dict(beta=math.nan), "beta"), (dict(log_eps=-1.0), "log_eps"),
                         (dict(fused_log_eps=-1.0), "fused_log_eps"), (dict(taus=[1.0, math.inf]), "taus"),
                         (dict(label_smoothing=1.5), "label_smoothing")]


@pytest.mark.parametrize("bad, name, entry", [
    pytest.param(bad, name, entry, id=f"{entry}-{bad}") for bad, name in OTHER_HYPERPARAMETERS
    for entry in _reslt_and_prior_calls(**bad)])
def test_reslt_and_prior_shifted_hyperparameters_are_refused_by_every_op_and_module(bad, name, entry):
    with pytest.raises(ValueError, match=rf"\b{name} must be"):
        _reslt_and_prior_calls(**bad)[entry]()


def _ignore_index_calls(ignore_index):
    x, w, logits, y = torch.randn(2, 3, 4), torch.randn(2, C, 4), torch.randn(2, 3, C), torch.tensor([0, 1, 5])
    return {
        "ride_loss": lambda: ops.ride_loss(logits, y, _COUNTS, ignore_index=ignore_index),
        "reslt_loss": lambda: ops.reslt_loss(logits, y, _groups(2, C), beta=0.5, ignore_index=ignore_index),
        "prior_shifted_ce": lambda: ops.prior_shifted_ce(logits, y, _COUNTS, taus=1.0, ignore_index=ignore_index),
        "shifted_ce": lambda: ops.shifted_ce(logits, y, torch.zeros(2, C), ignore_index=ignore_index),
        "linear_ride_loss": lambda: ops.linear_ride_loss(x, w, y, _COUNTS, ignore_index=ignore_index),
        "linear_prior_shifted_ce": lambda: ops.linear_prior_shifted_ce(x, w, y, _COUNTS, taus=1.0,
                                                                       ignore_index=ignore_index),
        "linear_reslt_loss": lambda: ops.linear_reslt_loss(x, w[0], y, _groups(2, C), beta=0.5,
                                                           ignore_index=ignore_index),
        "RIDELoss": lambda: fastlt.RIDELoss(_COUNTS, ignore_index=ignore_index),
        "LinearRIDELoss": lambda: fastlt.LinearRIDELoss(_COUNTS, 2, 4, ignore_index=ignore_index),
    }


@pytest.mark.parametrize("entry", list(_ignore_index_calls(0)))
@pytest.mark.parametrize("name", [pytest.param("cpp", marks=needs_cpp), "triton", "reference"])
def test_an_ignore_index_beyond_int64_is_a_value_error(entry, name):
    with backend(name):
        for ignore_index in (2**63, -(2**63) - 1):
            with pytest.raises(ValueError, match="ignore_index must be an int64"):
                _ignore_index_calls(ignore_index)[entry]()
        _ignore_index_calls(2**63 - 1)[entry]()  # the largest int64 is a label no row has
