"""Every public nn.Module of fastlt prints its configuration (a user's `print(model)` / `print(criterion)` must show
the hyperparameters it runs with; RIDEDistillLoss's repr used to raise AttributeError, RIDELoss printed as
`RIDELoss()`)."""

import importlib
import inspect
import pkgutil

import pytest
import torch
from torch import nn

import fastlt
from fastlt.methods.decoupling import FrozenBackbone
from fastlt.methods.router import ExpertRouter
from fastlt.models import (LearnableWeightScaling, NearestClassMean, NormedLinear, TauNormLinear,
                           create_model)
from fastlt.models.imagenet_resnet import ResNetTrunk
from fastlt.models.resnet_cifar import BasicBlockA

COUNTS = torch.tensor([50.0, 20, 5])


def _frozen_backbone():
    return FrozenBackbone(create_model("small_cnn", num_classes=3), nn.Linear(128, 3), freeze_bn=True)


# class name -> (builder, substrings its own repr line must contain)
EXPECTED = {
    "RIDELoss": (lambda: fastlt.RIDELoss(COUNTS, drw_epoch=80), ["scale=30.0", "diversity_factor=-0.45", "drw_epoch=80",
                                                                 "epoch=0", "drw=False"]),
    "RIDEDistillLoss": (lambda: fastlt.RIDEDistillLoss(fastlt.RIDELoss(COUNTS), temperature=1.5),
                        ["temperature=1.5", "distill_factor=1.0", "scale_by_experts=True"]),
    "ResLTLoss": (lambda: fastlt.ResLTLoss(COUNTS, beta=0.99), ["beta=0.99", "num_branches=3"]),
    "PriorShiftedCE": (lambda: fastlt.PriorShiftedCE(COUNTS, taus=[1.0]), ["taus=[1.0]"]),
    "NormedLinear": (lambda: NormedLinear(8, 3, scale=30.0), ["in_features=8", "out_features=3", "scale=30.0"]),
    "TauNormLinear": (lambda: TauNormLinear.from_linear(nn.Linear(8, 3), tau=0.7), ["tau=0.7", "in_features=8"]),
    "LearnableWeightScaling": (lambda: LearnableWeightScaling.from_linear(nn.Linear(8, 3)), ["out_features=3"]),
    "NearestClassMean": (lambda: NearestClassMean(8, 3, distance="cos"), ["feature_dim=8", "distance='cos'"]),
    "RIDE": (lambda: create_model("ride_small_cnn", num_classes=3, num_experts=2), ["num_experts=2", "scale=30.0"]),
    "ResLTBatchNorm": (lambda: create_model("reslt_small_cnn", num_classes=3), ["num_branches=3"]),
    "ResLTConv": (lambda: create_model("reslt_resnet10", num_classes=3), ["test_tau=0.3", "block_order='pool_first'"]),
    "ResNetTrunk": (lambda: ResNetTrunk("resnet10", num_stages=2), ["arch='resnet10'", "num_stages=2"]),
    "BasicBlockA": (lambda: BasicBlockA(16, 24, stride=2), ["shortcut_padding=4"]),
    "FeatureClassifier": (lambda: create_model("small_cnn", num_classes=3), ["(classifier): Linear"]),
    "ExpertRouter": (lambda: ExpertRouter(3, 16, 10, top_k=5), ["num_routers=2", "top_k=5", "init='default'"]),
    "FrozenBackbone": (_frozen_backbone, ["freeze_bn=True"]),
}


def public_module_classes():
    """Every nn.Module subclass defined in a fastlt module under a public name (ops excluded: autograd only)."""
    found = {}
    for info in pkgutil.walk_packages(fastlt.__path__, "fastlt."):
        if any(part.startswith("_") for part in info.name.split(".")[1:]) or info.name.startswith("fastlt.ops"):
            continue
        try:
            module = importlib.import_module(info.name)
        except ImportError:  # optional dependencies (DALI, ...) of modules that define no nn.Module
            continue
        for name, value in vars(module).items():
            if (inspect.isclass(value) and issubclass(value, nn.Module) and value.__module__ == module.__name__
                    and not name.startswith("_")):
                found[name] = value
    return found


def test_every_public_module_has_a_repr_check():
    """A public module is either checked in EXPECTED or defines its own extra_repr (the methods' losses, e.g.
    BalPoE's and SADE's, live with their methods)."""
    classes = public_module_classes()
    assert set(EXPECTED) <= set(classes)
    unchecked = [name for name, value in classes.items()
                 if name not in EXPECTED and value.extra_repr is nn.Module.extra_repr]
    assert not unchecked, f"add a repr check or an extra_repr for {sorted(unchecked)}"


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_module_prints_its_configuration(name):
    builder, substrings = EXPECTED[name]
    text = repr(builder())
    assert text.startswith(f"{name}(")
    for substring in substrings:
        assert substring in text, (name, substring, text[:300])
