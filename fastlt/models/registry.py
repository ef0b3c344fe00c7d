"""Model registry: a name in a config or on the command line builds a model (as in timm)."""

import fnmatch
from typing import Callable, Dict, List

from torch import nn

_MODEL_BUILDERS: Dict[str, Callable[..., nn.Module]] = {}


def register_model(builder: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
    """Decorator: registers `builder(num_classes, **kwargs) -> nn.Module` under its function name."""
    if builder.__name__ in _MODEL_BUILDERS:
        raise ValueError(f"register_model: a model named {builder.__name__!r} is already registered")
    _MODEL_BUILDERS[builder.__name__] = builder
    return builder


def get_model_builder(name: str) -> Callable[..., nn.Module]:
    """The registered builder of `name` (its arguments are the model's options)."""
    if name not in _MODEL_BUILDERS:
        raise KeyError(f"create_model: unknown model {name!r}; known: {', '.join(list_models())}")
    return _MODEL_BUILDERS[name]


def create_model(name: str, num_classes: int, **kwargs) -> nn.Module:
    """Builds a registered model.

    >>> model = create_model("ride_resnet32", num_classes=100, num_experts=3)
    """
    return get_model_builder(name)(num_classes=num_classes, **kwargs)


def list_models(pattern: str = "*") -> List[str]:
    """Sorted names of the registered models matching a shell-style pattern, e.g. list_models("ride_*")."""
    return sorted(name for name in _MODEL_BUILDERS if fnmatch.fnmatch(name, pattern))
