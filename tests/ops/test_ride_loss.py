"""ride_loss on every backend: the reference, the C++ kernels, the Triton kernels (run on CPU tensors under
TRITON_INTERPRET=1, tests/conftest.py, on small shapes as the interpreter is slow) and, in `gpu`-marked cases, the CUDA
kernels and Triton on a CUDA device."""

import loss_cases
import pytest
import torch
import torch.nn.functional as F
from op_helpers import (COMPILED_BACKENDS, assert_close, backend, backend_param, call_cuda_kernel,
                        long_tail_counts, loss_and_grad, loss_inputs, needs_cpp, needs_cuda, needs_cuda_build, on_cpu,
                        raw_op, raw_ops)

import fastlt
from fastlt.ops import ride_loss, ride_loss_reference
from fastlt.ops._lt_constants import drw_weights, ldam_margins, ride_temperatures


def test_reference_matches_the_ride_formula_by_hand():
    torch.manual_seed(1)
    logits, target, counts = loss_inputs((2, 4, 6), torch.float64)
    margins, weights = ldam_margins(counts, 0.5), drw_weights(counts, 0.9999)
    temperatures = ride_temperatures(counts, 0.05, 1.0, drw=True)
    pbar = F.softmax(logits.detach().mean(0) / temperatures, -1)
    expected = 0
    for z in logits:
        ce = torch.stack([torch.logsumexp(z[i] - 30 * margins[target[i]] * F.one_hot(target[i], 6), 0)
                          - (z[i, target[i]] - 30 * margins[target[i]]) for i in range(4)])
        expected = expected + (weights[target] * ce).sum() / weights[target].sum()
        q = F.log_softmax(z / temperatures, -1)
        expected = expected - 0.45 * temperatures.mean() ** 2 * (pbar * (pbar.log() - q)).sum() / 4
    torch.testing.assert_close(ride_loss_reference(logits, target, counts, drw=True), expected)


MATCH_CASES = ([on_cpu("cpp", shape, diversity_factor) for shape in [(1, 1, 1), (1, 3, 2), (2, 5, 7), (3, 4, 33),
                                                                     (6, 3, 300), (4, 2, 8142)]
                for diversity_factor in [-0.45, 0.0, 0.3]]
               + [on_cpu("triton", shape, diversity_factor) for shape in [(1, 1, 1), (2, 5, 7), (3, 4, 1100)]
                  for diversity_factor in [-0.45, 0.0]])  # 1100 > one 1024-class block


@pytest.mark.parametrize("name, device, shape, diversity_factor", MATCH_CASES)
@pytest.mark.parametrize("drw", [False, True])
def test_matches_reference_fp32(name, device, shape, diversity_factor, drw):
    logits, target, counts = loss_inputs(shape, device=device)
    kwargs = dict(drw=drw, diversity_factor=diversity_factor)
    expected_loss, expected_grad = loss_and_grad(ride_loss_reference, logits, target, counts, **kwargs)
    with backend(name):
        loss, grad = loss_and_grad(ride_loss, logits, target, counts, **kwargs)
    assert_close(loss, expected_loss)
    torch.testing.assert_close(grad, expected_grad, atol=1e-6 * expected_grad.abs().max().item() + 1e-9, rtol=1e-5)


@pytest.mark.parametrize("name, device, shape, dtype", loss_cases.tolerance_cases(triton_experts=2, cuda_experts=4))
def test_dtype_tolerance_table(name, device, shape, dtype):
    logits, target, counts = loss_inputs(shape, dtype, device=device)
    loss_cases.check_within_dtype_tolerance(ride_loss, ride_loss_reference, name, dtype, logits, target, counts,
                                            drw=True)


@pytest.mark.parametrize("name, shape, drw", [
    *[backend_param(name, (3, 4, 5), drw) for name in ["reference", "cpp"] for drw in [False, True]],
    ("triton", (2, 2, 3), True),  # small: the interpreter runs every gradcheck probe
])
def test_gradcheck_fp64(name, shape, drw):
    logits, target, counts = loss_inputs(shape, torch.float64, scale=2.0)
    with backend(name):
        assert torch.autograd.gradcheck(lambda z: ride_loss(z, target, counts, scale=3.0, drw=drw), (logits,))


@pytest.mark.parametrize("name, num_classes", [backend_param("cpp", 64), ("triton", 12)])  # the interpreter is slow
def test_strided_inputs_are_read_in_place(name, num_classes):
    stacked = torch.randn(6, 3, num_classes) * 10  # [B, E, C], as torch.stack(outputs, dim=1) gives
    target = torch.randint(0, num_classes, (6,))
    counts = long_tail_counts(num_classes)
    for view in (stacked.transpose(0, 1), torch.randn(3, 6, 2 * num_classes)[:, :, ::2] * 10):
        view = view.requires_grad_(True) if view.is_leaf else view.detach().requires_grad_(True)
        expected = loss_and_grad(ride_loss_reference, view.contiguous(), target, counts, drw=True)
        with backend(name):
            actual = loss_and_grad(ride_loss, view, target, counts, drw=True)
        assert_close(actual[0], expected[0])
        torch.testing.assert_close(actual[1], expected[1], atol=1e-7, rtol=1e-5)


@pytest.mark.parametrize("name", COMPILED_BACKENDS)
def test_strided_target_matches_contiguous(name):
    logits, counts = torch.randn(3, 8, 20, dtype=torch.float64), torch.arange(200, 0, -10)
    target = torch.randint(0, 20, (16,))[::2]
    assert not target.is_contiguous()
    with backend(name):
        torch.testing.assert_close(ride_loss(logits, target, counts, drw=True),
                                   ride_loss_reference(logits, target.contiguous(), counts, drw=True))


@needs_cpp
@pytest.mark.parametrize("dtype, magnitude", [(torch.float32, 1e4), (torch.float16, 6e4)])
def test_extreme_logits_and_count_ratios_stay_finite(dtype, magnitude):
    logits = ((torch.rand(3, 5, 50) * 2 - 1) * magnitude).to(dtype).requires_grad_(True)
    counts = torch.ones(50)
    counts[:3] = 1e6  # a 1e6 : 1 imbalance and classes with a single sample
    target = torch.randint(0, 50, (5,))
    with backend("cpp"):
        loss, grad = loss_and_grad(ride_loss, logits, target, counts, drw=True)
    assert torch.isfinite(loss) and torch.isfinite(grad).all()
    if dtype == torch.float32:
        expected_loss, expected_grad = loss_and_grad(ride_loss_reference, logits, target, counts, drw=True)
        torch.testing.assert_close(loss, expected_loss, rtol=1e-5, atol=1e-2)
        torch.testing.assert_close(grad, expected_grad, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", COMPILED_BACKENDS)
def test_nan_logit_makes_loss_and_its_row_nan(name):
    logits, target, counts = loss_inputs((2, 3, 10))
    with torch.no_grad():
        logits[1, 2, 4] = float("nan")
    with backend(name):
        loss, grad = loss_and_grad(ride_loss, logits, target, counts)
    assert torch.isnan(loss)
    assert torch.isnan(grad[:, 2]).all() and torch.isfinite(grad[:, :2]).all()


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda z, y, n: (z, y + 100, n), "target must be in"),
        (lambda z, y, n: (z, y[:-1], n), "target must be"),
        (lambda z, y, n: (z, y.float(), n), "int64"),
        (lambda z, y, n: (z, y, n[:-1]), "class_counts must be"),
        (lambda z, y, n: (z, y, n - n), "positive"),
        (lambda z, y, n: (z, y, -n), "positive"),
        (lambda z, y, n: (z[0], y, n), "expert_logits must have 3 dims"),
    ],
)
def test_bad_inputs_raise_value_errors_naming_the_argument(change, message):
    logits, target, counts = loss_inputs((2, 3, 10))
    with pytest.raises(ValueError, match=message):
        ride_loss(*change(logits, target, counts))


@pytest.mark.parametrize(
    "name, value, message",
    [
        ("drw_beta", 1.0, r"drw_beta must be a finite number in \[0, 1\)"),
        ("drw_beta", -0.5, "drw_beta"),
        ("base_temperature", 0.0, r"base_temperature must be a finite number in \(0, inf\)"),
        ("base_temperature", float("inf"), "base_temperature"),
        ("diversity_factor", float("nan"), "diversity_factor must be a finite number"),
        ("max_margin", float("inf"), "max_margin must be a finite number in"),
        ("max_margin", -0.1, "max_margin"),
        ("scale", float("nan"), "scale"),
        ("temperature_factor", 1.5, "temperature_factor"),
    ],
)
@pytest.mark.parametrize("name_backend", [pytest.param("cpp", marks=needs_cpp), "triton", "reference"])
def test_bad_hyperparameters_raise_the_same_value_error_on_every_backend(name, value, message, name_backend):
    logits, target, counts = loss_inputs((2, 3, 10))
    kwargs = {name: value, "drw": True}
    with backend(name_backend), pytest.raises(ValueError, match=message):
        ride_loss(logits, target, counts, **kwargs)
    with pytest.raises(ValueError, match=message):
        ride_loss_reference(logits, target, counts, **kwargs)
    with pytest.raises(ValueError, match=message):
        fastlt.RIDELoss(counts, **{key: v for key, v in kwargs.items() if key != "drw"})


@needs_cpp
def test_cpp_op_checks_its_own_arguments():
    logits, target, counts = loss_inputs((2, 3, 10))
    margins = torch.zeros(10)
    with pytest.raises(ValueError, match="target must be in"):
        torch.ops.fastlt.ride_loss(logits.detach(), target + 10, margins, None, torch.ones(10), -0.45, 1, -100, False)
    with pytest.raises(ValueError, match="temperatures must be"):
        torch.ops.fastlt.ride_loss(logits.detach(), target, margins, None, torch.ones(9), -0.45, 1, -100, False)
    with pytest.raises(ValueError, match="diversity_factor must be finite"):
        torch.ops.fastlt.ride_loss(logits.detach(), target, margins, None, torch.ones(10), float("nan"), 1, -100,
                                   False)


@needs_cpp
def test_backward_scales_by_grad_output_and_keeps_one_gradient_buffer():
    logits, target, counts = loss_inputs((2, 3, 10))
    with backend("cpp"):
        _, unit_grad = loss_and_grad(ride_loss, logits, target, counts)
        (ride_loss(logits, target, counts) * 2.5).backward()
    torch.testing.assert_close(logits.grad, 2.5 * unit_grad)
    # The first backward hands out the kernel's own buffer (no second gradient-sized tensor); a later one through
    # the same graph recomputes it, leaving what was handed out unchanged.
    tables = (torch.zeros(10), None, torch.ones(10))
    loss, buffer, _ = torch.ops.fastlt.ride_loss(logits, target, *tables, -0.45, 1, -100, True)
    (first,) = torch.autograd.grad(loss * 2, logits, retain_graph=True)
    assert first.data_ptr() == buffer.data_ptr()
    kept = first.clone()
    for factor in (3, 1):
        (again,) = torch.autograd.grad(loss * factor, logits, retain_graph=True)
        assert again.data_ptr() != buffer.data_ptr()
        torch.testing.assert_close(again, kept * factor / 2)
    assert torch.equal(first, kept)


@needs_cpp
def test_no_gradient_is_computed_without_requires_grad():
    logits, target, counts = loss_inputs((2, 3, 10))
    with backend("cpp"):
        loss = ride_loss(logits.detach(), target, counts)
    assert not loss.requires_grad
    _, grad, _ = torch.ops.fastlt.ride_loss(logits.detach(), target, torch.zeros(10), None, torch.ones(10), -0.45, 1,
                                            -100, False)
    assert grad.numel() == 0


@pytest.mark.parametrize("op_name", raw_ops("ride_loss"))
def test_opcheck(op_name):
    logits, target, _ = loss_inputs((2, 3, 10))
    for weights in (False, True):
        args = (logits, target, *loss_cases.ride_tables(10, weights), -0.45, 1, -100, True)
        torch.library.opcheck(raw_op(op_name), args,
                              test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_dynamic"))


@needs_cuda_build
def test_cuda_launcher_refuses_cpu_tensors():
    logits, target, _ = loss_inputs((2, 3, 10))
    with pytest.raises(RuntimeError, match="must be a CUDA tensor"):
        call_cuda_kernel("ride_loss", logits.detach(), target, *loss_cases.ride_tables(10, weights=True), -0.45, 1,
                         -100, True)


@pytest.mark.parametrize("name, compiler, shape", [pytest.param("cpp", "inductor", (3, 4, 20),
                                                                marks=[needs_cpp, pytest.mark.slow]),
                                                   ("triton", "aot_eager", (2, 3, 9))])
def test_torch_compile_fullgraph_matches_eager(name, compiler, shape):
    logits, target, counts = loss_inputs(shape)
    compiled = torch.compile(lambda z: ride_loss(z, target, counts, drw=True), fullgraph=True, backend=compiler)
    expected = loss_and_grad(ride_loss_reference, logits, target, counts, drw=True)
    with backend(name):
        loss = compiled(logits)
        (grad,) = torch.autograd.grad(loss, logits)
    assert_close(loss.detach(), expected[0])
    assert_close(grad, expected[1])


@pytest.mark.parametrize("name", [pytest.param("cpp", marks=needs_cpp), "triton", "reference"])
def test_int32_targets_and_a_list_of_counts_are_accepted(name):
    logits, target, counts = loss_inputs((2, 3, 10))
    expected = ride_loss_reference(logits, target, counts, drw=True)
    with backend(name):
        assert_close(ride_loss(logits, target.int(), counts.tolist(), drw=True), expected)
        with pytest.raises(ValueError, match="LDAM's margin n\\^-1/4 of a class without training samples"):
            ride_loss(logits, target, [0.0] + counts.tolist()[1:])


# ---- reductions, ignored rows and components (docs/methods.md 6.5) ----

BACKENDS = [pytest.param("cpp", marks=needs_cpp), "triton", "reference"]
FUSED_BACKENDS = [pytest.param("cpp", marks=needs_cpp), "triton"]
IGNORED_ROWS = {"no row ignored": [], "some rows ignored": [1, 3], "all rows ignored": [0, 1, 2, 3, 4]}  # of B = 5


def _with_ignored(target, rows, ignore_index=-100):
    target = target.clone()
    target[rows] = ignore_index
    return target


def _row_weights(batch, dtype=torch.float64):
    """A grad_output that weights each row differently (for reduction="none")."""
    return torch.linspace(0.5, 2.0, batch, dtype=dtype)


def _loss_grad_components(fn, logits, target, counts, reduction, **kwargs):
    loss, components = fn(logits, target, counts, reduction=reduction, return_components=True, **kwargs)
    grad_output = _row_weights(loss.shape[0], loss.dtype).to(loss.device) if reduction == "none" else None
    (grad,) = torch.autograd.grad(loss, logits, grad_output)
    return loss.detach(), grad, components


def _check_against_reference(name, logits, target, counts, reduction, rows):
    expected_loss, expected_grad, expected_components = _loss_grad_components(
        ride_loss_reference, logits, target, counts, reduction, drw=True)
    with backend(name):
        loss, grad, components = _loss_grad_components(ride_loss, logits, target, counts, reduction, drw=True)
    assert_close(loss, expected_loss)
    torch.testing.assert_close(grad, expected_grad, atol=1e-6 * expected_grad.abs().max().item() + 1e-9, rtol=1e-5)
    assert (grad[:, rows] == 0).all()  # exactly: an ignored row's logits get no gradient
    num_experts, batch = logits.shape[:2]
    assert sorted(components) == ["ce", "diversity"]
    for key, value in components.items():
        assert value.shape == ((batch, num_experts) if reduction == "none" else (num_experts,))
        assert not value.requires_grad
        assert_close(value, expected_components[key])
    assert_close(components["ce"].sum(-1) + components["diversity"].sum(-1), loss)  # they add up to the loss
    if reduction == "none":
        assert (loss[rows] == 0).all()
    if len(rows) == batch:  # all ignored: 0 with a zero gradient, where F.cross_entropy gives NaN
        assert (loss == 0).all() and (grad == 0).all()


@pytest.mark.parametrize("name", BACKENDS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("ignored", list(IGNORED_ROWS))
def test_reductions_and_ignored_rows_match_the_reference(name, reduction, ignored):
    torch.manual_seed(0)
    logits, target, counts = loss_inputs((3, 5, 7))
    rows = IGNORED_ROWS[ignored]
    _check_against_reference(name, logits, _with_ignored(target, rows), counts, reduction, rows)


@needs_cuda
@pytest.mark.gpu
@pytest.mark.parametrize("name", ["cpp", "triton"])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("ignored", list(IGNORED_ROWS))
def test_cuda_reductions_and_ignored_rows_match_the_reference(name, reduction, ignored):
    if name == "cpp" and not fastlt._extension.HAS_CUDA:
        pytest.skip("extension built without CUDA kernels")
    torch.manual_seed(0)
    logits, target, counts = loss_inputs((3, 5, 1100))
    rows = IGNORED_ROWS[ignored]
    logits = logits.detach().cuda().requires_grad_(True)
    _check_against_reference(name, logits, _with_ignored(target, rows).cuda(), counts.cuda(), reduction, rows)


@pytest.mark.parametrize("name", BACKENDS)
@pytest.mark.parametrize("drw", [False, True])
def test_mean_is_weighted_cross_entropy_plus_batchmean_kl_over_the_kept_rows(name, drw):
    torch.manual_seed(1)
    logits, target, counts = loss_inputs((2, 6, 9), torch.float64)
    target = _with_ignored(target, [0, 4], ignore_index=-1)
    kept = target != -1
    margins = 30 * ldam_margins(counts, 0.5)
    weights = drw_weights(counts, 0.9999) if drw else None
    temperatures = ride_temperatures(counts, 0.05, 1.0, drw=drw)
    labels = target.clamp_min(0)
    mean_distribution = F.softmax(logits.detach()[:, kept].mean(0) / temperatures, -1)
    expected = 0
    for z in logits:
        margin_logits = z - margins[labels][:, None] * F.one_hot(labels, 9)
        expected = expected + F.cross_entropy(margin_logits, target, weight=weights, ignore_index=-1)
        expected = expected - 0.45 * temperatures.mean() ** 2 * F.kl_div(
            F.log_softmax(z[kept] / temperatures, -1), mean_distribution, reduction="batchmean")
    with backend(name):
        torch.testing.assert_close(ride_loss(logits, target, counts, drw=drw, ignore_index=-1), expected)


@pytest.mark.parametrize("name", BACKENDS)
def test_none_rows_add_up_to_the_sum(name):
    logits, target, counts = loss_inputs((2, 5, 7))
    target = _with_ignored(target, [2])
    with backend(name):
        rows = ride_loss(logits, target, counts, drw=True, reduction="none")
        total = ride_loss(logits, target, counts, drw=True, reduction="sum")
    assert rows.shape == (5,) and rows[2] == 0
    assert_close(rows.sum(), total)


@pytest.mark.parametrize("name", BACKENDS)
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_gradcheck_fp64_with_an_ignored_row(name, reduction):
    logits, target, counts = loss_inputs((2, 3, 4), torch.float64, scale=2.0)
    target = _with_ignored(target, [1])
    with backend(name):
        assert torch.autograd.gradcheck(
            lambda z: ride_loss(z, target, counts, scale=3.0, drw=True, reduction=reduction), (logits,), fast_mode=True)


@pytest.mark.parametrize("name", BACKENDS)
def test_reduction_none_gradient_matches_central_differences_fp64(name):
    """gradcheck's fast mode, written out (directional derivatives): gradcheck backpropagates twice through one
    graph, which the fused ops refuse for a [B] grad_output (they scale the saved gradient in place,
    fastlt/ops/_fused_loss.py)."""
    logits, target, counts = loss_inputs((2, 3, 4), torch.float64, scale=2.0)
    target = _with_ignored(target, [1])

    def objective(z):  # the rows weighted unevenly
        return (ride_loss(z, target, counts, scale=3.0, drw=True, reduction="none") * _row_weights(3)).sum()

    step = 1e-6
    with backend(name):
        (analytical,) = torch.autograd.grad(objective(logits), logits)
        for direction in torch.randn(3, *logits.shape, dtype=torch.float64):
            point = logits.detach()
            numerical = (objective(point + step * direction) - objective(point - step * direction)) / (2 * step)
            torch.testing.assert_close((analytical * direction).sum(), numerical, atol=1e-7, rtol=1e-5)
    assert (analytical[:, 1] == 0).all()


@pytest.mark.parametrize("op_name", raw_ops("ride_loss"))
@pytest.mark.parametrize("reduction", [0, 1])  # none, mean
def test_opcheck_with_a_reduction_and_an_ignored_row(op_name, reduction):
    logits, target, _ = loss_inputs((2, 3, 10))
    args = (logits, _with_ignored(target, [1]), torch.rand(10), torch.rand(10) + 0.5, torch.rand(10) + 0.5, -0.45,
            reduction, -100, True)
    torch.library.opcheck(raw_op(op_name), args,
                          test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_dynamic"))


@pytest.mark.parametrize("name", FUSED_BACKENDS)
def test_torch_compile_fullgraph_with_reduction_none(name):
    loss_cases.check_torch_compile_fullgraph_with_reduction_none("ride_loss", name)


@pytest.mark.parametrize("name", FUSED_BACKENDS)
def test_create_graph_with_reduction_none_matches_the_reference(name):
    loss_cases.check_create_graph_with_reduction_none("ride_loss", name)


@pytest.mark.parametrize("name", BACKENDS)
def test_bad_reduction_or_ignore_index_is_refused(name):
    logits, target, counts = loss_inputs((2, 3, 10))
    for function in (ride_loss, ride_loss_reference):
        with backend(name):
            with pytest.raises(ValueError, match="reduction must be one of"):
                function(logits, target, counts, reduction="avg")
            with pytest.raises(TypeError, match="ignore_index must be an int"):
                function(logits, target, counts, ignore_index=-100.0)
            with pytest.raises(ValueError, match="target must be in"):  # -1 is not the ignore_index
                function(logits, _with_ignored(target, [0], -1), counts)
            with pytest.raises(ValueError, match="target must be in"):
                function(logits, _with_ignored(target, [0], 10), counts, ignore_index=-1)


@pytest.mark.parametrize("op_name", raw_ops("ride_loss"))
def test_raw_op_refuses_a_bad_reduction_code_and_a_label_that_is_not_ignored(op_name):
    logits, target, _ = loss_inputs((2, 3, 10))
    tables = (torch.zeros(10), None, torch.ones(10), -0.45)
    op = raw_op(op_name)
    with pytest.raises(ValueError, match="reduction must be 0"):
        op(logits.detach(), target, *tables, 3, -100, False)
    with pytest.raises(ValueError, match="target must be in"):
        op(logits.detach(), _with_ignored(target, [0]), *tables, 1, -1, False)


# ---- second order, torch.func and the raw op's refusals: the checks shared with the other fused losses ----

SECOND_ORDER_CASES = ["ride_loss", "ride_loss_without_diversity"]


@pytest.mark.parametrize("case", SECOND_ORDER_CASES)
@pytest.mark.parametrize("name", COMPILED_BACKENDS)
def test_create_graph_keeps_the_second_order_term(case, name):
    loss_cases.check_create_graph_keeps_the_second_order_term(case, name)


@needs_cpp
def test_gradgradcheck_fp64():
    """cpp only: the Triton ops share the autograd glue (and the interpreter makes gradgradcheck slow)."""
    loss_cases.check_gradgradcheck_fp64("ride_loss_without_diversity", "cpp")


@pytest.mark.parametrize("case", SECOND_ORDER_CASES)
@pytest.mark.parametrize("name", COMPILED_BACKENDS)
def test_torch_func_grad_and_vmap(case, name):
    loss_cases.check_torch_func_grad_and_vmap(case, name)


@pytest.mark.parametrize("overload", raw_ops("ride_loss"))
@pytest.mark.parametrize("change", loss_cases.raw_refusals("ride_loss"))
def test_raw_ops_refuse_bad_arguments_with_value_error(overload, change):
    loss_cases.check_raw_op_refuses_with_value_error(overload, change)
