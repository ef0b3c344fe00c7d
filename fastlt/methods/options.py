"""Declared options: the code that reads a recipe section declares its keys, and this module checks a section against
that declaration and turns it into a typed object.

A declaration is a dataclass made with `@declared`; each field is one key: its type (the annotation), its default and
its meaning, `option(default, "what it does", low=..., choices=...)`. `parse(declaration, section, "method")` refuses
a key the declaration does not have (naming the closest one), a value of the wrong type or out of range and a missing
required key, each with a one-line ConfigError naming the dotted key. A key whose value is itself a section has a
declaration as its type (`data.augment_options`), or `declarations=`: the declarations a section's `name` picks from
(the methods, the models, the schedules).

>>> @declared
... class Example:
...     epochs: int = option(REQUIRED, "epochs to train", low=1)
...     taus: Tuple[float, ...] = option((0.0, 1.0), "one tau per expert")
>>> parse(Example, {"epochs": 3}, "train")
Example(epochs=3, taus=(0.0, 1.0))
>>> parse(Example, {"epochz": 3}, "train")
Traceback (most recent call last):
...
fastlt.methods.options.UnknownKeyError: unknown config key 'train.epochz': did you mean train.epochs?
>>> parse(Example, {"epochs": 0}, "train")
Traceback (most recent call last):
...
fastlt.errors.ConfigError: train.epochs must be an integer >= 1, got 0
"""

import collections.abc
import dataclasses
import difflib
import functools
import inspect
import math
import numbers
import typing
from typing import Any, Callable, Dict, Iterator, List, NamedTuple, Optional, Sequence, Tuple

from fastlt.errors import ConfigError

REQUIRED = dataclasses.MISSING  # an option without a default: the recipe must set it

# A declaration: a frozen dataclass whose fields are all keyword-only (so a required key may follow a defaulted one).
declared = functools.partial(dataclasses.dataclass, frozen=True, kw_only=True)


class UnknownKeyError(ConfigError):
    """A key its section does not declare; `known` holds the keys the section accepts, `suggestion` the closest
    one (None when none is close); `note` follows the known keys."""

    def __init__(self, key: str, known: Sequence[str], suggestion: Optional[str] = None, note: str = ""):
        self.key, self.known = key, list(known)
        section, _, leaf = key.rpartition(".")
        if suggestion is None:
            close = closest(leaf, self.known)
            suggestion = None if close is None else (f"{section}.{close}" if section else close)
        self.suggestion = suggestion
        hint = f"did you mean {suggestion}?" if suggestion else f"known keys: {', '.join(sorted(self.known))}{note}"
        super().__init__(f"unknown config key {key!r}: {hint}")


def option(default=REQUIRED, doc: str = "", *, low=None, high=None, low_open: bool = False, high_open: bool = False,
           choices: Optional[Sequence] = None, declarations: Optional[Callable[[], Dict[str, type]]] = None):
    """One declared key: a dataclass field with its meaning and allowed values.

    low / high bound a number (each number of a list), inclusive unless low_open / high_open; choices lists the
    allowed values; declarations() gives {name: declaration} for a section whose `name` picks its declaration."""
    metadata = {"doc": doc, "low": low, "high": high, "low_open": low_open, "high_open": high_open,
                "choices": None if choices is None else tuple(choices), "declarations": declarations}
    return dataclasses.field(default=default, metadata=metadata)


def default_of(function: Callable, parameter: str):
    """The default of `function`'s `parameter`: an option passed on to that function keeps its default there."""
    return inspect.signature(function).parameters[parameter].default


def closest(key: str, candidates: Sequence[str]) -> Optional[str]:
    matches = difflib.get_close_matches(str(key), [str(candidate) for candidate in candidates], n=1, cutoff=0.6)
    return matches[0] if matches else None


@declared
class Named:
    """A section whose `name` picks the code that reads it (a method, a model, a schedule, a dataset)."""

    name: str = option(REQUIRED, "which one")


def parse(declaration: type, section, path: str = ""):
    """The declaration's typed object from a recipe section (a dict; a bare string stands for {name: string})."""
    if isinstance(section, declaration):
        return section
    fields = declared_fields(declaration)
    if isinstance(section, str) and "name" in fields:
        section = {"name": section}
    if not isinstance(section, dict):
        raise ConfigError(f"{path or 'the config'} must be a section of key: value pairs, got {section!r}")
    for key in section:
        if key not in fields:
            raise UnknownKeyError(_join(path, key), list(fields))
    values = {}
    for name, field in fields.items():
        key = _join(path, name)
        if field.default is REQUIRED and section.get(name) is None:
            raise ConfigError(f"the config sets no {key}: add it to the recipe or pass {key}=<value>")
        if name in section:
            values[name] = _value(field, section[name], key)
    return declaration(**values)


def parse_named(declarations: Dict[str, type], section, path: str, what: str):
    """A section whose `name` picks its declaration among `declarations` (what: 'method', 'model', ...); options
    already parsed are returned as they are."""
    if dataclasses.is_dataclass(section) and not isinstance(section, type):
        return section
    section = {"name": section} if isinstance(section, str) else section
    if not isinstance(section, dict):
        raise ConfigError(f"{path} must be a section of key: value pairs, got {section!r}")
    name = section.get("name")
    if name is None:
        raise ConfigError(f"the config sets no {path}.name: add it to the recipe or pass {path}.name=<value>")
    if name not in declarations:
        close = closest(name, sorted(declarations)) if isinstance(name, str) else None
        hint = f"did you mean {close}?" if close else f"expected one of {', '.join(sorted(declarations))}"
        raise ConfigError(f"{path}.name: unknown {what} {name!r}; {hint}")
    return parse(declarations[name], section, path)


@functools.lru_cache(maxsize=None)
def declared_fields(declaration: type) -> Dict[str, dataclasses.Field]:
    """name -> field, each field's `type` resolved to the annotation's object."""
    hints = typing.get_type_hints(declaration)
    fields = {}
    for field in dataclasses.fields(declaration):
        field.type = hints[field.name]
        fields[field.name] = field
    return fields


def _join(path: str, key) -> str:
    return f"{path}.{key}" if path else str(key)


def _without_none(annotation) -> Tuple[Any, bool]:
    """(the annotation without Optional, whether None is allowed)."""
    if typing.get_origin(annotation) is typing.Union and type(None) in typing.get_args(annotation):
        return next(arg for arg in typing.get_args(annotation) if arg is not type(None)), True
    return annotation, False


def _is_sequence(annotation) -> bool:
    return annotation in (tuple, list) or typing.get_origin(annotation) in (tuple, list, collections.abc.Sequence)


def _value(field: dataclasses.Field, value, key: str):
    annotation, nullable = _without_none(field.type)
    if value is None and nullable:
        return None
    if field.metadata.get("declarations") is not None:
        return parse_named(field.metadata["declarations"](), value, key, key.rpartition(".")[2])
    return _convert(annotation, value, key, field.metadata, field.type)


def _convert(annotation, value, key: str, meta, declared_type=None):
    """`value` checked against `annotation`; errors say what `declared_type` (default: the annotation) takes."""
    wanted = kind(annotation if declared_type is None else declared_type, meta)
    if dataclasses.is_dataclass(annotation):
        return parse(annotation, value, key)
    if _is_sequence(annotation):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key} must be {wanted}, got {value!r}")
        item = (typing.get_args(annotation) or (Any,))[0]
        try:
            return tuple(_convert(item, element, key, meta) for element in value)
        except ConfigError:
            raise ConfigError(f"{key} must be {wanted}, got {value!r}") from None
    if annotation is dict or typing.get_origin(annotation) is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key} must be a section of key: value pairs, got {value!r}")
        return value
    fits = {bool: lambda v: isinstance(v, bool),
            int: lambda v: isinstance(v, numbers.Integral) and not isinstance(v, bool),
            float: lambda v: isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(v),
            str: lambda v: isinstance(v, str)}.get(annotation, lambda v: True)
    if not fits(value) or not _in_range(value, meta):
        raise ConfigError(f"{key} must be {wanted}, got {value!r}")
    return value


def _in_range(value, meta) -> bool:
    if meta.get("choices") is not None and value not in meta["choices"]:
        return False
    low, high = meta.get("low"), meta.get("high")
    if low is not None and (value < low or (meta["low_open"] and value == low)):
        return False
    return high is None or not (value > high or (meta["high_open"] and value == high))


def kind(annotation, meta=None) -> str:
    """What a value must be, in words: 'an integer >= 1', 'a number in [0, 1)', 'one of val, test'."""
    meta = meta or {}
    annotation, nullable = _without_none(annotation)
    suffix = " or null" if nullable else ""
    if meta.get("declarations") is not None:
        return "a name or a section with a name" + suffix
    if dataclasses.is_dataclass(annotation):
        return ("a name or a section" if "name" in declared_fields(annotation) else "a section") + suffix
    if meta.get("choices") is not None:
        return "one of " + ", ".join(str(choice) for choice in meta["choices"]) + suffix
    if _is_sequence(annotation):
        item = (typing.get_args(annotation) or (Any,))[0]
        items = {int: "integers", float: "numbers", str: "strings"}.get(item, "values")
        return f"a list of {items}{_range_text(meta)}{suffix}"
    if annotation is dict or typing.get_origin(annotation) is dict:
        return "a section" + suffix
    words = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}.get(annotation, "a value")
    return words + _range_text(meta) + suffix


def _range_text(meta) -> str:
    low, high = meta.get("low"), meta.get("high")
    if low is not None and high is not None:
        return f" in {'(' if meta['low_open'] else '['}{low}, {high}{')' if meta['high_open'] else ']'}"
    if low is not None:
        return f" {'>' if meta['low_open'] else '>='} {low}"
    if high is not None:
        return f" {'<' if meta['high_open'] else '<='} {high}"
    return ""


class Row(NamedTuple):
    key: str
    kind: str
    default: str
    doc: str
    value: str  # the parsed object's value ('' when no object was given)


def rows(declaration: type, values=None, path: str = "", skip: Sequence[str] = ()) -> Iterator[Row]:
    """One Row per key of a declaration (but `skip`), nested sections expanded: those of its type, or those `values`
    (a parsed object) chose (a recipe's method, its schedule)."""
    for name, field in declared_fields(declaration).items():
        if name in skip:
            continue
        key = _join(path, name)
        value = getattr(values, name) if values is not None else None
        default = "required" if field.default is REQUIRED else show(field.default)
        yield Row(key, kind(field.type, field.metadata), default, field.metadata.get("doc", ""),
                  "" if values is None or dataclasses.is_dataclass(value) else show(value))
        # a section's own declaration, or the one its name picked; not the base of those it could pick
        nested = type(value) if dataclasses.is_dataclass(value) else (
            None if field.metadata.get("declarations") else _without_none(field.type)[0])
        if dataclasses.is_dataclass(nested):
            yield from rows(nested, value, key)


def show(value) -> str:
    """A value as a recipe writes it."""
    if dataclasses.is_dataclass(value):
        return "{" + ", ".join(f"{k}: {show(v)}" for k, v in dataclasses.asdict(value).items() if v is not None) + "}"
    if isinstance(value, (tuple, list)):
        return "[" + ", ".join(show(item) for item in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{key}: {show(item)}" for key, item in value.items()) + "}"
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def table(declaration: type, values=None, path: str = "", skip: Sequence[str] = ()) -> str:
    """The declaration's keys as text, one per line, its meaning below it: for --help and `fastlt methods`."""
    lines: List[str] = []
    for row in rows(declaration, values, path, skip):
        setting = f" = {row.value if len(row.value) <= 60 else row.value[:57] + '...'}" if row.value else ""
        lines.append(f"  {row.key}{setting}  ({row.kind}; default {row.default})")
        if row.doc:
            lines.append(f"      {row.doc}")
    return "\n".join(lines) if lines else "  (no options)"


def options_from_signature(function: Callable, name: str, skip: Sequence[str] = ()) -> type:
    """A declaration made from a function's parameters (a model builder, a schedule): the annotation, else the
    default's type, is the type; a parameter without a default is required; `name` picks it."""
    fields = []
    for parameter in inspect.signature(function).parameters.values():
        if parameter.name in skip or parameter.kind in (parameter.VAR_POSITIONAL, parameter.VAR_KEYWORD):
            continue
        annotation = parameter.annotation
        if annotation is inspect.Parameter.empty:
            annotation = Any if parameter.default in (inspect.Parameter.empty, None) else type(parameter.default)
        default = REQUIRED if parameter.default is inspect.Parameter.empty else parameter.default
        fields.append((parameter.name, annotation, option(default, f"the {parameter.name} argument of {name}")))
    return dataclasses.make_dataclass(f"{name}_options", fields, bases=(Named,), frozen=True, kw_only=True)


def given(values, skip: Sequence[str] = ("name",)) -> dict:
    """The fields of a parsed object that are not None: the keyword arguments of a callee whose own defaults apply to
    the options left unset (a sampler's, a loader's)."""
    return {field.name: getattr(values, field.name) for field in dataclasses.fields(values)
            if field.name not in skip and getattr(values, field.name) is not None}
