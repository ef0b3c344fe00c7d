"""Smoke test of every registered model (as timm's tests over `list_models()`): build, forward, backward, output
shapes, parameter count.

Models of 30M+ parameters are built and run on the meta device (shapes only: building and running them for real
costs seconds each on this machine); every other model, and the cheapest model of each (class, module) family, runs
for real on the CPU, where every parameter must receive a finite gradient.
"""

import inspect

import pytest
import torch

from fastlt.models import create_model, list_models
from fastlt.models.registry import _MODEL_BUILDERS

BATCH, CLASSES, EXPERTS, SIZE = 2, 5, 2, 32
META_ABOVE_PARAMETERS = 30_000_000
NUM_BRANCHES = 3  # ResLT's head / medium / tail branches


def builder_arguments(name):
    """num_classes, and num_experts=EXPERTS (not the default 3) where the builder takes it, so it is seen to be used."""
    arguments = {"num_classes": CLASSES}
    if "num_experts" in inspect.signature(_MODEL_BUILDERS[name]).parameters:
        arguments["num_experts"] = EXPERTS
    return arguments


def input_channels(name):
    parameter = inspect.signature(_MODEL_BUILDERS[name]).parameters.get("in_channels")
    return 3 if parameter is None else parameter.default


def parameter_count(model):
    return sum(parameter.numel() for parameter in model.parameters())


@pytest.fixture(scope="module")
def meta_models():
    with torch.device("meta"):
        return {name: create_model(name, **builder_arguments(name)) for name in list_models()}


@pytest.fixture(scope="module")
def real_names(meta_models):
    """The models run for real: those under META_ABOVE_PARAMETERS, and the cheapest of each family."""
    cheapest = {}
    for name, model in meta_models.items():
        family = (type(model).__name__, _MODEL_BUILDERS[name].__module__)
        if family not in cheapest or parameter_count(model) < parameter_count(meta_models[cheapest[family]]):
            cheapest[family] = name
    small = {name for name, model in meta_models.items() if parameter_count(model) < META_ABOVE_PARAMETERS}
    return small | set(cheapest.values())


def expected_shapes(name):
    """(features' leading dims, expert_logits shape or None, branch_logits shape or None) from the model's kind."""
    experts = "num_experts" in builder_arguments(name)
    branches = name.startswith("reslt_")
    expert_shape = (EXPERTS, BATCH, CLASSES) if experts else None
    branch_shape = ((EXPERTS,) if experts else ()) + (NUM_BRANCHES, BATCH, CLASSES) if branches else None
    lead = ((EXPERTS,) if experts else ()) + ((NUM_BRANCHES,) if branches else ())
    return lead, expert_shape, branch_shape


def check_outputs(name, output):
    lead, expert_shape, branch_shape = expected_shapes(name)
    assert output.logits.shape == (BATCH, CLASSES)
    assert output.features.dim() == len(lead) + 2 and output.features.shape[:-1] == lead + (BATCH,)
    assert output.features.shape[-1] > 0
    assert (None if output.expert_logits is None else output.expert_logits.shape) == expert_shape
    assert (None if output.branch_logits is None else output.branch_logits.shape) == branch_shape


def run(name, model, device):
    """Training forward + backward through every output a loss reads, then an eval forward."""
    model.train()
    images = torch.randn(BATCH, input_channels(name), SIZE, SIZE, device=device)
    output = model(images)
    check_outputs(name, output)
    loss = sum(tensor.float().square().mean() for tensor in (output.logits, output.expert_logits, output.branch_logits)
               if tensor is not None)
    loss.backward()
    model.eval()
    with torch.no_grad():
        assert model(images).logits.shape == (BATCH, CLASSES)


def test_registry_holds_every_family():
    names = list_models()
    for name in ("small_cnn", "resnet8", "resnet32", "resnet50", "ride_small_cnn", "ride_resnet8", "ride_resnet32",
                 "ride_resnext50_32x4d", "reslt_small_cnn", "reslt_resnet8", "reslt_resnet32", "reslt_resnext50_32x4d",
                 "reslt_ride_resnext50_32x4d"):
        assert name in names


@pytest.mark.parametrize("name", list_models())
def test_model_builds_runs_forward_and_backward(name, meta_models, real_names):
    count = parameter_count(meta_models[name])
    print(f"{name}: {count:,} parameters")
    assert count > 0
    if name not in real_names:
        model = meta_models[name]
        run(name, model, "meta")
        assert all(parameter.grad is not None for parameter in model.parameters())
        return
    torch.manual_seed(0)
    model = create_model(name, **builder_arguments(name))
    assert parameter_count(model) == count
    run(name, model, "cpu")
    missing = [key for key, parameter in model.named_parameters() if parameter.grad is None]
    assert missing == [], f"{name}: parameters without a gradient: {missing[:5]}"
    assert all(torch.isfinite(parameter.grad).all() for parameter in model.parameters())
