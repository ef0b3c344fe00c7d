"""prior_shifted_ce on every backend: the reference, the C++ kernels, the Triton kernels (run on CPU tensors under
TRITON_INTERPRET=1, tests/conftest.py, on small shapes as the interpreter is slow) and, in `gpu`-marked cases, the CUDA
kernels and Triton on a CUDA device."""

import loss_cases
import pytest
import torch
import torch.nn.functional as F
from op_helpers import (COMPILED_BACKENDS, assert_close, backend, backend_param, call_cuda_kernel,
                        long_tail_counts, loss_and_grad, loss_inputs, needs_cpp, needs_cuda, needs_cuda_build, on_cpu,
                        raw_op, raw_ops)

from fastlt.ops import prior_shifted_ce, prior_shifted_ce_reference, shifted_ce


def _inputs(shape, dtype=torch.float32, scale=10.0, device="cpu"):
    """loss_inputs and one tau per expert (RIDE-style experts with different adjustments)."""
    return *loss_inputs(shape, dtype, scale, device), torch.linspace(-1.0, 2.0, shape[0]).tolist()


def test_reference_matches_the_formula_by_hand():
    logits, target, counts, taus = _inputs((2, 4, 6), torch.float64)
    prior = counts.double() / counts.sum()
    expected = 0
    for expert, tau in zip(logits, taus):
        shifted = expert + tau * prior.log()
        expected = expected + sum(torch.logsumexp(shifted[i], 0) - shifted[i, target[i]] for i in range(4)) / 4
    torch.testing.assert_close(prior_shifted_ce_reference(logits, target, counts, taus=taus), expected)


@pytest.mark.parametrize("name", [pytest.param("cpp", marks=needs_cpp), "reference"])
def test_zero_tau_is_plain_cross_entropy(name):
    logits, target, counts, _ = _inputs((1, 5, 9))
    with backend(name):
        loss = prior_shifted_ce(logits, target, counts, taus=[0.0])
    assert_close(loss, F.cross_entropy(logits[0], target))


MATCH_CASES = ([on_cpu("cpp", shape) for shape in [(1, 1, 1), (1, 3, 2), (2, 5, 7), (3, 4, 33), (5, 3, 300), (6, 2, 64),
                                                   (2, 2, 8142)]]
               + [on_cpu("triton", shape) for shape in [(1, 1, 1), (3, 5, 7), (2, 3, 1100)]])


@pytest.mark.parametrize("name, device, shape", MATCH_CASES)
def test_matches_reference_fp32(name, device, shape):
    logits, target, counts, taus = _inputs(shape, device=device)
    expected_loss, expected_grad = loss_and_grad(prior_shifted_ce_reference, logits, target, counts, taus=taus)
    with backend(name):
        loss, grad = loss_and_grad(prior_shifted_ce, logits, target, counts, taus=taus)
    assert_close(loss, expected_loss)
    torch.testing.assert_close(grad, expected_grad, atol=1e-6 * expected_grad.abs().max().item() + 1e-9, rtol=1e-5)


@pytest.mark.parametrize("name, device, shape, dtype", loss_cases.tolerance_cases())
def test_dtype_tolerance_table(name, device, shape, dtype):
    logits, target, counts, taus = _inputs(shape, dtype, device=device)
    loss_cases.check_within_dtype_tolerance(prior_shifted_ce, prior_shifted_ce_reference, name, dtype, logits, target,
                                            counts, taus=taus)


@pytest.mark.parametrize("name, shape", [("reference", (1, 4, 5)), ("reference", (3, 4, 5)),
                                         backend_param("cpp", (1, 4, 5)), backend_param("cpp", (3, 4, 5)),
                                         ("triton", (2, 2, 3))])  # small: the interpreter runs every probe
def test_gradcheck_fp64(name, shape):
    logits, target, counts, taus = _inputs(shape, torch.float64, scale=2.0)
    with backend(name):
        assert torch.autograd.gradcheck(lambda z: prior_shifted_ce(z, target, counts, taus=taus), (logits,))


@pytest.mark.parametrize("name, num_classes", [backend_param("cpp", 64), ("triton", 12)])  # the interpreter is slow
def test_strided_inputs_are_read_in_place(name, num_classes):
    stacked = torch.randn(6, 3, num_classes) * 10  # [B, E, C], as torch.stack(outputs, dim=1) gives
    target, counts, taus = torch.randint(0, num_classes, (6,)), long_tail_counts(num_classes), [1.0, 0.5, 0.0]
    for view in (stacked.transpose(0, 1), torch.randn(3, 6, 2 * num_classes)[:, :, ::2] * 10):
        view = view.requires_grad_(True) if view.is_leaf else view.detach().requires_grad_(True)
        expected = loss_and_grad(prior_shifted_ce_reference, view.contiguous(), target, counts, taus=taus)
        with backend(name):
            actual = loss_and_grad(prior_shifted_ce, view, target, counts, taus=taus)
        assert_close(actual[0], expected[0])
        torch.testing.assert_close(actual[1], expected[1], atol=1e-7, rtol=1e-5)


@pytest.mark.parametrize("name", COMPILED_BACKENDS)
def test_strided_target_matches_contiguous(name):
    logits, counts, taus = torch.randn(3, 8, 20, dtype=torch.float64), torch.arange(200, 0, -10), [0.0, 1.0, 2.0]
    target = torch.randint(0, 20, (16,))[::2]
    assert not target.is_contiguous()
    with backend(name):
        torch.testing.assert_close(prior_shifted_ce(logits, target, counts, taus=taus),
                                   prior_shifted_ce_reference(logits, target.contiguous(), counts, taus=taus))


@needs_cpp
@pytest.mark.parametrize("dtype, magnitude", [(torch.float32, 1e4), (torch.float16, 6e4)])
def test_extreme_logits_and_count_ratios_stay_finite(dtype, magnitude):
    logits = ((torch.rand(2, 5, 50) * 2 - 1) * magnitude).to(dtype).requires_grad_(True)
    counts = torch.ones(50)
    counts[:3] = 1e6  # a 1e6 : 1 imbalance and classes with a single sample
    target, taus = torch.randint(0, 50, (5,)), [1.0, 2.0]
    with backend("cpp"):
        loss, grad = loss_and_grad(prior_shifted_ce, logits, target, counts, taus=taus)
    assert torch.isfinite(loss) and torch.isfinite(grad).all()
    if dtype == torch.float32:
        expected_loss, expected_grad = loss_and_grad(prior_shifted_ce_reference, logits, target, counts, taus=taus)
        torch.testing.assert_close(loss, expected_loss, rtol=1e-5, atol=1e-2)
        torch.testing.assert_close(grad, expected_grad, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", COMPILED_BACKENDS)
def test_nan_logit_makes_loss_and_its_row_nan(name):
    logits, target, counts, taus = _inputs((2, 3, 10))
    with torch.no_grad():
        logits[1, 2, 4] = float("nan")
    with backend(name):
        loss, grad = loss_and_grad(prior_shifted_ce, logits, target, counts, taus=taus)
    assert torch.isnan(loss)
    assert torch.isnan(grad[1, 2]).all() and torch.isfinite(grad[0]).all() and torch.isfinite(grad[1, :2]).all()


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda z, y, n, t: (z, y + 100, n, t), "target must be in"),
        (lambda z, y, n, t: (z, y[:-1], n, t), "target must be"),
        (lambda z, y, n, t: (z, y, n[:-1], t), "class_counts must be"),
        (lambda z, y, n, t: (z, y, n - n, t), "positive"),
        (lambda z, y, n, t: (z, y, -n, t), "positive"),
        (lambda z, y, n, t: (z, y, n, t[:1]), "one value per expert"),
        (lambda z, y, n, t: (z, y, n, [float("inf"), 1.0]), "finite"),
        (lambda z, y, n, t: (z[0, 0], y, n, t), "expert_logits must have 3 dims"),
    ],
)
def test_bad_inputs_raise_value_errors_naming_the_argument(change, message):
    logits, target, counts, taus = _inputs((2, 3, 10))
    logits, target, counts, taus = change(logits, target, counts, taus)
    with pytest.raises(ValueError, match=message):
        prior_shifted_ce(logits, target, counts, taus=taus)


@needs_cpp
def test_cpp_op_checks_its_own_arguments():
    logits, target, _, _ = _inputs((2, 3, 10))
    with pytest.raises(ValueError, match="target must be in"):
        torch.ops.fastlt.prior_shifted_ce(logits.detach(), target + 10, torch.zeros(2, 10), 1, -100, False)
    with pytest.raises(ValueError, match="logit_shifts must be"):
        torch.ops.fastlt.prior_shifted_ce(logits.detach(), target, torch.zeros(1, 10), 1, -100, False)


@needs_cpp
def test_backward_scales_by_grad_output_and_keeps_one_gradient_buffer():
    logits, target, counts, taus = _inputs((2, 3, 10))
    with backend("cpp"):
        _, unit_grad = loss_and_grad(prior_shifted_ce, logits, target, counts, taus=taus)
        (prior_shifted_ce(logits, target, counts, taus=taus) * 2.5).backward()
    torch.testing.assert_close(logits.grad, 2.5 * unit_grad)
    _, grad, _ = torch.ops.fastlt.prior_shifted_ce(logits.detach(), target, torch.zeros(2, 10), 1, -100, False)
    assert grad.numel() == 0


@pytest.mark.parametrize("op_name", raw_ops("prior_shifted_ce"))
def test_opcheck(op_name):
    logits, target, _, _ = _inputs((2, 3, 10))
    torch.library.opcheck(raw_op(op_name), (logits, target, torch.randn(2, 10), 1, -100, True),
                          test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_dynamic"))


@needs_cuda_build
def test_cuda_launcher_refuses_cpu_tensors():
    logits, target, _, _ = _inputs((2, 3, 10))
    with pytest.raises(RuntimeError, match="must be a CUDA tensor"):
        call_cuda_kernel("prior_shifted_ce", logits.detach(), target, torch.randn(2, 10), 1, -100, True)


@pytest.mark.parametrize("name, compiler, shape", [pytest.param("cpp", "inductor", (3, 4, 20),
                                                                marks=[needs_cpp, pytest.mark.slow]),
                                                   ("triton", "aot_eager", (2, 3, 9))])
def test_torch_compile_fullgraph_matches_eager(name, compiler, shape):
    logits, target, counts, taus = _inputs(shape)
    compiled = torch.compile(lambda z: prior_shifted_ce(z, target, counts, taus=taus), fullgraph=True,
                             backend=compiler)
    expected = loss_and_grad(prior_shifted_ce_reference, logits, target, counts, taus=taus)
    with backend(name):
        loss = compiled(logits)
        (grad,) = torch.autograd.grad(loss, logits)
    assert_close(loss.detach(), expected[0])
    assert_close(grad, expected[1])


# ---- conveniences: single head, int32 targets, a list of counts, one tau, soft targets, label smoothing ----

BACKENDS = [pytest.param("cpp", marks=needs_cpp), "triton", "reference"]


@pytest.mark.parametrize("name", BACKENDS)
def test_single_head_int32_targets_list_counts_and_one_tau(name):
    logits, target, counts, _ = _inputs((1, 5, 9))
    expected_loss, expected_grad = loss_and_grad(prior_shifted_ce_reference, logits, target, counts, taus=[0.7])
    head = logits.detach()[0].requires_grad_(True)
    with backend(name):
        loss = prior_shifted_ce(head, target.int(), counts.tolist(), taus=0.7)
        (grad,) = torch.autograd.grad(loss, head)
        two_experts = prior_shifted_ce(logits.detach().expand(2, 5, 9), target, counts, taus=0.7)
    assert_close(loss.detach(), expected_loss)
    assert_close(grad, expected_grad[0])
    assert_close(two_experts, 2 * expected_loss)


@pytest.mark.parametrize("name", BACKENDS)
def test_soft_targets_and_label_smoothing_match_cross_entropy(name):
    logits, target, counts, taus = _inputs((2, 4, 6), torch.float64)
    shifts = [tau * (counts.double() / counts.sum()).log() for tau in taus]
    probabilities = torch.softmax(torch.randn(4, 6, dtype=torch.float64), 1)
    with backend(name):
        soft = prior_shifted_ce(logits, probabilities, counts, taus=taus)
        smoothed = prior_shifted_ce(logits, target, counts, taus=taus, label_smoothing=0.1)
    torch.testing.assert_close(soft, sum(F.cross_entropy(z + s, probabilities) for z, s in zip(logits, shifts)))
    torch.testing.assert_close(smoothed, sum(F.cross_entropy(z + s, target, label_smoothing=0.1)
                                             for z, s in zip(logits, shifts)))
    onehot = F.one_hot(target, 6).double()
    torch.testing.assert_close(prior_shifted_ce(logits, onehot, counts, taus=taus),
                               prior_shifted_ce(logits, target, counts, taus=taus))


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(target=lambda t: torch.rand(4, 5)), "must be \\[B, C\\]"),
        (dict(target=lambda t: -torch.rand(4, 6)), "finite and >= 0"),
        (dict(label_smoothing=1.5), "label_smoothing"),
        (dict(counts=lambda n: torch.cat([n[:-1], torch.zeros(1)])), "log prior of a class without training"),
    ],
)
def test_conveniences_refuse_what_is_ill_defined(change, message):
    logits, target, counts, taus = _inputs((2, 4, 6))
    target = change.get("target", lambda t: t)(target)
    counts = change.get("counts", lambda n: n)(counts)
    with pytest.raises(ValueError, match=message):
        prior_shifted_ce(logits, target, counts, taus=taus, label_smoothing=change.get("label_smoothing", 0.0))


# ---- reduction, ignore_index and return_components (docs/methods.md 6.5) ----

REDUCTIONS = ["mean", "sum", "none"]
IGNORED_ROWS = {"no row ignored": [], "some rows ignored": [1, 3], "every row ignored": [0, 1, 2, 3, 4]}
FUSED = [pytest.param("cpp", "cpu", marks=needs_cpp), pytest.param("triton", "cpu"),
         pytest.param("cpp", "cuda", marks=[needs_cuda, needs_cuda_build, pytest.mark.gpu]),
         pytest.param("triton", "cuda", marks=[needs_cuda, pytest.mark.gpu])]
FUSED_ON_CPU = [pytest.param("cpp", marks=needs_cpp), "triton"]


def _with_ignored_rows(rows, shape=(3, 5, 7), dtype=torch.float32, device="cpu", ignore_index=-100):
    logits, target, counts, taus = _inputs(shape, dtype)
    target[rows] = ignore_index
    return logits.detach().to(device).requires_grad_(True), target.to(device), counts.to(device), taus


def _shift_table(counts, taus):
    """[E, C]: tau_k * log(pi)."""
    return torch.tensor(taus, dtype=torch.float64)[:, None] * (counts.double() / counts.sum()).log()


def _shifted(logits, counts, taus):
    return [expert + shift.to(logits.device) for expert, shift in zip(logits, _shift_table(counts, taus))]


@pytest.mark.parametrize("name, device", FUSED)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("ignored", list(IGNORED_ROWS))
def test_fused_reductions_and_ignored_rows_match_reference(name, device, reduction, ignored):
    logits, target, counts, taus = _with_ignored_rows(IGNORED_ROWS[ignored], device=device)
    kwargs = dict(taus=taus, reduction=reduction, return_components=True)
    # grad_output: per-row weights under none (the backward scales row b by weights[b])
    grad_output = torch.rand(5, device=device) + 0.5 if reduction == "none" else torch.tensor(1.7, device=device)
    expected, expected_parts = prior_shifted_ce_reference(logits, target, counts, **kwargs)
    (expected_grad,) = torch.autograd.grad(expected, logits, grad_output)
    with backend(name):
        loss, parts = prior_shifted_ce(logits, target, counts, **kwargs)
        (grad,) = torch.autograd.grad(loss, logits, grad_output)
    assert loss.shape == ((5,) if reduction == "none" else ())
    assert_close(loss.detach(), expected.detach())
    torch.testing.assert_close(grad, expected_grad, atol=1e-6 * expected_grad.abs().max().item() + 1e-9, rtol=1e-5)
    assert list(parts) == ["ce"] and parts["ce"].shape == ((5, 3) if reduction == "none" else (3,))
    assert not parts["ce"].requires_grad
    assert_close(parts["ce"], expected_parts["ce"])
    assert_close(parts["ce"].sum(-1), loss.detach())
    assert (grad[:, IGNORED_ROWS[ignored]] == 0).all()
    if ignored == "every row ignored":
        assert (loss == 0).all() and (grad == 0).all()


@pytest.mark.parametrize("name", BACKENDS)
@pytest.mark.parametrize("ignored", list(IGNORED_ROWS))
def test_reductions_match_torch_cross_entropy(name, ignored):
    logits, target, counts, taus = _with_ignored_rows(IGNORED_ROWS[ignored])
    shifted = _shifted(logits.detach(), counts, taus)
    with backend(name), torch.no_grad():
        losses = {reduction: prior_shifted_ce(logits, target, counts, taus=taus, reduction=reduction)
                  for reduction in REDUCTIONS}
    assert_close(losses["sum"], sum(F.cross_entropy(x, target, reduction="sum") for x in shifted).float())
    assert_close(losses["none"], sum(F.cross_entropy(x, target, reduction="none") for x in shifted).float())
    assert_close(losses["none"].sum(), losses["sum"])
    if ignored == "every row ignored":  # F.cross_entropy's mean is NaN here
        assert losses["mean"] == 0
    else:
        assert_close(losses["mean"], sum(F.cross_entropy(x, target) for x in shifted).float())


@pytest.mark.parametrize("name", BACKENDS)
@pytest.mark.parametrize("ignore_index", [2, 2**40])  # a class of the batch; a label far outside any row of logits
def test_any_ignore_index_skips_its_rows(name, ignore_index):
    logits, target, counts, taus = _with_ignored_rows([0, 4], ignore_index=ignore_index)
    if ignore_index == 2:
        target[2] = 2
    kept = target != ignore_index
    shifted = _shifted(logits.detach().double(), counts, taus)
    shifts = _shift_table(counts, taus)
    with backend(name):
        loss = prior_shifted_ce(logits, target, counts, taus=taus, ignore_index=ignore_index)
        (grad,) = torch.autograd.grad(loss, logits)
        explicit = shifted_ce(logits, target, shifts, ignore_index=ignore_index)
    expected = sum(F.cross_entropy(x, target, ignore_index=ignore_index) for x in shifted).float()
    assert_close(loss.detach(), expected)
    assert_close(explicit.detach(), expected)
    assert (grad[:, ~kept] == 0).all() and (grad[:, kept] != 0).any()


@pytest.mark.parametrize("name", BACKENDS)
@pytest.mark.parametrize("label_smoothing", [0.0, 0.1])  # the fused kernels; the eager formula
def test_an_ignored_row_with_nan_and_inf_logits_adds_nothing(name, label_smoothing):
    logits, target, counts, taus = _with_ignored_rows([2])
    with torch.no_grad():
        logits[0, 2, 1], logits[1, 2, 3] = float("nan"), float("inf")
    with backend(name):
        loss = prior_shifted_ce(logits, target, counts, taus=taus, label_smoothing=label_smoothing, reduction="none")
        (grad,) = torch.autograd.grad(loss.sum(), logits)
    assert loss[2] == 0 and torch.isfinite(loss).all()
    assert (grad[:, 2] == 0).all() and torch.isfinite(grad).all()


@pytest.mark.parametrize("name", BACKENDS)
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_gradcheck_fp64_with_an_ignored_row(name, reduction):
    logits, target, counts, taus = _inputs((2, 3, 3), torch.float64, scale=2.0)
    target[1] = -100
    with backend(name):
        assert torch.autograd.gradcheck(
            lambda z: prior_shifted_ce(z, target, counts, taus=taus, reduction=reduction), (logits,))


@pytest.mark.parametrize("name", BACKENDS)
def test_reduction_none_jacobian_fp64_matches_finite_differences(name):
    """gradcheck for "none", one backward per forward: gradcheck's own runs two backwards through one graph (its
    reentrancy check), which the fused ops refuse, as their backward scales the saved gradient in place."""
    logits, target, counts, taus = _inputs((2, 3, 3), torch.float64, scale=2.0)
    target[1] = -100

    def per_row(z):
        return prior_shifted_ce(z, target, counts, taus=taus, reduction="none")

    step = 1e-6
    with backend(name):
        analytic = torch.stack([torch.autograd.grad(per_row(logits), logits, F.one_hot(torch.tensor(b), 3).double())[0]
                                for b in range(3)])
        with torch.no_grad():
            numeric = torch.stack([(per_row(logits + step * e) - per_row(logits - step * e)) / (2 * step)
                                   for e in torch.eye(logits.numel(), dtype=torch.float64).view(-1, *logits.shape)],
                                  dim=-1).view(3, *logits.shape)
    torch.testing.assert_close(analytic, numeric, atol=1e-7, rtol=1e-5)
    assert (analytic[:, :, 1] == 0).all()


@pytest.mark.parametrize("overload", raw_ops("prior_shifted_ce"))
@pytest.mark.parametrize("reduction", [0, 1])  # none, mean
def test_opcheck_with_reduction_and_ignored_rows(overload, reduction):
    logits, target, _, _ = _inputs((2, 3, 10))
    target[1] = -100
    torch.library.opcheck(raw_op(overload), (logits, target, torch.randn(2, 10), reduction, -100, True),
                          test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_dynamic"))


@pytest.mark.parametrize("name", FUSED_ON_CPU)
def test_torch_compile_fullgraph_with_reduction_none(name):
    loss_cases.check_torch_compile_fullgraph_with_reduction_none("prior_shifted_ce", name)


@pytest.mark.parametrize("name", FUSED_ON_CPU)
def test_create_graph_with_reduction_none_keeps_the_second_order_term(name):
    loss_cases.check_create_graph_with_reduction_none("prior_shifted_ce", name)


@pytest.mark.parametrize("name", BACKENDS)
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_eager_only_paths_take_reduction_and_components(name, reduction):
    """Soft targets and label smoothing run F.cross_entropy per expert, reduced as the kernels reduce."""
    logits, target, counts, taus = _with_ignored_rows([1], shape=(2, 4, 6), dtype=torch.float64)
    shifted = _shifted(logits, counts, taus)
    probabilities = torch.softmax(torch.randn(4, 6, dtype=torch.float64), 1)
    with backend(name):
        soft, soft_parts = prior_shifted_ce(logits, probabilities, counts, taus=taus, reduction=reduction,
                                            return_components=True)
        smoothed, smoothed_parts = prior_shifted_ce(logits, target, counts, taus=taus, label_smoothing=0.1,
                                                    reduction=reduction, return_components=True)
        none_kept = prior_shifted_ce(logits, torch.full_like(target, -100), counts, taus=taus, label_smoothing=0.1,
                                     reduction=reduction)
        (none_kept_grad,) = torch.autograd.grad(none_kept.sum(), logits)
    torch.testing.assert_close(soft, sum(F.cross_entropy(x, probabilities, reduction=reduction) for x in shifted))
    torch.testing.assert_close(smoothed, sum(F.cross_entropy(x, target, label_smoothing=0.1, reduction=reduction)
                                             for x in shifted))
    for loss, parts in ((soft, soft_parts), (smoothed, smoothed_parts)):
        assert parts["ce"].shape == ((4, 2) if reduction == "none" else (2,)) and not parts["ce"].requires_grad
        torch.testing.assert_close(parts["ce"].sum(-1), loss.detach())
    assert (none_kept == 0).all() and (none_kept_grad == 0).all()  # F.cross_entropy's mean would be NaN


@pytest.mark.parametrize("name", BACKENDS)
def test_shifted_ce_takes_the_same_keywords(name):
    logits, target, counts, taus = _with_ignored_rows([2])
    shifts = _shift_table(counts, taus)
    with backend(name):
        for reduction in REDUCTIONS:
            loss, parts = shifted_ce(logits, target, shifts, reduction=reduction, return_components=True)
            expected, expected_parts = prior_shifted_ce_reference(logits, target, counts, taus=taus,
                                                                  reduction=reduction, return_components=True)
            assert_close(loss.detach(), expected.detach())
            assert_close(parts["ce"], expected_parts["ce"])


@pytest.mark.parametrize("fn", [prior_shifted_ce, prior_shifted_ce_reference,
                                lambda z, y, n, taus, **kw: shifted_ce(z, y, torch.zeros(2, 10), **kw)])
def test_bad_reduction_and_ignore_index_are_refused(fn):
    logits, target, counts, taus = _inputs((2, 3, 10))
    for reduction in ("avg", 1, None):
        with pytest.raises(ValueError, match="reduction"):
            fn(logits, target, counts, taus=taus, reduction=reduction)
    with pytest.raises(TypeError, match="ignore_index"):
        fn(logits, target, counts, taus=taus, ignore_index=-100.0)
    for bad_label in (-1, 10):  # outside [0, C) and not ignore_index
        with pytest.raises(ValueError, match="target must be in"):
            fn(logits, torch.tensor([0, bad_label, -100]), counts, taus=taus)


@pytest.mark.parametrize("overload", raw_ops("prior_shifted_ce"))
def test_raw_ops_refuse_a_bad_reduction_code_and_label(overload):
    logits, target, _, _ = _inputs((2, 3, 10))
    op, shifts = raw_op(overload), torch.zeros(2, 10)
    with pytest.raises(ValueError, match="reduction"):
        op(logits.detach(), target, shifts, 3, -100, False)
    with pytest.raises(ValueError, match="target must be in"):
        op(logits.detach(), torch.tensor([0, -1, -100]), shifts, 1, -100, False)


# ---- second order, torch.func and the raw op's refusals: the checks shared with the other fused losses ----


@pytest.mark.parametrize("name", COMPILED_BACKENDS)
def test_create_graph_keeps_the_second_order_term(name):
    loss_cases.check_create_graph_keeps_the_second_order_term("prior_shifted_ce", name)


@needs_cpp
def test_gradgradcheck_fp64():
    """cpp only: the Triton ops share the autograd glue (and the interpreter makes gradgradcheck slow)."""
    loss_cases.check_gradgradcheck_fp64("prior_shifted_ce", "cpp")


@pytest.mark.parametrize("name", COMPILED_BACKENDS)
def test_torch_func_grad_and_vmap(name):
    loss_cases.check_torch_func_grad_and_vmap("prior_shifted_ce", name)


@pytest.mark.parametrize("overload", raw_ops("prior_shifted_ce"))
@pytest.mark.parametrize("change", loss_cases.raw_refusals("prior_shifted_ce"))
def test_raw_ops_refuse_bad_arguments_with_value_error(overload, change):
    loss_cases.check_raw_op_refuses_with_value_error(overload, change)
