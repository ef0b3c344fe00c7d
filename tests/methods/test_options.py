"""The declared-options machinery (fastlt/methods/options.py): types, ranges, required keys, nested and named
sections, suggestions, and the help text made from a declaration."""

import dataclasses
from typing import Optional, Tuple

import pytest

from fastlt.methods.options import (REQUIRED, ConfigError, Named, UnknownKeyError, declared, default_of, given, option,
                                    options_from_signature, parse, parse_named, table)


@declared
class Inner(Named):
    """A nested section with a name shorthand."""

    name: str = option(REQUIRED, "the strategy", choices=("a", "b"))
    size: Optional[int] = option(None, "unset: the callee's default", low=1)


@declared
class Outer:
    epochs: int = option(REQUIRED, "epochs", low=1)
    lr: float = option(0.1, "learning rate", low=0, low_open=True)
    beta: float = option(0.5, "a weight in [0, 1)", low=0, high=1, high_open=True)
    flag: bool = option(False, "a switch")
    taus: Tuple[float, ...] = option((0.0, 1.0), "one per expert")
    inner: Inner = option(Inner(name="a"), "a nested section")
    note: Optional[str] = option(None, "free text")


def test_a_section_becomes_its_typed_object_with_the_declared_defaults():
    parsed = parse(Outer, {"epochs": 3, "taus": [0, 2], "inner": "b"}, "train")
    assert parsed == Outer(epochs=3, taus=(0, 2), inner=Inner(name="b"))
    assert parsed.lr == 0.1 and parsed.inner.size is None and given(parsed.inner) == {}
    assert parse(Outer, parsed) is parsed  # options already parsed pass through
    assert parse(Outer, {"epochs": 3, "inner": {"name": "a", "size": 4}}).inner == Inner(name="a", size=4)
    with pytest.raises(dataclasses.FrozenInstanceError):  # a method cannot change its options behind the recipe's back
        parsed.lr = 1.0


@pytest.mark.parametrize("section, message", [
    ({"epochs": 0}, "train.epochs must be an integer >= 1, got 0"),
    ({"epochs": True}, "train.epochs must be an integer >= 1, got True"),  # YAML's true is not an integer
    ({"epochs": 2.0}, "train.epochs must be an integer >= 1, got 2.0"),
    ({"epochs": 1, "lr": 0}, "train.lr must be a number > 0, got 0"),
    ({"epochs": 1, "lr": float("nan")}, "train.lr must be a number > 0, got nan"),
    ({"epochs": 1, "beta": 1}, r"train.beta must be a number in \[0, 1\), got 1"),
    ({"epochs": 1, "flag": "yes"}, "train.flag must be true or false, got 'yes'"),
    ({"epochs": 1, "taus": 1.0}, "train.taus must be a list of numbers, got 1.0"),
    ({"epochs": 1, "taus": [0, "x"]}, r"train.taus must be a list of numbers, got \[0, 'x'\]"),
    ({"epochs": 1, "inner": "c"}, "train.inner.name must be one of a, b, got 'c'"),
    ({"epochs": 1, "inner": {"name": "a", "size": 0}}, "train.inner.size must be an integer >= 1 or null, got 0"),
    ({"epochs": 1, "inner": {"name": "a", "sise": 2}}, "unknown config key 'train.inner.sise': did you mean "
                                                        "train.inner.size?"),
    ({"epochs": 1, "inner": 3}, "train.inner must be a section of key: value pairs, got 3"),
    ({"epochs": 1, "note": 3}, "train.note must be a string or null, got 3"),
    ({"lr": 1}, "the config sets no train.epochs: add it to the recipe or pass train.epochs=<value>"),
    ({"epochs": None}, "the config sets no train.epochs"),
    ({"epochs": 1, "zzz": 1}, "unknown config key 'train.zzz': known keys: beta, epochs, flag, inner, lr, note, taus"),
    ([1, 2], r"train must be a section of key: value pairs, got \[1, 2\]"),
])
def test_bad_values_are_one_line_config_errors_naming_the_key(section, message):
    with pytest.raises(ConfigError, match=message) as error:
        parse(Outer, section, "train")
    assert "\n" not in str(error.value)


def test_named_sections_pick_their_declaration_by_name():
    @declared
    class Big(Named):
        width: int = option(4, "width")

    declarations = {"small": Inner, "big": Big}
    assert parse_named(declarations, {"name": "big", "width": 8}, "model", "model") == Big(name="big", width=8)
    assert parse_named(declarations, "big", "model", "model") == Big(name="big")
    with pytest.raises(ConfigError, match="model.name: unknown model 'bog'; did you mean big?"):
        parse_named(declarations, {"name": "bog"}, "model", "model")
    with pytest.raises(ConfigError, match="model.name: unknown model 'zzz'; expected one of big, small"):
        parse_named(declarations, "zzz", "model", "model")
    with pytest.raises(ConfigError, match="the config sets no model.name"):
        parse_named(declarations, {"width": 3}, "model", "model")
    with pytest.raises(UnknownKeyError, match="'model.widht': did you mean model.width?"):
        parse_named(declarations, {"name": "big", "widht": 3}, "model", "model")


def test_a_declaration_from_a_signature_types_its_arguments():
    def builder(num_classes: int, depth: int = 3, tau=0.5, widths=(16, 32), mode: str = "a", anything=None):
        return num_classes

    declaration = options_from_signature(builder, "builder", skip=("num_classes",))
    parsed = parse(declaration, {"name": "builder", "tau": 1, "widths": [8]}, "model")
    assert (parsed.depth, parsed.tau, parsed.widths, parsed.anything) == (3, 1, (8,), None)
    with pytest.raises(ConfigError, match="model.tau must be a number, got 'x'"):
        parse(declaration, {"name": "builder", "tau": "x"}, "model")
    with pytest.raises(ConfigError, match="unknown config key 'model.num_classes'"):
        parse(declaration, {"name": "builder", "num_classes": 3}, "model")
    assert default_of(builder, "mode") == "a"


def test_the_help_table_lists_every_key_with_its_type_default_value_and_meaning():
    text = table(Outer, parse(Outer, {"epochs": 3, "inner": {"name": "b", "size": 2}}), "train")
    assert "  train.epochs = 3  (an integer >= 1; default required)\n      epochs" in text
    assert "  train.beta = 0.5  (a number in [0, 1); default 0.5)" in text
    assert "  train.taus = [0.0, 1.0]  (a list of numbers; default [0.0, 1.0])" in text
    assert "  train.inner.size = 2  (an integer >= 1 or null; default null)\n      unset: the callee's default" in text
    assert "  train.inner  (a name or a section; default {name: a})" in text
    assert table(Inner, path="x", skip=("name",)).splitlines()[0] == "  x.size  (an integer >= 1 or null; default null)"
