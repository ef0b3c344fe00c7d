import importlib

import pytest
import torch
import torch.nn.functional as F
from op_helpers import (EVERY_HEAD_IMPLEMENTATION, assert_head_compiles_fullgraph, assert_head_matches_reference,
                        backend, head_implementation_fixture, head_loss_and_grads, needs_cuda)

from fastlt.ops import linear_reslt_loss, linear_reslt_loss_reference, reslt_loss_reference

linear_ride_loss_module = importlib.import_module("fastlt.ops.linear_ride_loss")
HAS_CPP = linear_ride_loss_module._compiled_op(torch.device("cpu")) is not None


implementation = head_implementation_fixture(EVERY_HEAD_IMPLEMENTATION)


def _groups(num_branches, num_classes):
    """Nested groups as ResLT's: branch 0 every class, branch b the labels from b * C / K on (the tail)."""
    labels = torch.arange(num_classes)
    return torch.stack([labels >= branch * num_classes // num_branches for branch in range(num_branches)])


def _inputs(K, B, C, D, *, use_bias=False, dtype=torch.float64):
    features, weight = torch.randn(K, B, D), torch.randn(C, D)
    bias = torch.randn(C) if use_bias else None
    tensors = [t.to(dtype).requires_grad_(True) for t in (features, weight, bias) if t is not None]
    return tensors, torch.randint(0, C, (B,)), _groups(K, C)


def _assert_matches_reference(tensors, target, groups, **kwargs):
    kwargs.setdefault("beta", 0.9)
    return assert_head_matches_reference(linear_reslt_loss_reference, linear_reslt_loss, tensors, target, groups,
                                         **kwargs)


def test_reference_is_reslt_loss_of_the_shared_linear_head():
    (features, weight, bias), target, groups = _inputs(3, 7, 12, 4, use_bias=True)
    logits = [f @ weight.t() + bias for f in features]
    ce = [F.cross_entropy(z, target, reduction="none") for z in logits]
    in_group = groups[:, target].double()
    branch = sum((g * c).sum() for g, c in zip(in_group, ce)) / in_group.sum()
    expected = 0.8 * branch + 0.2 * F.cross_entropy(sum(logits), target)
    actual = linear_reslt_loss_reference(features, weight, target, groups, beta=0.8, bias=bias)
    torch.testing.assert_close(actual, expected)


def test_zero_epsilons_in_both_terms_are_accepted_and_are_the_exact_reslt_loss():
    """The fused head offers the exact cross-entropy in the branch and the fused terms alike (log_eps =
    fused_log_eps = 0, the defaults); a non-zero epsilon in either term is refused (test_bad_inputs_...)."""
    (features, weight, bias), target, groups = _inputs(3, 7, 12, 4, use_bias=True)
    logits = features @ weight.t() + bias
    expected = reslt_loss_reference(logits, target, groups, beta=0.8, log_eps=0.0, fused_log_eps=0.0)
    actual = linear_reslt_loss(features, weight, target, groups, beta=0.8, bias=bias, log_eps=0.0, fused_log_eps=0.0)
    torch.testing.assert_close(actual, expected)


@pytest.mark.parametrize("num_branches, normalize, use_bias, reduction, beta", [
    (1, False, True, "mean", 0.9), (2, True, False, "sum", 0.5), (3, False, False, "mean", 0.995),
    (4, True, True, "mean", 0.7), (3, True, True, "sum", 1.0), (2, False, True, "sum", 0.0)])
def test_fp64_matches_reference_with_classes_not_a_multiple_of_the_chunk(num_branches, normalize, use_bias, reduction,
                                                                           beta, implementation):
    tensors, target, groups = _inputs(num_branches, 4, 21, 5, use_bias=use_bias)
    _assert_matches_reference(tensors, target, groups, beta=beta, normalize=normalize, reduction=reduction,
                              scale=16.0 if normalize else 1.0, chunk_size=8)


@pytest.mark.parametrize("chunk_size", [1, 64, None])
def test_batch_of_one_and_any_chunk(chunk_size, implementation):
    tensors, target, groups = _inputs(3, 1, 19, 5, use_bias=True)
    _assert_matches_reference(tensors, target, groups, chunk_size=chunk_size)


def test_branch_whose_group_holds_no_label_of_the_batch(implementation):
    tensors, target, groups = _inputs(3, 4, 12, 3)
    target = torch.tensor([0, 1, 3, 2])  # every label in the head: branches 1 and 2 see no pair (n_b = 0)
    _assert_matches_reference(tensors, target, groups, chunk_size=5)


def test_ignored_rows_add_nothing_and_get_zero_gradient(implementation):
    tensors, target, groups = _inputs(3, 6, 23, 4, use_bias=True)
    target[[1, 4]] = -7
    (grad_features, *_) = _assert_matches_reference(tensors, target, groups, ignore_index=-7, chunk_size=8)
    rows = grad_features[:, [1, 4]]
    assert torch.equal(rows, torch.zeros_like(rows)) and grad_features.abs().sum() > 0
    kept = torch.tensor([0, 2, 3, 5])
    features, weight, bias = tensors
    torch.testing.assert_close(  # G and N count the kept rows only
        linear_reslt_loss(features, weight, target, groups, beta=0.9, bias=bias, ignore_index=-7),
        linear_reslt_loss(features[:, kept], weight, target[kept], groups, beta=0.9, bias=bias))


def test_every_row_ignored_gives_zero_loss_and_gradients(implementation):
    tensors, target, groups = _inputs(2, 3, 11, 4)
    loss, grads = head_loss_and_grads(linear_reslt_loss, tensors, torch.full_like(target, -100), groups, beta=0.9)
    assert loss.item() == 0.0
    assert all(torch.equal(grad, torch.zeros_like(grad)) for grad in grads)


@pytest.mark.parametrize("normalize", [False, True])
def test_gradcheck_fp64(normalize, implementation):
    tensors, target, groups = _inputs(2, 2, 5, 3, use_bias=True)

    def loss(features, weight, bias):
        return linear_reslt_loss(features, weight, target, groups, beta=0.6, bias=bias, normalize=normalize,
                                 scale=3.0, chunk_size=2)

    assert torch.autograd.gradcheck(loss, tuple(tensors), fast_mode=True)


def test_fp32_matches_reference(implementation):
    tensors, target, groups = _inputs(3, 4, 100, 8, use_bias=True, dtype=torch.float32)
    _assert_matches_reference(tensors, target, groups, beta=0.99, chunk_size=32, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("implementation", [  # the gradients-in-forward path, the same on every fused backend
    pytest.param("cpp", marks=pytest.mark.skipif(not HAS_CPP, reason="no C++ op")), "torch"], indirect=True)
def test_backward_scales_by_grad_output_and_no_grad_gives_the_loss(implementation):
    tensors, target, groups = _inputs(3, 4, 13, 3, use_bias=True)
    loss, unit = head_loss_and_grads(linear_reslt_loss, tensors, target, groups, beta=0.9, chunk_size=4)
    features, weight, bias = tensors
    (2.5 * linear_reslt_loss(features, weight, target, groups, beta=0.9, bias=bias, chunk_size=4)).backward()
    for tensor, expected in zip(tensors, unit):
        torch.testing.assert_close(tensor.grad, 2.5 * expected)
    with torch.no_grad():
        torch.testing.assert_close(linear_reslt_loss(features, weight, target, groups, beta=0.9, bias=bias), loss)
    detached = linear_reslt_loss(features.detach(), weight.detach(), target, groups, beta=0.9, bias=bias.detach())
    assert not detached.requires_grad
    torch.testing.assert_close(detached, loss)


@pytest.mark.parametrize("implementation", [
    pytest.param("cpp", marks=pytest.mark.skipif(not HAS_CPP, reason="no C++ op")), "torch"], indirect=True)
@pytest.mark.parametrize("normalize, use_bias", [(False, True), (True, False)])
def test_memory_beyond_inputs_and_gradients_is_chunk_sized(normalize, use_bias, implementation):
    from fastlt.bench.losses import peak_extra_bytes

    num_branches, batch, num_classes, dim, chunk = 3, 4, 8192, 64, 256
    features = torch.randn(num_branches, batch, dim, requires_grad=True)
    weight = torch.randn(num_classes, dim, requires_grad=True)
    bias = torch.zeros(num_classes, requires_grad=True) if use_bias else None
    target, groups = torch.randint(0, num_classes, (batch,)), _groups(num_branches, num_classes)

    def step():
        features.grad = weight.grad = None
        if bias is not None:
            bias.grad = None
        linear_reslt_loss(features, weight, target, groups, beta=0.9, bias=bias, normalize=normalize, scale=16.0,
                          chunk_size=chunk).backward()

    step()  # one-time allocations out of the way
    held = features.numel() + weight.numel() + (bias.numel() if bias is not None else 0)
    extra = peak_extra_bytes(step, keep_bytes=held * 4)
    rows = (num_branches + 1) * batch
    # O(rows x chunk) logit buffers, an O(chunk x D) weight-gradient chunk and O(rows x D) feature rows, plus O(C)
    # per-class tables (the bias gradient): no second C x D buffer (the weight is 2 MB)
    budget = 8 * (rows * chunk + chunk * dim + rows * dim + num_classes) * 4
    assert extra < budget < weight.numel() * 4


def test_torch_compile_fullgraph_matches_eager():
    tensors, target, groups = _inputs(3, 4, 20, 8, use_bias=True, dtype=torch.float32)
    assert_head_compiles_fullgraph(linear_reslt_loss, tensors, target, groups, beta=0.9, chunk_size=8)


@pytest.mark.parametrize(
    "change, error, message",
    [
        (lambda x, w, y, g: dict(branch_features=x[0]), ValueError, "branch_features must have 3 dims"),
        (lambda x, w, y, g: dict(branch_features=x[..., :2]), ValueError, "branch_features must have D"),
        (lambda x, w, y, g: dict(branch_features=x.float()), ValueError, "branch_features must have weight's dtype"),
        (lambda x, w, y, g: dict(weight=w[None]), ValueError, "weight must have 2 dims"),
        (lambda x, w, y, g: dict(weight=[1.0]), TypeError, "weight must be a torch.Tensor"),
        (lambda x, w, y, g: dict(target=y + 100), ValueError, "target must be in"),
        (lambda x, w, y, g: dict(target=y[:2]), ValueError, r"target must be \[B\]"),
        (lambda x, w, y, g: dict(group_masks=g.float()), ValueError, "group_masks must be bool"),
        (lambda x, w, y, g: dict(group_masks=g[:1]), ValueError, r"group_masks must be \[K, C\]"),
        (lambda x, w, y, g: dict(group_masks=g & (torch.arange(2) == 0)[:, None]), ValueError,
         "group_masks row 1 selects no class"),
        (lambda x, w, y, g: dict(beta=1.5), ValueError, "beta must be"),
        (lambda x, w, y, g: dict(bias=torch.zeros(2, 10, dtype=w.dtype)), ValueError, "bias must be"),
        (lambda x, w, y, g: dict(scale=-1.0), ValueError, "scale must be"),
        (lambda x, w, y, g: dict(chunk_size=2.5), ValueError, "chunk_size must be"),
        (lambda x, w, y, g: dict(log_eps=1e-7), ValueError, "log_eps must be 0"),
        (lambda x, w, y, g: dict(log_eps=1e-7, fused_log_eps=0.0), ValueError, "log_eps must be 0"),
        (lambda x, w, y, g: dict(fused_log_eps=1e-7), ValueError, "fused_log_eps must be 0"),
        (lambda x, w, y, g: dict(fused_log_eps=float("nan")), ValueError, "fused_log_eps must be"),
        (lambda x, w, y, g: dict(reduction="none"), ValueError, "reduction='none' is not supported"),
        (lambda x, w, y, g: dict(ignore_index="x"), TypeError, "ignore_index must be an int"),
    ],
)
def test_bad_inputs_raise_errors_naming_the_argument(change, error, message):
    (features, weight), target, groups = _inputs(2, 3, 10, 4)
    arguments = dict(branch_features=features, weight=weight, target=target, group_masks=groups, beta=0.9)
    arguments.update(change(features, weight, target, groups))
    with pytest.raises(error, match=message):
        linear_reslt_loss(**arguments)


@needs_cuda
@pytest.mark.gpu
@pytest.mark.parametrize("fused_backend", ["cpp", "triton"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("use_bias, normalize, reduction", [(True, False, "mean"), (False, True, "sum")])
def test_cuda_matches_reference(fused_backend, dtype, use_bias, normalize, reduction):
    tensors, target, groups = _inputs(3, 33, 1000, 24, use_bias=use_bias, dtype=dtype)
    tensors = [t.detach().cuda().requires_grad_(True) for t in tensors]
    target, groups = target.cuda(), groups.cuda()
    target[[0, 5]] = -100
    rtol, atol = (1e-10, 1e-12) if dtype == torch.float64 else (1e-4, 1e-5)
    with backend(fused_backend):
        _assert_matches_reference(tensors, target, groups, beta=0.995, normalize=normalize,
                                  scale=16.0 if normalize else 1.0, reduction=reduction, chunk_size=256, rtol=rtol,
                                  atol=atol)
