"""Models for long-tailed recognition, built by name: `create_model("ride_resnet32", num_classes=100)`.

Every model returns a `ModelOutput` (logits, features, and per-expert / per-branch logits where they exist).
"""

from fastlt.models import imagenet_resnet, resnet_cifar, small_cnn  # noqa: F401  (register their models)
from fastlt.models import reslt, ride  # noqa: F401  (register their models)
from fastlt.models.base import FeatureClassifier, ModelOutput
from fastlt.models.heads import LearnableWeightScaling, NearestClassMean, NormedLinear, TauNormLinear, create_head
from fastlt.models.registry import create_model, list_models, register_model
from fastlt.models.reslt import ResLTBatchNorm, ResLTConv, RIDEResLT
from fastlt.models.ride import RIDE

__all__ = [
    "FeatureClassifier",
    "LearnableWeightScaling",
    "ModelOutput",
    "NearestClassMean",
    "NormedLinear",
    "RIDE",
    "RIDEResLT",
    "ResLTBatchNorm",
    "ResLTConv",
    "TauNormLinear",
    "create_head",
    "create_model",
    "list_models",
    "register_model",
]
