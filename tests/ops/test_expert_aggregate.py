import pytest
import torch
from op_helpers import (COMPILED_BACKENDS, TOLERANCES, assert_close, backend, call_cuda_kernel, needs_cuda,
                        needs_cuda_build, raw_op, raw_ops)

import fastlt
from fastlt.ops import expert_aggregate, expert_aggregate_reference

# E = 1..6 take the unrolled fp32 CPU path, E = 8 the generic one; C = 2050 and 2051 cross a 2048-class chunk
SHAPES = [(1, 1, 1), (1, 4, 10), (2, 3, 2051), (3, 5, 7), (4, 3, 33), (5, 2, 19), (6, 2, 8142), (8, 3, 2050)]


def _inputs(shape, dtype=torch.float32, weights=None, active=False, device="cpu"):
    E, B, C = shape
    logits = torch.randn(E, B, C, dtype=dtype, device=device) * 3
    w = None
    if weights == "expert":
        w = torch.rand(E, dtype=dtype, device=device) + 0.5
    elif weights == "row":
        w = torch.rand(B, E, dtype=dtype, device=device) + 0.5
    mask = None
    if active:
        mask = torch.rand(B, E, device=device) > 0.5
        mask[:, 0] = True  # every row keeps at least one expert
    return logits, w, mask


@pytest.mark.parametrize("name", COMPILED_BACKENDS)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("reduce", ["mean", "sum"])
@pytest.mark.parametrize("weights", [None, "expert", "row"])
@pytest.mark.parametrize("active", [False, True])
def test_matches_reference_fp32(name, shape, reduce, weights, active):
    logits, w, mask = _inputs(shape, weights=weights, active=active)
    expected = expert_aggregate_reference(logits, reduce=reduce, weights=w, active=mask)
    with backend(name):
        assert_close(expert_aggregate(logits, reduce=reduce, weights=w, active=mask), expected)


def test_reference_is_the_formula():
    logits, w, mask = _inputs((3, 4, 5), dtype=torch.float64, weights="row", active=True)
    expected = torch.stack([
        sum(w[b, k] * logits[k, b] for k in range(3) if mask[b, k]) / int(mask[b].sum()) for b in range(4)
    ])
    torch.testing.assert_close(expert_aggregate_reference(logits, weights=w, active=mask), expected)
    torch.testing.assert_close(expert_aggregate_reference(logits, reduce="sum"), logits.sum(0))


@pytest.mark.parametrize("name", COMPILED_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_dtype_tolerance_table(name, dtype):
    logits, w, _ = _inputs((4, 6, 300), dtype=dtype, weights="expert")
    expected = expert_aggregate_reference(logits, weights=w)
    with backend(name):
        out = expert_aggregate(logits, weights=w)
    assert out.dtype == dtype
    assert_close(out, expected, dtype)


@pytest.mark.parametrize("name", COMPILED_BACKENDS + ["reference"])
@pytest.mark.parametrize("weights", [None, "expert", "row"])
@pytest.mark.parametrize("active", [False, True])
def test_gradcheck_fp64(name, weights, active):
    logits, w, mask = _inputs((3, 4, 5), dtype=torch.float64, weights=weights, active=active)
    logits.requires_grad_(True)
    inputs = (logits,) if w is None else (logits, w.requires_grad_(True))
    with backend(name):
        for reduce in ("mean", "sum"):
            assert torch.autograd.gradcheck(
                lambda z, *ws: expert_aggregate(z, reduce=reduce, weights=ws[0] if ws else None, active=mask), inputs
            )


@pytest.mark.parametrize("name", COMPILED_BACKENDS)
def test_strided_inputs_match_and_are_not_copied(name):
    stacked = torch.randn(5, 3, 64)  # [B, E, C], as torch.stack(outs, dim=1) produces
    logits = stacked.transpose(0, 1)  # [E, B, C] view
    sliced = torch.randn(3, 5, 128)[:, :, ::2]  # stride 2 along classes
    for view in (logits, sliced):
        expected = expert_aggregate_reference(view.contiguous())
        with backend(name):
            assert_close(expert_aggregate(view), expected)
    if name == "cpp":
        with torch.profiler.profile() as prof:
            with backend(name):
                expert_aggregate(logits)
        copies = [e.name for e in prof.events() if e.name in ("aten::copy_", "aten::contiguous", "aten::clone")]
        assert copies == [], f"strided logits were copied: {copies}"


@pytest.mark.parametrize("name", COMPILED_BACKENDS)
def test_gradients_of_strided_weights_and_low_precision(name):
    logits = torch.randn(4, 3, 50, dtype=torch.bfloat16).transpose(0, 1).contiguous().transpose(0, 1)
    logits.requires_grad_(True)
    w = torch.rand(3, 4, dtype=torch.float32, requires_grad=True)
    ref_logits = logits.detach().clone().requires_grad_(True)
    ref_w = w.detach().clone().requires_grad_(True)
    grad = torch.randn(3, 50, dtype=torch.bfloat16)
    expert_aggregate_reference(ref_logits, weights=ref_w).backward(grad)
    with backend(name):
        expert_aggregate(logits, weights=w).backward(grad)
    assert_close(logits.grad, ref_logits.grad, torch.bfloat16)
    torch.testing.assert_close(w.grad, ref_w.grad, atol=2e-2, rtol=2e-2)


def test_opcheck():
    samples = [
        _inputs((3, 4, 5)),
        _inputs((2, 3, 7), weights="expert"),
        _inputs((2, 3, 7), weights="row", active=True),
    ]
    transposed = torch.randn(4, 2, 6).transpose(0, 1)
    samples.append((transposed, None, None))
    ops = [torch.ops.fastlt.expert_aggregate.triton]
    if fastlt._extension.AVAILABLE:
        ops.append(torch.ops.fastlt.expert_aggregate.default)
    for op in ops:
        for logits, w, mask in samples:
            logits = logits.clone().requires_grad_(True) if logits.is_contiguous() else logits.requires_grad_(True)
            if w is not None:
                w.requires_grad_(True)
            torch.library.opcheck(op, (logits, "mean", w, mask))
            torch.library.opcheck(op, (logits, "sum", w, mask))


@pytest.mark.parametrize("name", COMPILED_BACKENDS)
def test_torch_compile_fullgraph(name):
    logits = torch.randn(3, 4, 9, requires_grad=True)
    w = torch.rand(3, requires_grad=True)

    def step(z, weights):
        return (expert_aggregate(z, weights=weights) ** 2).sum()

    with backend(name):
        compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
        loss = compiled(logits, w)
        loss.backward()
    ref_logits = logits.detach().clone().requires_grad_(True)
    ref_w = w.detach().clone().requires_grad_(True)
    step_ref = (expert_aggregate_reference(ref_logits, weights=ref_w) ** 2).sum()
    step_ref.backward()
    assert_close(loss, step_ref)
    assert_close(logits.grad, ref_logits.grad)
    assert_close(w.grad, ref_w.grad)


@pytest.mark.parametrize("name", COMPILED_BACKENDS + ["reference"])
def test_bad_input_names_the_argument(name):
    logits = torch.randn(3, 4, 5)
    cases = [
        (dict(logits=torch.randn(4, 5)), "logits"),
        (dict(logits=torch.randint(0, 3, (3, 4, 5))), "logits"),
        (dict(logits=torch.randn(3, 0, 5)), "logits"),
        (dict(logits=logits, reduce="max"), "reduce"),
        (dict(logits=logits, weights=torch.rand(4)), "weights"),
        (dict(logits=logits, weights=torch.ones(3, dtype=torch.long)), "weights"),
        (dict(logits=logits, active=torch.ones(4, 3)), "active"),
        (dict(logits=logits, active=torch.ones(3, 4, dtype=torch.bool)), "active"),
    ]
    no_expert = torch.ones(4, 3, dtype=torch.bool)
    no_expert[2] = False
    cases.append((dict(logits=logits, active=no_expert), "active row 2"))
    with backend(name):
        for kwargs, needle in cases:
            with pytest.raises(ValueError, match=needle):
                expert_aggregate(**kwargs)


@pytest.mark.parametrize("op_name", raw_ops("expert_aggregate"))
def test_raw_op_refuses_what_the_wrapper_refuses(op_name):
    """The raw Triton op treated reduce="max" as "sum" and read weights / active of the wrong shape out of bounds."""
    forward = raw_op(op_name)
    backward = raw_op(op_name.replace("expert_aggregate", "expert_aggregate_backward"))
    logits = torch.randn(3, 4, 5)
    no_expert = torch.ones(4, 3, dtype=torch.bool)
    no_expert[2] = False
    cases = [
        ((torch.randn(4, 5), "mean", None, None), "logits"),
        ((torch.randint(0, 3, (3, 4, 5)), "mean", None, None), "logits"),
        ((torch.randn(3, 0, 5), "mean", None, None), "logits"),
        ((torch.randn(65, 1, 2), "mean", None, None), "experts"),
        ((logits, "max", None, None), "reduce"),
        ((logits, "mean", torch.rand(4), None), "weights"),
        ((logits, "mean", torch.rand(2, 3), None), "weights"),
        ((logits, "mean", torch.rand(4, 3, 1), None), "weights"),
        ((logits, "mean", torch.ones(3, dtype=torch.long), None), "weights"),
        ((logits, "mean", None, torch.ones(4, 3)), "active"),
        ((logits, "mean", None, torch.ones(3, 4, dtype=torch.bool)), "active"),
        ((logits, "mean", None, torch.ones(4, 2, dtype=torch.bool)), "active"),
        ((logits, "mean", None, no_expert), "active row 2"),
    ]
    for args, needle in cases:
        with pytest.raises(ValueError, match=needle):
            forward(*args)
        with backend("reference"), pytest.raises(ValueError, match=needle):
            expert_aggregate(args[0], reduce=args[1], weights=args[2], active=args[3])
        if needle != "active row 2":  # the backward of a refused forward never runs; its shape checks are the same
            with pytest.raises(ValueError, match=needle):
                backward(torch.randn(4, 5), *args, False)
    for grad in (torch.randn(5, 4), torch.randn(4, 5).long()):
        with pytest.raises(ValueError, match="grad"):
            backward(grad, logits, "mean", None, None, False)


@pytest.mark.parametrize("name", COMPILED_BACKENDS)
def test_nan_logit_of_an_inactive_expert_matches_reference(name):
    """The reference's weight gradient is 0 * NaN = NaN there (as the forward's 0 * NaN); cpp skipped the expert."""
    logits, w, _ = _inputs((3, 2, 4), weights="expert")
    logits[2, 1, 3] = float("nan")
    mask = torch.tensor([[True, True, True], [True, True, False]])
    grad = torch.randn(2, 4)
    expected = [t.clone().requires_grad_(True) for t in (logits, w)]
    expert_aggregate_reference(expected[0], weights=expected[1], active=mask).backward(grad)
    actual = [t.clone().requires_grad_(True) for t in (logits, w)]
    with backend(name):
        expert_aggregate(actual[0], weights=actual[1], active=mask).backward(grad)
    for a, e in zip(actual, expected):
        torch.testing.assert_close(a.grad, e.grad, equal_nan=True)
    assert actual[1].grad[2].isnan()


@pytest.mark.parametrize("name", COMPILED_BACKENDS + ["reference"])
@pytest.mark.parametrize("weights", ["expert", "row"])
@pytest.mark.parametrize("reduce", ["mean", "sum"])
def test_double_backward_matches_reference(name, weights, reduce):
    """Second order through expert_aggregate with weights: cpp gave w.grad = 0 (with a warning), triton raised."""
    logits, w, mask = _inputs((3, 4, 5), dtype=torch.float64, weights=weights, active=True)

    def penalty(z, ws, fn):
        out = fn(z, reduce=reduce, weights=ws, active=mask)
        grads = torch.autograd.grad((out.tanh() ** 2).sum(), (z, ws), create_graph=True)
        return sum(g.pow(2).sum() for g in grads)

    ref = (logits.clone().requires_grad_(True), w.clone().requires_grad_(True))
    penalty(*ref, expert_aggregate_reference).backward()
    actual = (logits.clone().requires_grad_(True), w.clone().requires_grad_(True))
    with backend(name):
        penalty(*actual, expert_aggregate).backward()
    for a, r in zip(actual, ref):
        torch.testing.assert_close(a.grad, r.grad)
    assert actual[1].grad.abs().sum() > 0


@needs_cuda_build
def test_cuda_kernel_refuses_cpu_tensors():
    with pytest.raises(RuntimeError, match="must be a CUDA tensor"):
        call_cuda_kernel("expert_aggregate", torch.randn(2, 3, 4), "mean", None, None)


@needs_cuda
@pytest.mark.gpu
@pytest.mark.parametrize("name", COMPILED_BACKENDS)
@pytest.mark.parametrize("dtype", list(TOLERANCES))
def test_cuda_matches_reference(name, dtype):
    logits, w, mask = _inputs((4, 64, 8142), dtype=dtype, weights="row", active=True, device="cuda")
    logits.requires_grad_(True)
    expected = expert_aggregate_reference(logits, weights=w, active=mask)
    with backend(name):
        out = expert_aggregate(logits, weights=w, active=mask)
    assert_close(out, expected, dtype)
