import pytest
import torch
from op_helpers import (COMPILED_BACKEND_NAMES, COMPILED_BACKENDS, TOLERANCES, assert_close, backend,
                        call_cuda_kernel, needs_cuda, needs_cuda_build, raw_op, raw_ops)

import fastlt
from fastlt.ops import tau_normalize, tau_normalize_reference

SHAPES = [(1, 1), (1, 7), (10, 3), (100, 64), (37, 513), (8142, 9)]


# The Triton interpreter runs one program per row at Python speed: its 8142-row case runs at one tau only.
CASES = [
    (name, shape, tau)
    for name in COMPILED_BACKEND_NAMES
    for shape in SHAPES
    for tau in [0.0, 0.3, 0.7, 1.0, 2.0]
    if not (name == "triton" and shape[0] > 1000 and tau != 0.7)
]


@pytest.mark.parametrize("name, shape, tau", CASES)
def test_matches_reference_fp32(name, shape, tau):
    weight = torch.randn(*shape)
    with backend(name):
        assert_close(tau_normalize(weight, tau), tau_normalize_reference(weight, tau))


def test_reference_is_the_formula():
    weight = torch.randn(5, 4, dtype=torch.float64)
    expected = torch.stack([row / row.norm() ** 0.7 for row in weight])
    torch.testing.assert_close(tau_normalize_reference(weight, 0.7), expected)
    torch.testing.assert_close(tau_normalize_reference(weight, 1.0).norm(dim=1), torch.ones(5, dtype=torch.float64))


@pytest.mark.parametrize("name", COMPILED_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_dtype_tolerance_table(name, dtype):
    weight = torch.randn(50, 70, dtype=dtype)
    with backend(name):
        out = tau_normalize(weight, 0.6)
    assert out.dtype == dtype
    assert_close(out, tau_normalize_reference(weight, 0.6), dtype)


@pytest.mark.parametrize("name", COMPILED_BACKENDS + ["reference"])
@pytest.mark.parametrize("tau", [0.0, 0.5, 1.0, 1.7])
def test_gradcheck_fp64(name, tau):
    weight = torch.randn(6, 5, dtype=torch.float64, requires_grad=True)
    with backend(name):
        assert torch.autograd.gradcheck(lambda w: tau_normalize(w, tau), (weight,))


@pytest.mark.parametrize("name", COMPILED_BACKENDS)
def test_zero_row_is_clamped_by_eps_not_nan(name):
    weight = torch.randn(4, 6, dtype=torch.float64)
    weight[1] = 0
    weight.requires_grad_(True)
    with backend(name):
        out = tau_normalize(weight, 1.0)
        out.sum().backward()
    assert torch.isfinite(out).all() and torch.isfinite(weight.grad).all()
    assert (out[1] == 0).all()
    torch.testing.assert_close(weight.grad[1], torch.full((6,), 1e12, dtype=torch.float64))


@pytest.mark.parametrize("name", COMPILED_BACKENDS)
def test_strided_weight(name):
    weight = torch.randn(16, 40).t()  # [40, 16], non-contiguous
    with backend(name):
        assert_close(tau_normalize(weight, 0.9), tau_normalize_reference(weight.contiguous(), 0.9))


def test_opcheck():
    ops = [torch.ops.fastlt.tau_normalize.triton]
    if fastlt._extension.AVAILABLE:
        ops.append(torch.ops.fastlt.tau_normalize.default)
    for op in ops:
        for weight in (torch.randn(5, 7), torch.randn(9, 4).t(), torch.randn(3, 1, dtype=torch.float64)):
            torch.library.opcheck(op, (weight.requires_grad_(True), 0.7, 1e-12))


@pytest.mark.parametrize("name", COMPILED_BACKENDS)
def test_torch_compile_fullgraph(name):
    weight = torch.randn(10, 8, requires_grad=True)
    features = torch.randn(4, 8)
    with backend(name):
        compiled = torch.compile(lambda w: (features @ tau_normalize(w, 0.5).t()).logsumexp(1).sum(), fullgraph=True,
                                 backend="aot_eager")
        loss = compiled(weight)
        loss.backward()
    ref = weight.detach().clone().requires_grad_(True)
    ref_loss = (features @ tau_normalize_reference(ref, 0.5).t()).logsumexp(1).sum()
    ref_loss.backward()
    assert_close(loss, ref_loss)
    assert_close(weight.grad, ref.grad)


@pytest.mark.parametrize("name", COMPILED_BACKENDS + ["reference"])
def test_bad_input_names_the_argument(name):
    cases = [
        (dict(weight=torch.randn(3), tau=1.0), "weight"),
        (dict(weight=torch.randn(2, 3, 4), tau=1.0), "weight"),
        (dict(weight=torch.ones(3, 4, dtype=torch.int32), tau=1.0), "weight"),
        (dict(weight=torch.randn(0, 4), tau=1.0), "weight"),
        (dict(weight=torch.randn(3, 4), tau=-0.5), "tau"),
        (dict(weight=torch.randn(3, 4), tau=float("nan")), "tau"),
        (dict(weight=torch.randn(3, 4), tau=1.0, eps=0.0), "eps"),
    ]
    with backend(name):
        for kwargs, needle in cases:
            with pytest.raises(ValueError, match=needle):
                tau_normalize(**kwargs)


@pytest.mark.parametrize("op_name", raw_ops("tau_normalize"))
def test_raw_op_refuses_what_the_wrapper_refuses(op_name):
    forward = raw_op(op_name)
    backward = raw_op(op_name.replace("tau_normalize", "tau_normalize_backward"))
    w = torch.randn(3, 4)
    cases = [
        ((torch.randn(2, 3, 4), 1.0, 1e-12), "weight"),
        ((torch.ones(3, 4, dtype=torch.int32), 1.0, 1e-12), "weight"),
        ((torch.randn(0, 4), 1.0, 1e-12), "weight"),
        ((w, -1.0, 1e-12), "tau"),
        ((w, float("nan"), 1e-12), "tau"),
        ((w, float("inf"), 1e-12), "tau"),
        ((w, 1.0, 0.0), "eps"),
        ((w, 1.0, -1e-3), "eps"),
        ((w, 1.0, float("nan")), "eps"),
    ]
    for args, needle in cases:
        with pytest.raises(ValueError, match=needle):
            forward(*args)
        with pytest.raises(ValueError, match=needle):
            backward(torch.ones_like(args[0], dtype=torch.float32), *args)
    with pytest.raises(ValueError, match="grad"):
        backward(torch.randn(4, 3), w, 1.0, 1e-12)


@pytest.mark.parametrize("name", COMPILED_BACKENDS + ["reference"])
@pytest.mark.parametrize("tau", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_row_matches_reference(name, tau, bad):
    """A NaN in a row gave eps ** -tau (1e12) times its other entries on the compiled backends; every backend must
    give the reference's values and gradient (NaN row; an inf row: NaN at the inf, 0 elsewhere; tau = 0: unchanged)."""
    weight = torch.randn(3, 5, dtype=torch.float64)
    weight[1, 2] = bad
    grad = torch.randn(3, 5, dtype=torch.float64)
    ref = weight.clone().requires_grad_(True)
    expected = tau_normalize_reference(ref, tau)
    expected.backward(grad)
    actual_weight = weight.clone().requires_grad_(True)
    with backend(name):
        actual = tau_normalize(actual_weight, tau)
    actual.backward(grad)
    torch.testing.assert_close(actual, expected, equal_nan=True)
    torch.testing.assert_close(actual_weight.grad, ref.grad, equal_nan=True)
    if bad != bad and tau > 0:
        assert actual[1].isnan().all() and actual_weight.grad[1].isnan().all()
    assert torch.isfinite(actual[[0, 2]]).all()


@pytest.mark.parametrize("name", COMPILED_BACKENDS + ["reference"])
def test_double_backward_matches_reference(name):
    """create_graph=True (gradient penalties): the compiled backends' backward was not differentiable."""
    weight = torch.randn(4, 6, dtype=torch.float64)
    features = torch.randn(5, 6, dtype=torch.float64)

    def penalty(w, fn):
        loss = (features @ fn(w, 0.7).t()).logsumexp(1).sum()
        (grad,) = torch.autograd.grad(loss, w, create_graph=True)
        return grad.pow(2).sum()

    ref = weight.clone().requires_grad_(True)
    penalty(ref, tau_normalize_reference).backward()
    actual = weight.clone().requires_grad_(True)
    with backend(name):
        penalty(actual, tau_normalize).backward()
    torch.testing.assert_close(actual.grad, ref.grad)


@needs_cuda_build
def test_cuda_kernel_refuses_cpu_tensors():
    with pytest.raises(RuntimeError, match="must be a CUDA tensor"):
        call_cuda_kernel("tau_normalize", torch.randn(3, 4), 0.5, 1e-12)


@needs_cuda
@pytest.mark.gpu
@pytest.mark.parametrize("name", COMPILED_BACKENDS)
@pytest.mark.parametrize("dtype", list(TOLERANCES))
def test_cuda_matches_reference(name, dtype):
    weight = torch.randn(8142, 2048, dtype=dtype, device="cuda")
    with backend(name):
        assert_close(tau_normalize(weight, 0.7), tau_normalize_reference(weight, 0.7), dtype)
