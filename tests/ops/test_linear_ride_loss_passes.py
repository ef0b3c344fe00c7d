"""fastlt::linear_ride_loss's pass overloads .statistics and .gradients (fastlt/ops/_head_passes.py): every
implementation (C++ kernel, Triton, the PyTorch loop) against the eager references from the materialised logits;
shards' statistics merged as the class-parallel head all-reduces them give the whole head's loss and gradients;
opcheck; argument checks; every piece of each overload."""

import pathlib
import re

import pytest
import torch
from op_helpers import expert_head_inputs

from fastlt.ops import _head_passes
from fastlt.ops._chunked_head import STATISTICS, loss_from_statistics, row_coefficients
from fastlt.ops._class_parallel import class_shard
from fastlt.ops.linear_ride_loss import fused_linear_ride_loss
from fastlt.ops.ride_loss import ride_tables

ROOT = pathlib.Path(__file__).resolve().parents[2]
PACKET = torch.ops.fastlt.linear_ride_loss
HAS_CPP = _head_passes.HAS_COMPILED_PASSES
IMPLEMENTATIONS = [pytest.param("", marks=pytest.mark.skipif(not HAS_CPP, reason="extension without the passes")),
                   "_torch", "_triton"]  # the overload name's suffix: "" is the C++ kernel


def _pass(name, suffix):
    return getattr(PACKET, name + suffix)


def _inputs(*, experts=3, batch=5, classes=13, dim=4, shared=False, use_bias=False, diversity=True,
            row_bias_scales=False):
    """(the passes' shared arguments, their options) for a shard holding every class, every third row labelled -1
    from the second."""
    tensors, target, counts = expert_head_inputs(experts, batch, classes, dim, shared=shared, use_bias=use_bias)
    features, weight, *bias = [t.detach() for t in tensors]
    target[1::3] = -1  # another shard's class, or an ignored row
    margins, _, temperatures = ride_tables(counts, scale=30.0, max_margin=0.5, temperature_factor=0.05,
                                           base_temperature=1.0, drw=False, drw_beta=0.9999, dtype=torch.float64,
                                           device="cpu")
    scales = torch.rand(batch, dtype=torch.float64) + 0.5 if row_bias_scales else None
    arguments = [features, weight, bias[0] if bias else None, target, margins, temperatures, scales]
    return arguments, (30.0 if not use_bias else 1.0, not use_bias, diversity, 4)


CASES = [dict(), dict(shared=True), dict(use_bias=True, row_bias_scales=True), dict(diversity=False),
         dict(experts=1, batch=2)]


@pytest.mark.parametrize("suffix", IMPLEMENTATIONS)
@pytest.mark.parametrize("case", CASES, ids=lambda case: "-".join(case) or "cosine")
def test_statistics_match_the_reference(suffix, case):
    arguments, options = _inputs(**case)
    expected = _head_passes.statistics_reference(*arguments, *options)
    actual = _pass("statistics", suffix)(*arguments, *options)
    for name, value, reference in zip(STATISTICS, actual, expected):
        torch.testing.assert_close(value, reference, rtol=1e-10, atol=1e-12, msg=name)


def _coefficients(arguments, options):
    """Row coefficients as the class-parallel head forms them (mean reduction, RIDE's diversity factor)."""
    target, temperatures = arguments[3], arguments[5]
    _, ce_coefs, div_coefs = row_coefficients(target, None, temperatures, -0.45 if options[2] else 0.0, 1, -1)
    return ce_coefs, div_coefs


@pytest.mark.parametrize("suffix", IMPLEMENTATIONS)
@pytest.mark.parametrize("case", CASES, ids=lambda case: "-".join(case) or "cosine")
def test_gradients_match_the_reference(suffix, case):
    arguments, options = _inputs(**case)
    statistics = dict(zip(STATISTICS, _head_passes.statistics_reference(*arguments, *options)))
    given = [statistics[name] for name in _head_passes.PASS_STATISTICS]
    coefficients = _coefficients(arguments, options)
    expected = _head_passes.gradients_reference(*arguments, *coefficients, *given, *options)
    actual = _pass("gradients", suffix)(*arguments, *coefficients, *given, *options)
    for value, reference in zip(actual, expected):
        assert value.shape == reference.shape
        torch.testing.assert_close(value, reference, rtol=1e-10, atol=1e-12)


def _merged(shards):
    """The statistics of the union of disjoint class shards, merged as _class_parallel.all_reduce_statistics does
    across ranks (max, then the rescaled sums)."""
    merged = {name: torch.stack([shard[name] for shard in shards]) for name in STATISTICS}
    for name in ("ce_max", "expert_max", "mean_max"):
        merged[name] = merged[name].amax(0)
    rescaled = {"ce_sum": "ce_max", "expert_sum": "expert_max", "mean_sum": "mean_max", "gap": "mean_max"}
    for name, maximum in rescaled.items():
        stacked_max = torch.stack([shard[maximum] for shard in shards])
        shift = torch.exp(stacked_max - merged[maximum])
        merged[name] = (merged[name] * (shift if name != "gap" else shift[:, None])).sum(0)
    merged["target_logit"] = merged["target_logit"].sum(0)
    return merged


@pytest.mark.parametrize("suffix", IMPLEMENTATIONS)
@pytest.mark.parametrize("num_shards", [2, 3])
def test_shards_merged_give_the_whole_heads_loss_and_gradients(suffix, num_shards):
    """Three RIDE experts with diversity, 13 classes in 2 or 3 shards: each shard's statistics (targets outside it
    labelled -1), merged, give linear_ride_loss's loss; each shard's gradients from the merged statistics,
    concatenated (d weight) or summed (d features), give its gradients."""
    (features, weight), target, counts = expert_head_inputs(3, 6, 13, 4)
    target[2] = -100
    margins, _, temperatures = ride_tables(counts, scale=30.0, max_margin=0.5, temperature_factor=0.05,
                                           base_temperature=1.0, drw=False, drw_beta=0.9999, dtype=torch.float64,
                                           device="cpu")
    features_unit = torch.nn.functional.normalize(features.detach(), dim=-1)
    labels, ce_coefs, div_coefs = row_coefficients(target, None, temperatures, -0.45, 1, -100)
    options = (30.0, True, True, 4)
    shards = [class_shard(13, num_shards, rank) for rank in range(num_shards)]

    def shard_arguments(start, stop):
        local = torch.where((labels >= start) & (labels < stop), labels - start, -1)
        return [features_unit, weight.detach()[:, start:stop], None, local, margins[start:stop],
                temperatures[start:stop], None]

    statistics = _merged([dict(zip(STATISTICS, _pass("statistics", suffix)(*shard_arguments(*shard), *options)))
                          for shard in shards])
    loss = loss_from_statistics(statistics, ce_coefs[None, :], div_coefs, True)
    given = [statistics[name] for name in _head_passes.PASS_STATISTICS]
    parts = [_pass("gradients", suffix)(*shard_arguments(*shard), ce_coefs, div_coefs, *given, *options)
             for shard in shards]
    # the whole head on the same normalised features (not normalised again: d features is d the unit rows)
    unit_features = features_unit.clone().requires_grad_()
    expected = fused_linear_ride_loss(unit_features, weight, None, target, margins, None, temperatures, scale=30.0,
                                      normalize=True, diversity_factor=-0.45, chunk_size=4, normalize_features=False)
    expected_weight, expected_features = torch.autograd.grad(expected, [weight, unit_features])
    torch.testing.assert_close(loss, expected.detach(), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(torch.cat([part[1] for part in parts], 1), expected_weight, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(sum(part[0] for part in parts), expected_features, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("overload", ["statistics", "gradients"])
@pytest.mark.parametrize("suffix", IMPLEMENTATIONS)
def test_opcheck(overload, suffix):
    arguments, options = _inputs(use_bias=True, row_bias_scales=True)
    arguments = [t.float() if isinstance(t, torch.Tensor) and t.is_floating_point() else t for t in arguments]
    if overload == "gradients":
        statistics = dict(zip(STATISTICS, _head_passes.statistics_reference(*arguments, *options)))
        coefficients = _coefficients(arguments, options)
        arguments = [*arguments, *coefficients, *(statistics[name] for name in _head_passes.PASS_STATISTICS)]
    torch.library.opcheck(_pass(overload, suffix), (*arguments, *options),
                          test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_dynamic"))


@pytest.mark.parametrize("suffix", IMPLEMENTATIONS)
def test_the_passes_check_their_arguments(suffix):
    arguments, options = _inputs()
    statistics = dict(zip(STATISTICS, _head_passes.statistics_reference(*arguments, *options)))
    given = [statistics[name] for name in _head_passes.PASS_STATISTICS]
    coefficients = list(_coefficients(arguments, options))
    below = list(arguments)
    below[3] = arguments[3] - 5
    with pytest.raises(ValueError, match="target must be in"):
        _pass("statistics", suffix)(*below, *options)
    with pytest.raises(ValueError, match=r"temperatures must be"):
        _pass("statistics", suffix)(*arguments[:5], arguments[5][:-1], arguments[6], *options)
    with pytest.raises(ValueError, match=r"ce_max must be \[E, B\]|ce_max must be \[3, 5\]"):
        _pass("gradients", suffix)(*arguments, *coefficients, given[0][:, :-1], *given[1:], *options)
    coefficients[0] = coefficients[0].clone()
    coefficients[0][0] = float("nan")
    with pytest.raises(ValueError, match="ce_coefs must be finite"):
        _pass("gradients", suffix)(*arguments, *coefficients, *given, *options)


def test_each_pass_has_every_piece():
    """.statistics and .gradients: defined with the op in csrc/cpu/linear_ride_loss.cpp, CPU and CUDA kernels
    registered there and in csrc/cuda/linear_ride_loss.cu, the Triton and PyTorch overloads with the same arguments
    (the schema constants), a fake implementation each, and the references."""
    cpu = (ROOT / "csrc" / "cpu" / "linear_ride_loss.cpp").read_text()
    cuda = (ROOT / "csrc" / "cuda" / "linear_ride_loss.cu").read_text()
    for name, schema in (("statistics", _head_passes.STATISTICS_SCHEMA), ("gradients", _head_passes.GRADIENTS_SCHEMA)):
        assert re.search(rf'm\.def\(\s*"linear_ride_loss\.{name}\(', cpu), name
        assert f'm.impl("linear_ride_loss.{name}"' in cpu and f'm.impl("linear_ride_loss.{name}"' in cuda
        for suffix in ("_torch", "_triton") + (("",) if HAS_CPP else ()):
            overload = _pass(name, suffix)
            assert str(overload._schema).split("(", 1)[1] == schema[1:], name + suffix
            assert torch._C._dispatch_has_kernel_for_dispatch_key(overload.name(), "Meta"), name + suffix
        assert callable(getattr(_head_passes, f"{name}_reference"))
