import functools

import pytest
import torch
import torch.nn.functional as F
from op_helpers import (EVERY_HEAD_IMPLEMENTATION, assert_head_compiles_fullgraph, assert_head_matches_reference,
                        backend, expert_head_inputs, head_implementation_fixture, head_loss_and_grads, needs_cuda)

from fastlt.ops import linear_prior_shifted_ce, linear_prior_shifted_ce_reference


implementation = head_implementation_fixture(EVERY_HEAD_IMPLEMENTATION)
_assert_matches_reference = functools.partial(assert_head_matches_reference, linear_prior_shifted_ce_reference,
                                              linear_prior_shifted_ce)


def test_reference_is_the_shifted_cross_entropy_of_the_heads_summed_over_experts():
    (features, weight, bias), target, counts = expert_head_inputs(3, 6, 13, 4, use_bias=True)
    taus = [0.0, 1.0, 2.0]
    log_prior = (counts / counts.sum()).log().double()
    expected = sum(F.cross_entropy(30 * F.normalize(features[k], dim=1) @ F.normalize(weight[k], dim=1).t() + bias[k]
                                   + tau * log_prior, target) for k, tau in enumerate(taus))
    actual = linear_prior_shifted_ce_reference(features, weight, target, counts, taus=taus, bias=bias)
    torch.testing.assert_close(actual, expected)


@pytest.mark.parametrize("num_experts, shared, normalize, use_bias, reduction", [
    (1, False, True, False, "mean"), (2, True, True, True, "sum"), (3, False, False, True, "mean"),
    (4, True, False, False, "sum"), (3, True, True, False, "mean"), (2, False, False, False, "sum")])
def test_fp64_matches_reference_with_classes_not_a_multiple_of_the_chunk(num_experts, shared, normalize, use_bias,
                                                                           reduction, implementation):
    tensors, target, counts = expert_head_inputs(num_experts, 4, 21, 5, shared=shared, use_bias=use_bias)
    taus = torch.linspace(0.0, 2.0, num_experts).tolist()
    _assert_matches_reference(tensors, target, counts, taus=taus, normalize=normalize, reduction=reduction,
                              chunk_size=8, scale=30.0 if normalize else 1.0)


@pytest.mark.parametrize("chunk_size", [1, 64, None])
def test_batch_of_one_and_any_chunk(chunk_size, implementation):
    tensors, target, counts = expert_head_inputs(2, 1, 19, 5, use_bias=True)
    _assert_matches_reference(tensors, target, counts, taus=1.0, chunk_size=chunk_size)


@pytest.mark.parametrize("shared", [False, True])
def test_ignored_rows_add_nothing_and_get_zero_gradient(shared, implementation):
    tensors, target, counts = expert_head_inputs(2, 6, 23, 4, shared=shared, use_bias=True)
    target[[1, 4]] = -7
    (grad_features, *_) = _assert_matches_reference(tensors, target, counts, taus=[1.0, 0.5], ignore_index=-7,
                                                    chunk_size=8)
    rows = grad_features[..., [1, 4], :]
    assert torch.equal(rows, torch.zeros_like(rows)) and grad_features.abs().sum() > 0
    kept = torch.tensor([0, 2, 3, 5])
    features, weight, bias = tensors
    kept_features = features[kept] if shared else features[:, kept]
    torch.testing.assert_close(  # N counts the kept rows only
        linear_prior_shifted_ce(features, weight, target, counts, taus=[1.0, 0.5], bias=bias, ignore_index=-7),
        linear_prior_shifted_ce(kept_features, weight, target[kept], counts, taus=[1.0, 0.5], bias=bias))


def test_every_row_ignored_gives_zero_loss_and_gradients(implementation):
    tensors, target, counts = expert_head_inputs(2, 3, 11, 4)
    loss, grads = head_loss_and_grads(linear_prior_shifted_ce, tensors, torch.full_like(target, -100), counts, taus=1.0)
    assert loss.item() == 0.0
    assert all(torch.equal(grad, torch.zeros_like(grad)) for grad in grads)


def test_gradcheck_fp64(implementation):
    tensors, target, counts = expert_head_inputs(2, 2, 5, 3, use_bias=True)

    def loss(features, weight, bias):
        return linear_prior_shifted_ce(features, weight, target, counts, taus=[0.5, 1.5], bias=bias, scale=3.0,
                                       chunk_size=2)

    assert torch.autograd.gradcheck(loss, tuple(tensors), fast_mode=True)


def test_fp32_matches_reference(implementation):
    tensors, target, counts = expert_head_inputs(3, 4, 150, 8, use_bias=True, dtype=torch.float32)
    _assert_matches_reference(tensors, target, counts, taus=[0.0, 1.0, 2.0], chunk_size=32, rtol=1e-5, atol=1e-5)


def test_torch_compile_fullgraph_matches_eager():
    tensors, target, counts = expert_head_inputs(3, 4, 20, 8, use_bias=True, dtype=torch.float32)
    assert_head_compiles_fullgraph(linear_prior_shifted_ce, tensors, target, counts, taus=[0.0, 1.0, 2.0],
                                   chunk_size=8)


@pytest.mark.parametrize(
    "change, error, message",
    [
        (lambda x, w, y, n: dict(features=x[0, 0]), ValueError, "features must have"),
        (lambda x, w, y, n: dict(features=x[:1]), ValueError, "features must be"),
        (lambda x, w, y, n: dict(features=x.float()), ValueError, "features must have weight's dtype"),
        (lambda x, w, y, n: dict(weight=w[0]), ValueError, "weight must have 3 dims"),
        (lambda x, w, y, n: dict(target=y + 100), ValueError, "target must be in"),
        (lambda x, w, y, n: dict(target=y.float()), ValueError, "target must be int64"),
        (lambda x, w, y, n: dict(class_counts=n[:-1]), ValueError, "class_counts must be"),
        (lambda x, w, y, n: dict(class_counts=n * 0), ValueError, "log prior"),
        (lambda x, w, y, n: dict(taus=[1.0, 2.0, 3.0]), ValueError, "taus must hold one value per expert"),
        (lambda x, w, y, n: dict(taus=float("inf")), ValueError, "taus must be finite"),
        (lambda x, w, y, n: dict(bias=torch.zeros(2, 9, dtype=w.dtype)), ValueError, "bias must be"),
        (lambda x, w, y, n: dict(scale=0.0), ValueError, "scale must be"),
        (lambda x, w, y, n: dict(chunk_size=0), ValueError, "chunk_size must be"),
        (lambda x, w, y, n: dict(reduction="none"), ValueError, "reduction='none' is not supported"),
        (lambda x, w, y, n: dict(reduction="avg"), ValueError, "reduction must be one of"),
        (lambda x, w, y, n: dict(ignore_index=1.5), TypeError, "ignore_index must be an int"),
    ],
)
def test_bad_inputs_raise_errors_naming_the_argument(change, error, message):
    (features, weight), target, counts = expert_head_inputs(2, 3, 10, 4)
    arguments = dict(features=features, weight=weight, target=target, class_counts=counts, taus=[1.0, 1.0])
    arguments.update(change(features, weight, target, counts))
    with pytest.raises(error, match=message):
        linear_prior_shifted_ce(**arguments)


def test_bench_fused_head_has_the_composition_rows(monkeypatch):
    from fastlt.bench import fused_head

    monkeypatch.setattr(fused_head, "BATCH", 4)
    monkeypatch.setattr(fused_head, "DIM", 8)
    rows = fused_head._composition_rows_for(200, {})
    assert [row["impl"] for row in rows] == ["fused linear_prior_shifted_ce", "(b) heads + fused prior_shifted_ce",
                                             "fused linear_reslt_loss", "(b) branch logits + fused reslt_loss"]
    for fused in (rows[0], rows[2]):
        assert fused["C"] == 200 and fused["time_vs_b"] > 0 and fused["memory_b_over_fused"] > 0


def test_bench_fused_head_does_not_run_what_would_not_fit_the_budget(monkeypatch):
    """At a C where the fit over the smaller C predicts more than the budget, the materialised logits are not run
    (on this 24 GiB machine they were killed for memory at C = 3e5); the fused op still is."""
    from fastlt.bench import fused_head

    monkeypatch.setattr(fused_head, "BATCH", 8)
    monkeypatch.setattr(fused_head, "DIM", 8)
    history = {}
    fused_head._composition_rows_for(100, history)
    fused_head._composition_rows_for(200, history)
    materialised = history["(b) heads + fused prior_shifted_ce"]
    slope = (materialised[1][1] - materialised[0][1]) / 100
    fused_bytes = fused_head._predicted_bytes(history["fused linear_prior_shifted_ce"], 4000)
    budget = materialised[1][1] + slope * 3800 - 1  # the materialised logits at C = 4000 just do not fit
    assert fused_bytes < budget
    monkeypatch.setattr(fused_head, "BUDGET_BYTES", budget)
    rows = {row["impl"]: row for row in fused_head._composition_rows_for(4000, history)}
    assert rows["(b) heads + fused prior_shifted_ce"]["ms"] is None
    assert "not run" in rows["(b) heads + fused prior_shifted_ce"]["note"]
    assert rows["fused linear_prior_shifted_ce"]["ms"] > 0
    assert "time_vs_b" not in rows["fused linear_prior_shifted_ce"]


@needs_cuda
@pytest.mark.gpu
@pytest.mark.parametrize("fused_backend", ["cpp", "triton"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("shared, use_bias, normalize, reduction", [(False, True, True, "mean"),
                                                                    (True, False, False, "sum")])
def test_cuda_matches_reference(fused_backend, dtype, shared, use_bias, normalize, reduction):
    tensors, target, counts = expert_head_inputs(3, 33, 1000, 24, shared=shared, use_bias=use_bias, dtype=dtype)
    tensors = [t.detach().cuda().requires_grad_(True) for t in tensors]
    target, counts = target.cuda(), counts.cuda()
    target[[0, 5]] = -100
    rtol, atol = (1e-10, 1e-12) if dtype == torch.float64 else (1e-4, 1e-5)
    with backend(fused_backend):
        _assert_matches_reference(tensors, target, counts, taus=[0.0, 1.0, 2.0], normalize=normalize,
                                  scale=30.0 if normalize else 1.0, reduction=reduction, chunk_size=256, rtol=rtol,
                                  atol=atol)
