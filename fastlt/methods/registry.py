"""The methods a recipe can name, registered by their own files (as timm registers its models).

A stage-1 method (`method: {name: ...}`) is a function `(options, class_counts, model) -> Method`; a stage-2 method
(`stage2: {name: ...}`, `fastlt stage2 NAME`) a function `(options, stage: Stage2Context) -> Stage2Result` with a
`reload` function for `fastlt eval`. Each is registered with the declaration of its options:

    @declared
    class SADEOptions:
        tau: float = option(2.0, "the backward expert's tau")

    @register_method("sade", SADEOptions)
    def sade(options: SADEOptions, counts, model) -> Method:
        ...

A method's file is imported once by `fastlt/methods/__init__.py` (its one registration line).
"""

import dataclasses
import sys
from typing import Callable, Dict, Optional, Tuple

from fastlt.methods.options import ConfigError, Named, closest, declared_fields


@dataclasses.dataclass(frozen=True)
class Registration:
    name: str
    stage: int
    options: type  # the declaration of its options (a subclass of options.Named)
    build: Callable
    needs_model: Optional[type] = None  # stage 2: the stage-1 model class it works on
    # stage 2: (chosen, model, folder, loader, class_counts, device) -> (test logits, targets) for `fastlt eval`
    reload: Optional[Callable] = None

    @property
    def summary(self) -> str:
        """The first line of the method's docstring."""
        return (self.build.__doc__ or "").strip().splitlines()[0] if self.build.__doc__ else ""

    @property
    def source(self) -> str:
        return sys.modules[self.build.__module__].__file__


_METHODS: Dict[Tuple[int, str], Registration] = {}


def register_method(name: str, options: type, *, stage: int = 1, needs_model: Optional[type] = None,
                    reload: Optional[Callable] = None) -> Callable:
    """Decorator: registers a stage-1 (stage=1) or stage-2 (stage=2) method under `name` with its options'
    declaration (a `@declared` subclass of options.Named, whose fields are the method's keys)."""
    if stage not in (1, 2):
        raise ValueError(f"register_method: stage must be 1 or 2, got {stage!r}")
    if not (dataclasses.is_dataclass(options) and issubclass(options, Named)):
        raise TypeError(f"register_method({name!r}): options must be a @declared subclass of options.Named")
    declared_fields(options)  # resolves its annotations now: a typo in a declaration fails at import
    if stage == 2 and (needs_model is None or reload is None):
        raise TypeError(f"register_method({name!r}): a stage-2 method needs needs_model and reload")

    def register(build: Callable) -> Callable:
        if (stage, name) in _METHODS:
            raise ValueError(f"register_method: a stage-{stage} method named {name!r} is already registered")
        _METHODS[stage, name] = Registration(name, stage, options, build, needs_model, reload)
        return build

    return register


def method_names(stage: int) -> Tuple[str, ...]:
    return tuple(sorted(name for registered_stage, name in _METHODS if registered_stage == stage))


def declarations(stage: int) -> Dict[str, type]:
    """{name: options declaration} of the stage's methods (what `method:` / `stage2:` sections are checked against)."""
    return {name: registration.options for (registered_stage, name), registration in _METHODS.items()
            if registered_stage == stage}


def get_method(name: str, stage: int) -> Registration:
    """The registered method, or a ConfigError naming the closest name."""
    if (stage, name) not in _METHODS:
        section = "method" if stage == 1 else "stage2"
        close = closest(name, method_names(stage)) if isinstance(name, str) else None
        hint = f"did you mean {close}?" if close else f"expected one of {', '.join(method_names(stage))}"
        raise ConfigError(f"{section}.name: unknown stage-{stage} method {name!r}; {hint}")
    return _METHODS[stage, name]


def unregister_method(name: str, stage: int) -> None:
    """Removes a registration (tests that register a toy method)."""
    del _METHODS[stage, name]
