import contextlib
import functools
import importlib

import pytest
import torch
from op_helpers import (assert_head_matches_reference, backend, call_cuda_kernel, expert_head_inputs,
                        head_implementation_fixture, head_loss_and_grads, long_tail_counts, needs_cuda,
                        needs_cuda_build)

import fastlt
from fastlt.ops import linear_ride_loss, linear_ride_loss_reference, ride_loss_reference
from fastlt.ops._head_arguments import default_chunk_size

linear_ride_loss_module = importlib.import_module("fastlt.ops.linear_ride_loss")  # the attribute is the function
HAS_CPP = linear_ride_loss_module._compiled_op(torch.device("cpu")) is not None
# "cpp": the C++ kernel; "triton": Triton kernels (interpreter); "torch": the same algorithm in PyTorch (devices
# without a kernel)
IMPLEMENTATIONS = [pytest.param("cpp", marks=pytest.mark.skipif(not HAS_CPP, reason="extension without the op")),
                   "torch"]  # the Triton kernels (slow in the interpreter) have their own tests below


implementation = head_implementation_fixture(IMPLEMENTATIONS)
_assert_matches_reference = functools.partial(assert_head_matches_reference, linear_ride_loss_reference,
                                              linear_ride_loss)


def test_reference_is_ride_loss_of_the_cosine_logits():
    (features, weight), target, counts = expert_head_inputs(2, 4, 9, 5)
    cosine = torch.stack([torch.nn.functional.normalize(features[k], dim=1)
                          @ torch.nn.functional.normalize(weight[k], dim=1).t() for k in range(2)])
    expected = ride_loss_reference(30 * cosine, target, counts, drw=True, scale=20.0)
    actual = linear_ride_loss_reference(features, weight, target, counts, drw=True, margin_scale=20.0)
    torch.testing.assert_close(actual, expected)


@pytest.mark.parametrize("shared", [False, True])
@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("use_bias", [False, True])
@pytest.mark.parametrize("drw", [False, True])
def test_fp64_matches_reference_with_classes_not_a_multiple_of_the_chunk(shared, normalize, use_bias, drw,
                                                                           implementation):
    tensors, target, counts = expert_head_inputs(3, 5, 37, 7, shared=shared, use_bias=use_bias)
    _assert_matches_reference(tensors, target, counts, normalize=normalize, drw=drw, chunk_size=8,
                              scale=30.0 if normalize else 1.0)


@pytest.mark.parametrize("shared, normalize, use_bias, drw, diversity_factor, num_experts", [
    (False, True, False, True, -0.45, 3), (True, True, True, False, 0.3, 2), (False, False, True, True, 0.0, 1)])
def test_triton_matches_reference_fp64(shared, normalize, use_bias, drw, diversity_factor, num_experts):
    tensors, target, counts = expert_head_inputs(num_experts, 4, 21, 5, shared=shared, use_bias=use_bias)
    with backend("triton"):
        _assert_matches_reference(tensors, target, counts, normalize=normalize, drw=drw,
                                  diversity_factor=diversity_factor, chunk_size=8)


@pytest.mark.parametrize("num_experts", [1, 2, 5, 8])
@pytest.mark.parametrize("diversity_factor", [-0.45, 0.0, 0.3])
def test_fp64_any_number_of_experts_and_diversity(num_experts, diversity_factor, implementation):
    tensors, target, counts = expert_head_inputs(num_experts, 3, 20, 4)
    _assert_matches_reference(tensors, target, counts, drw=True, diversity_factor=diversity_factor, chunk_size=6)


@pytest.mark.parametrize("chunk_size", [1, 7, 64, None])
def test_batch_of_one_and_any_chunk(chunk_size, implementation):
    tensors, target, counts = expert_head_inputs(2, 1, 33, 6)
    _assert_matches_reference(tensors, target, counts, drw=True, chunk_size=chunk_size)


@pytest.mark.parametrize("use_bias", [False, True])
def test_gradcheck_fp64(use_bias, implementation):
    tensors, target, counts = expert_head_inputs(2, 3, 11, 4, use_bias=use_bias)

    def loss(features, weight, *bias):
        return linear_ride_loss(features, weight, target, counts, bias=bias[0] if bias else None, drw=True,
                                scale=4.0, margin_scale=3.0, chunk_size=4)

    assert torch.autograd.gradcheck(loss, tuple(tensors))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_low_precision_tolerance_table(dtype, implementation):
    tensors, target, counts = expert_head_inputs(3, 6, 300, 16, dtype=dtype)
    # Both compute in fp32; the reference's GEMM and normalisation round to the input dtype, the fused op's do not.
    rtol, atol = (1e-5, 1e-5) if dtype == torch.float32 else (3e-2, 3e-2)
    _assert_matches_reference(tensors, target, counts, drw=True, chunk_size=64, rtol=rtol, atol=atol)


def test_backward_scales_by_grad_output(implementation):
    tensors, target, counts = expert_head_inputs(2, 3, 10, 4)
    _, unit = head_loss_and_grads(linear_ride_loss, tensors, target, counts)
    features, weight = tensors
    (2.5 * linear_ride_loss(features, weight, target, counts)).backward()
    torch.testing.assert_close(weight.grad, 2.5 * unit[1])
    torch.testing.assert_close(features.grad, 2.5 * unit[0])


def test_no_gradient_is_computed_without_requires_grad(implementation):
    (features, weight), target, counts = expert_head_inputs(2, 3, 10, 4)
    loss = linear_ride_loss(features.detach(), weight.detach(), target, counts)
    assert not loss.requires_grad
    torch.testing.assert_close(loss, linear_ride_loss_reference(features, weight, target, counts).detach())


def test_default_chunk_size_is_a_power_of_two_of_about_two_million_logits():
    assert default_chunk_size(3, 256, 100_000) == 2048
    assert default_chunk_size(1, 1, 100_000) == 8192 and default_chunk_size(64, 4096, 10**6) == 128
    assert default_chunk_size(3, 256, 1000) == 1000


OVERLOADS = [pytest.param("default", marks=pytest.mark.skipif(not HAS_CPP, reason="extension without the op")),
             "torch", "triton"]


def test_schema_constant_is_every_overloads_schema():
    overloads = ["torch", "triton"] + (["default"] if HAS_CPP else [])
    for overload in overloads:
        schema = str(getattr(torch.ops.fastlt.linear_ride_loss, overload)._schema)
        assert schema.split("(", 1)[1] == linear_ride_loss_module.SCHEMA[1:], overload


@pytest.mark.parametrize("overload", OVERLOADS)
def test_opcheck(overload):
    (features, weight, bias), target, counts = expert_head_inputs(2, 3, 10, 4, use_bias=True, dtype=torch.float32)
    op = getattr(torch.ops.fastlt.linear_ride_loss, overload)
    cases = ((None, features, 1, -100, target, None, None),
             (torch.rand(10) + 0.5, features[0].detach(), 2, 3, target, torch.rand(3), None),
             (torch.rand(10), features, 1, -1, torch.tensor([-1, 2, -1]), torch.rand(3), torch.randn(3)))
    for class_weights, shared_features, reduction, ignore_index, labels, row_weights, row_bias_scales in cases:
        args = (shared_features, weight, bias, labels, torch.rand(10), class_weights, torch.rand(10) + 0.5,
                row_weights, row_bias_scales, 30.0, True, -0.45, reduction, ignore_index, 4, True)
        torch.library.opcheck(op, args, test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_dynamic"))


@pytest.mark.parametrize("overload", OVERLOADS)
def test_op_checks_its_own_arguments(overload):
    (features, weight), target, counts = expert_head_inputs(2, 3, 10, 4)
    op = getattr(torch.ops.fastlt.linear_ride_loss, overload)
    tables = (torch.zeros(10), None, torch.ones(10))
    with pytest.raises(ValueError, match="target must be in"):
        op(features, weight, None, target + 10, *tables, None, None, 30.0, True, -0.45, 1, -100, 4, False)
    with pytest.raises(ValueError, match="temperatures must be"):
        op(features, weight, None, target, tables[0], None, torch.ones(9), None, None, 30.0, True, -0.45, 1, -100, 4,
           False)
    with pytest.raises(ValueError, match="chunk_size must be"):
        op(features, weight, None, target, *tables, None, None, 30.0, True, -0.45, 1, -100, 0, False)
    with pytest.raises(ValueError, match="reduction"):
        op(features, weight, None, target, *tables, None, None, 30.0, True, -0.45, 0, -100, 4, False)
    with pytest.raises(ValueError, match=r"row_weights must be \[B\]"):
        op(features, weight, None, target, *tables, torch.ones(4), None, 30.0, True, -0.45, 1, -100, 4, False)
    with pytest.raises(ValueError, match="row_weights must be >= 0"):
        op(features, weight, None, target, *tables, -torch.ones(3), None, 30.0, True, -0.45, 1, -100, 4, False)
    with pytest.raises(ValueError, match="row_bias_scales must be finite"):
        op(features, weight, torch.zeros(2, 10).to(weight), target, *tables, None,
           torch.tensor([1, float("nan"), 1]), 30.0, True, -0.45, 1, -100, 4, False)
    with pytest.raises(ValueError, match="row_bias_scales needs a bias"):
        op(features, weight, None, target, *tables, None, torch.ones(3), 30.0, True, -0.45, 1, -100, 4, False)


@pytest.mark.slow
def test_torch_compile_fullgraph_matches_eager(implementation):
    (features, weight), target, counts = expert_head_inputs(3, 4, 20, 8, dtype=torch.float32)
    compiled = torch.compile(lambda x, w: linear_ride_loss(x, w, target, counts, drw=True, chunk_size=8),
                             fullgraph=True)
    expected_loss, expected_grads = head_loss_and_grads(linear_ride_loss, [features, weight], target, counts, drw=True,
                                                        chunk_size=8)
    loss = compiled(features, weight)
    grads = torch.autograd.grad(loss, [features, weight])
    torch.testing.assert_close(loss.detach(), expected_loss)
    for grad, expected in zip(grads, expected_grads):
        torch.testing.assert_close(grad, expected)


@pytest.mark.parametrize(
    "change, error, message",
    [
        (lambda x, w, y, n: dict(features=x[0, 0]), ValueError, "features must have"),
        (lambda x, w, y, n: dict(features=x[:1]), ValueError, "features must be"),
        (lambda x, w, y, n: dict(features=x[..., :3]), ValueError, "features must have D"),
        (lambda x, w, y, n: dict(features=x.float()), ValueError, "features must have weight's dtype"),
        (lambda x, w, y, n: dict(weight=w[0]), ValueError, "weight must have 3 dims"),
        (lambda x, w, y, n: dict(weight=[1.0]), TypeError, "weight must be a torch.Tensor"),
        (lambda x, w, y, n: dict(target=y + 100), ValueError, "target must be in"),
        (lambda x, w, y, n: dict(target=y.int()), ValueError, "target must be int64"),
        (lambda x, w, y, n: dict(class_counts=n[:-1]), ValueError, "class_counts must be"),
        (lambda x, w, y, n: dict(class_counts=-n), ValueError, "positive"),
        (lambda x, w, y, n: dict(bias=torch.zeros(2, 9, dtype=w.dtype)), ValueError, "bias must be"),
        (lambda x, w, y, n: dict(scale=0.0), ValueError, "scale must be"),
        (lambda x, w, y, n: dict(chunk_size=0), ValueError, "chunk_size must be"),
        (lambda x, w, y, n: dict(chunk_size=2.5), ValueError, "chunk_size must be"),
    ],
)
def test_bad_inputs_raise_errors_naming_the_argument(change, error, message):
    (features, weight), target, counts = expert_head_inputs(2, 3, 10, 4)
    arguments = dict(features=features, weight=weight, target=target, class_counts=counts)
    arguments.update(change(features, weight, target, counts))
    with pytest.raises(error, match=message):
        linear_ride_loss(**arguments)


def test_module_is_normed_linear_heads_plus_ride_loss():
    from fastlt.models import NormedLinear

    torch.manual_seed(0)
    counts = long_tail_counts(30)
    head = fastlt.LinearRIDELoss(counts, num_experts=3, in_features=8, drw_epoch=2, chunk_size=8).double()
    classifiers = [NormedLinear(8, 30).double() for _ in range(3)]
    with torch.no_grad():
        for k, classifier in enumerate(classifiers):
            classifier.weight.copy_(head.weight[k].t())
    criterion = fastlt.RIDELoss(counts, drw_epoch=2)
    features, target = torch.randn(3, 5, 8, dtype=torch.float64), torch.randint(0, 30, (5,))
    for epoch in (1, 2):
        head.set_epoch(epoch)
        criterion.set_epoch(epoch)
        assert head.drw == criterion.drw == (epoch >= 2)
        logits = torch.stack([30 * classifier(features[k]) for k, classifier in enumerate(classifiers)])
        torch.testing.assert_close(head.logits(features), logits)
        torch.testing.assert_close(head.logits(features[1], expert=1), logits[1])
        expected = criterion(logits, target)
        expected.backward()
        loss = head(features, target)
        loss.backward()
        torch.testing.assert_close(loss, expected)
        for k, classifier in enumerate(classifiers):
            torch.testing.assert_close(head.weight.grad[k], classifier.weight.grad.t())
            classifier.weight.grad = None
        head.weight.grad = None


def test_ride_recipe_with_fused_head_trains_the_head_and_evaluates_the_same_logits():
    from fastlt.methods.builders import build_model
    from fastlt.methods.stage1 import build_method

    torch.manual_seed(0)
    model = build_model({"name": "ride_small_cnn", "num_experts": 3}, 10)
    images, target = torch.randn(4, 1, 28, 28), torch.randint(0, 10, (4,))
    model.eval()
    expected = model(images).logits
    method = build_method({"name": "ride", "drw_epoch": 2, "fused_head": True}, long_tail_counts(10), model)
    torch.testing.assert_close(model(images).logits, expected)
    model.train()
    output = model(images)
    assert output.logits is None and output.features.shape[:2] == (3, 4)
    method.on_epoch_start(2)
    assert model.fused_head.drw
    method.loss_fn(output, target).backward()
    assert model.fused_head.weight.grad.abs().sum() > 0
    assert any(parameter is model.fused_head.weight for parameter in model.parameters())


@pytest.mark.slow
def test_bench_fused_head_runs_and_fits_memory_linearly(monkeypatch):
    from fastlt.bench import fused_head

    monkeypatch.setattr(fused_head, "EXPERTS", 2)
    monkeypatch.setattr(fused_head, "BATCH", 4)
    monkeypatch.setattr(fused_head, "DIM", 8)
    rows = fused_head.run(quick=True, class_counts=(100, 300))
    assert [row["impl"] for row in rows[:3]] == ["fused linear_ride_loss", "(b) heads + fused ride_loss",
                                                  "(a) heads + eager reference"]
    for first, second in zip(rows[:3], rows[3:]):  # the fit passes through both points; max C is where it hits 8 GiB
        per_class = (second["total_mb"] - first["total_mb"]) * 2**20 / 200
        assert second["bytes_per_class"] == pytest.approx(per_class)
        fixed = second["total_mb"] * 2**20 - per_class * 300
        largest = second["max_C_in_8GiB"]
        assert fixed + per_class * largest <= 8 * 2**30 < fixed + per_class * (largest + 1)
    fused = rows[3]
    assert fused["C"] == 300 and fused["memory_b_over_fused"] > 0 and fused["time_vs_b"] > 0


@pytest.mark.parametrize("diversity_factor", [0.0, -0.45])
def test_fused_tables_with_zero_class_weights(diversity_factor, implementation):
    from fastlt.ops.linear_ride_loss import fused_linear_ride_loss

    (features, weight), target, counts = expert_head_inputs(2, 5, 12, 4)
    target_margins, temperatures = torch.rand(12, dtype=torch.float64), torch.rand(12, dtype=torch.float64) + 0.5
    mask = (torch.arange(12) % 2).double()  # a 0/1 class mask as class weights
    kwargs = dict(scale=30.0, normalize=True, diversity_factor=diversity_factor, chunk_size=5)
    with backend("reference"):
        expected = fused_linear_ride_loss(features, weight, None, target, target_margins, mask, temperatures,
                                          **kwargs)
        expected_grads = torch.autograd.grad(expected, [features, weight])
    loss = fused_linear_ride_loss(features, weight, None, target, target_margins, mask, temperatures, **kwargs)
    grads = torch.autograd.grad(loss, [features, weight])
    torch.testing.assert_close(loss, expected)
    for grad, expected_grad in zip(grads, expected_grads):
        torch.testing.assert_close(grad, expected_grad)
    zero = torch.zeros(12, dtype=torch.float64)
    loss = fused_linear_ride_loss(features, weight, None, target, target_margins, zero, temperatures,
                                  **dict(kwargs, diversity_factor=0.0))
    grads = torch.autograd.grad(loss, [features, weight])
    assert loss.item() == 0.0 and all(bool((grad == 0).all()) for grad in grads)


def _row_table_inputs():
    """A 2-expert cosine head with bias, one ignored row, row weights (one zero) and row bias scales."""
    tensors, target, _ = expert_head_inputs(2, 6, 17, 5, use_bias=True)
    target[2] = -100
    row_weights = torch.rand(6, dtype=torch.float64) + 0.5
    row_weights[4] = 0.0
    row_bias_scales = torch.randn(6, dtype=torch.float64)
    class_weights = torch.rand(17, dtype=torch.float64) + 0.5
    return tensors, target, row_weights, row_bias_scales, class_weights


def _weighted_ce_by_hand(features, weight, bias, target, row_weights, row_bias_scales, class_weights, reduction):
    """sum_k sum_i r_i w_y CE(z_k(x_i), y_i) (divided by sum_i r_i w_y under mean), the logits
    30 cos(x, w) + s_i b from F.normalize and F.cross_entropy: independent of the package's tables."""
    normalize = torch.nn.functional.normalize
    logits = 30 * normalize(features, dim=-1) @ normalize(weight, dim=-1).transpose(1, 2)
    logits = logits + row_bias_scales[:, None] * bias[:, None, :]
    kept = target != -100
    factors = row_weights * class_weights[target.clamp_min(0)] * kept
    loss = sum((factors * torch.nn.functional.cross_entropy(z, target, reduction="none")).sum() for z in logits)
    return loss / factors.sum() if reduction == "mean" else loss


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("fused_backend", [None, "triton"])
def test_row_weights_and_row_bias_scales_match_the_formula(reduction, fused_backend, implementation):
    from fastlt.ops.linear_ride_loss import fused_linear_ride_loss

    (features, weight, bias), target, row_weights, row_bias_scales, class_weights = _row_table_inputs()
    tables = (torch.zeros(17, dtype=torch.float64), class_weights, torch.ones(17, dtype=torch.float64))
    expected = _weighted_ce_by_hand(features, weight, bias, target, row_weights, row_bias_scales, class_weights,
                                    reduction)
    expected_grads = torch.autograd.grad(expected, [features, weight, bias])
    with contextlib.ExitStack() as stack:
        if fused_backend is not None:
            stack.enter_context(backend(fused_backend))
        loss = fused_linear_ride_loss(features, weight, bias, target, *tables, scale=30.0, normalize=True,
                                      diversity_factor=0.0, chunk_size=5, reduction=reduction,
                                      row_weights=row_weights, row_bias_scales=row_bias_scales)
    grads = torch.autograd.grad(loss, [features, weight, bias])
    torch.testing.assert_close(loss, expected)
    for grad, expected_grad in zip(grads, expected_grads):
        torch.testing.assert_close(grad, expected_grad)
    assert bool((grads[0][:, [2, 4]] == 0).all())  # the ignored row and the row of weight 0


@pytest.mark.parametrize("diversity_factor", [0.0, -0.45])
def test_gradcheck_fp64_with_row_tables(diversity_factor, implementation):
    from fastlt.ops.linear_ride_loss import fused_linear_ride_loss

    (features, weight, bias), target, row_weights, row_bias_scales, class_weights = _row_table_inputs()
    tables = (torch.rand(17, dtype=torch.float64), class_weights, torch.rand(17, dtype=torch.float64) + 0.5)

    def loss(x, w, b):
        return fused_linear_ride_loss(x, w, b, target, *tables, scale=30.0, normalize=True,
                                      diversity_factor=diversity_factor, chunk_size=4, row_weights=row_weights,
                                      row_bias_scales=row_bias_scales)

    assert torch.autograd.gradcheck(loss, (features, weight, bias))
    with backend("reference"):
        expected = loss(features, weight, bias)
    torch.testing.assert_close(loss(features, weight, bias), expected)


def test_unit_row_tables_equal_none(implementation):
    from fastlt.ops.linear_ride_loss import fused_linear_ride_loss

    (features, weight, bias), target, _, _, class_weights = _row_table_inputs()
    tables = (torch.rand(17, dtype=torch.float64), class_weights, torch.rand(17, dtype=torch.float64) + 0.5)
    kwargs = dict(scale=30.0, normalize=True, diversity_factor=-0.45, chunk_size=4)
    plain = fused_linear_ride_loss(features, weight, bias, target, *tables, **kwargs)
    ones = torch.ones(6, dtype=torch.float64)
    unit = fused_linear_ride_loss(features, weight, bias, target, *tables, row_weights=ones, row_bias_scales=ones,
                                  **kwargs)
    torch.testing.assert_close(unit, plain)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("drw", [False, True])
@pytest.mark.parametrize("shared", [False, True])
def test_ignored_rows_and_reductions_match_reference(reduction, drw, shared, implementation):
    tensors, target, counts = expert_head_inputs(3, 6, 23, 5, shared=shared)
    target[[1, 4]] = -100
    _assert_matches_reference(tensors, target, counts, drw=drw, chunk_size=7, reduction=reduction)
    # the reference itself: RIDE's loss of the kept rows alone (mean), or the sum of the rows' losses (sum)
    kept = target != -100
    features, weight = tensors
    kept_features = features[kept] if shared else features[:, kept]
    kept_loss = linear_ride_loss_reference(kept_features, weight, target[kept], counts, drw=drw, reduction=reduction)
    torch.testing.assert_close(linear_ride_loss_reference(features, weight, target, counts, drw=drw,
                                                          reduction=reduction), kept_loss)
    _, grads = head_loss_and_grads(linear_ride_loss, tensors, target, counts, drw=drw, chunk_size=7,
                                   reduction=reduction, ignore_index=-100)
    if not shared:
        assert bool((grads[0][:, ~kept] == 0).all())  # exactly zero


def test_sum_is_the_sum_of_per_row_losses_without_drw(implementation):
    tensors, target, counts = expert_head_inputs(2, 4, 15, 4)
    features, weight = tensors
    total = linear_ride_loss(features, weight, target, counts, reduction="sum", chunk_size=4)
    rows = [linear_ride_loss(features[:, b:b + 1], weight, target[b:b + 1], counts, chunk_size=4) for b in range(4)]
    torch.testing.assert_close(total, sum(rows))


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_every_row_ignored_gives_zero_loss_and_zero_gradients(reduction, implementation):
    tensors, target, counts = expert_head_inputs(2, 3, 10, 4, use_bias=True)
    target.fill_(7)
    loss, grads = head_loss_and_grads(linear_ride_loss, tensors, target, counts, drw=True, chunk_size=4,
                                      reduction=reduction, ignore_index=7)
    assert loss.item() == 0.0
    assert all(bool((grad == 0).all()) for grad in grads)


def test_triton_ignored_rows_and_sum_match_reference():
    tensors, target, counts = expert_head_inputs(2, 5, 13, 4, use_bias=True)
    target[2] = 3
    with backend("triton"):
        _assert_matches_reference(tensors, target, counts, drw=True, chunk_size=8, reduction="sum", ignore_index=3)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_gradcheck_fp64_with_ignored_rows(reduction, implementation):
    tensors, target, counts = expert_head_inputs(2, 3, 9, 4, use_bias=True)
    target[0] = -5

    def loss(features, weight, bias):
        return linear_ride_loss(features, weight, target, counts, bias=bias, drw=True, scale=4.0, margin_scale=3.0,
                                chunk_size=4, reduction=reduction, ignore_index=-5)

    assert torch.autograd.gradcheck(loss, tuple(tensors))


def test_reduction_none_is_refused_with_the_reason():
    (features, weight), target, counts = expert_head_inputs(2, 3, 10, 4)
    with pytest.raises(ValueError, match="reduction='none' is not supported.*weight gradient.*ride_loss"):
        linear_ride_loss(features, weight, target, counts, reduction="none")
    with pytest.raises(ValueError, match="reduction must be one of"):
        linear_ride_loss(features, weight, target, counts, reduction="avg")
    with pytest.raises(TypeError, match="ignore_index must be an int"):
        linear_ride_loss(features, weight, target, counts, ignore_index=1.5)
    with pytest.raises(ValueError, match="reduction='none'"):
        fastlt.LinearRIDELoss(counts, num_experts=2, in_features=4, reduction="none")


@pytest.mark.slow
def test_torch_compile_fullgraph_with_ignored_rows(implementation):
    (features, weight), target, counts = expert_head_inputs(2, 4, 12, 8, dtype=torch.float32)
    target[1] = -100
    kwargs = dict(drw=True, chunk_size=8, reduction="sum")
    compiled = torch.compile(lambda x, w: linear_ride_loss(x, w, target, counts, **kwargs), fullgraph=True)
    expected_loss, expected_grads = head_loss_and_grads(linear_ride_loss, [features, weight], target, counts, **kwargs)
    loss = compiled(features, weight)
    torch.testing.assert_close(loss.detach(), expected_loss)
    for grad, expected in zip(torch.autograd.grad(loss, [features, weight]), expected_grads):
        torch.testing.assert_close(grad, expected)


def test_module_passes_reduction_and_ignore_index():
    counts = long_tail_counts(12)
    head = fastlt.LinearRIDELoss(counts, num_experts=2, in_features=4, chunk_size=5, reduction="sum",
                                 ignore_index=-1).double()
    features, target = torch.randn(2, 3, 4, dtype=torch.float64), torch.tensor([1, -1, 5])
    expected = linear_ride_loss_reference(features, head.weight, target, counts, reduction="sum", ignore_index=-1)
    torch.testing.assert_close(head(features, target), expected)


@needs_cuda_build
def test_cuda_kernel_refuses_cpu_tensors():
    (features, weight), target, counts = expert_head_inputs(2, 3, 10, 4)
    with pytest.raises(RuntimeError, match="must be a CUDA tensor"):
        call_cuda_kernel("linear_ride_loss", features, weight, None, target, torch.zeros(10), None, torch.ones(10),
                         None, None, 30.0, True, -0.45, 1, -100, 4, True)


@needs_cuda
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("shared, use_bias, normalize", [(False, False, True), (True, True, False)])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_cuda_matches_reference(dtype, shared, use_bias, normalize, reduction):
    torch.manual_seed(0)
    tensors, target, counts = expert_head_inputs(3, 33, 1000, 24, shared=shared, use_bias=use_bias, dtype=dtype)
    tensors = [t.detach().cuda().requires_grad_(True) for t in tensors]
    target, counts = target.cuda(), counts.cuda()
    target[[0, 5]] = -100
    rtol, atol = (1e-10, 1e-12) if dtype == torch.float64 else (1e-4, 1e-5)
    with backend("cpp"):
        _assert_matches_reference(tensors, target, counts, drw=True, chunk_size=256, normalize=normalize,
                                  scale=30.0 if normalize else 1.0, reduction=reduction, rtol=rtol, atol=atol)


@pytest.mark.parametrize("normalize, shared", [(True, False), (False, True)])
def test_mean_logits_are_the_experts_mean_without_the_stack(normalize, shared):
    head = fastlt.LinearRIDELoss(long_tail_counts(20), num_experts=3, in_features=6, normalize=normalize).double()
    features = torch.randn(5, 6, dtype=torch.float64) if shared else torch.randn(3, 5, 6, dtype=torch.float64)
    torch.testing.assert_close(head.mean_logits(features), head.logits(features).mean(0))


def _heads_and_unfused_copies(counts, num_experts, in_features, **kwargs):
    from fastlt.models import NormedLinear

    head = fastlt.LinearRIDELoss(counts, num_experts=num_experts, in_features=in_features, drw_epoch=2, chunk_size=8,
                                 **kwargs).double()
    classifiers = [NormedLinear(in_features, len(counts)).double() for _ in range(num_experts)]
    with torch.no_grad():
        for k, classifier in enumerate(classifiers):
            classifier.weight.copy_(head.weight[k].t())
    return head, classifiers


@pytest.mark.parametrize("scale_by_experts", [True, False])
def test_distillation_matches_unfused_heads_and_ride_distill_loss(scale_by_experts, implementation):
    torch.manual_seed(0)
    counts = long_tail_counts(30)
    head, classifiers = _heads_and_unfused_copies(counts, 3, 8, distill_temperature=1.5, distill_factor=0.7,
                                                  distill_scale_by_experts=scale_by_experts)
    criterion = fastlt.RIDEDistillLoss(fastlt.RIDELoss(counts, drw_epoch=2), temperature=1.5, distill_factor=0.7,
                                       scale_by_experts=scale_by_experts)
    teacher_logits = 5 * torch.randn(5, 30, dtype=torch.float64)
    target = torch.randint(0, 30, (5,))
    for epoch in (1, 2):
        head.set_epoch(epoch)
        criterion.set_epoch(epoch)
        features = torch.randn(3, 5, 8, dtype=torch.float64, requires_grad=True)
        logits = torch.stack([30 * classifier(features[k]) for k, classifier in enumerate(classifiers)])
        expected = criterion(logits, target, teacher_logits)
        expected_grads = torch.autograd.grad(expected, [features] + [c.weight for c in classifiers])
        loss = head(features, target, teacher_logits)
        grad_features, grad_weight = torch.autograd.grad(loss, [features, head.weight])
        torch.testing.assert_close(loss, expected)
        torch.testing.assert_close(grad_features, expected_grads[0])
        for k in range(3):
            torch.testing.assert_close(grad_weight[k], expected_grads[1 + k].t())
    with pytest.raises(ValueError, match="teacher_logits must be"):
        head(features, target, teacher_logits[:, :5])


def test_ride_recipe_with_fused_head_distils_from_a_teacher(tmp_path):
    import yaml

    from fastlt.engine import save_checkpoint
    from fastlt.methods.builders import build_model
    from fastlt.methods.stage1 import build_method
    from fastlt.models import create_model

    torch.manual_seed(0)
    counts = long_tail_counts(10)
    teacher = create_model("ride_small_cnn", num_classes=10, num_experts=4)
    config = {"model": {"name": "ride_small_cnn", "num_experts": 4}, "method": {"name": "ride"}}
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    save_checkpoint(str(tmp_path / "last.pt"), model=teacher, epoch=0, step=0)
    model = build_model({"name": "ride_small_cnn", "num_experts": 3}, 10)
    unfused = build_model({"name": "ride_small_cnn", "num_experts": 3}, 10)
    unfused.load_state_dict(model.state_dict())
    method_config = {"name": "ride", "drw_epoch": 1, "teacher": str(tmp_path)}
    fused_method = build_method(dict(method_config, fused_head=True), counts, model)
    unfused_method = build_method(method_config, counts, unfused)
    assert fused_method.needs_images and fused_method.name == "ride_distill"
    images, target = torch.randn(4, 1, 28, 28), torch.randint(0, 10, (4,))
    for epoch in (0, 1):
        fused_method.on_epoch_start(epoch)
        unfused_method.on_epoch_start(epoch)
        torch.manual_seed(1)  # the teacher runs in train mode: same batch statistics in both
        loss = fused_method.loss_fn(model(images), target, images)
        torch.manual_seed(1)
        expected = unfused_method.loss_fn(unfused(images), target, images)
        torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-5)
    loss.backward()
    assert model.fused_head.weight.grad.abs().sum() > 0
