"""A recipe value checked against a type hint (`int`, `float | None`, `list[str]`, an enum, ...) and coerced.

YAML and `--set` give strings, ints, floats, bools, lists and mappings; a hint from the TrainingArguments
dataclass (or dpa's own table) says which of them fit. Ints must be integral (`2.0` is 2, `2.5` is not),
floats finite, bools real booleans (not 0/1), enum values existing names.
"""

from __future__ import annotations

import difflib
import json
import math
import types
import typing
from enum import Enum
from typing import Any, Literal, Union


class Mismatch(Exception):
    """The value does not fit; `expected` completes "is not ..." / "must be ...", `hint` may say what fits."""

    def __init__(self, expected: str, hint: str | None = None):
        super().__init__(expected)
        self.expected = expected
        self.hint = hint


def coerce(value: Any, hint: Any) -> Any:
    """`value` as the type `hint` names, or Mismatch."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (Union, types.UnionType):
        return _union(value, args)
    if hint is Any:
        return value
    if hint is type(None):
        if value is None:
            return None
        raise Mismatch("is not null")
    if origin is Literal:
        if any(value is a or (type(value) is type(a) and value == a) for a in args):
            return value
        raise Mismatch(f"is not {' or '.join(map(repr, args))}")
    if isinstance(hint, type) and issubclass(hint, Enum):
        return enum_value(value, hint)
    if hint in (bool, int, float, str):
        return SCALARS[hint](value)
    if hint is list or origin is list:
        return _list(value, args[0] if args else Any)
    if hint is dict or origin is dict:
        return _mapping(value, args[1] if args else Any)
    raise Mismatch(f"cannot be set in a recipe (it takes a {getattr(hint, '__name__', hint)} object)")


def _union(value: Any, args: tuple[Any, ...]) -> Any:
    if value is None:
        if type(None) in args:
            return None
        raise Mismatch(f"is not {_describe(args)}")
    # An enum's spelling is a string: a union with str (`OptimizerNames | str`) still takes only its names,
    # and `str | list[DebugOption]` takes them space-separated.
    for arg in args:
        if isinstance(arg, type) and issubclass(arg, Enum):
            return enum_value(value, arg)
        inner = typing.get_args(arg)
        if typing.get_origin(arg) is list and inner and isinstance(inner[0], type) and issubclass(inner[0], Enum):
            _list(value.split() if isinstance(value, str) else value, inner[0])
            return value
    if (
        isinstance(value, str)
        and value.startswith("{")
        and any(a is dict or typing.get_origin(a) is dict for a in args)
    ):
        return _json_mapping(value)  # TrainingArguments reads such text as JSON (other text is a file path)
    for arg in args:
        if arg is type(None):
            continue
        try:
            return _text(value, strict=True) if arg is str else coerce(value, arg)
        except Mismatch:
            continue
    raise Mismatch(f"is not {_describe(args)}")


def _describe(args: tuple[Any, ...]) -> str:
    names = {bool: "true or false", int: "an integer", float: "a number", str: "a text", type(None): "null"}
    said = []
    for arg in args:
        origin = typing.get_origin(arg)
        if arg in names:
            said.append(names[arg])
        elif arg is list or origin is list:
            said.append("a list")
        elif arg is dict or origin is dict:
            said.append("a mapping")
        elif origin is Literal:
            said += [repr(a).lower() if isinstance(a, bool) else repr(a) for a in typing.get_args(arg)]
        else:
            said.append(f"a {getattr(arg, '__name__', arg)} object")
    return " or ".join(dict.fromkeys(said))


def enum_value(value: Any, enum: type[Enum]) -> str:
    """The enum's value spelled as text (TrainingArguments converts it itself)."""
    names = [str(member.value) for member in enum]
    if isinstance(value, enum):
        return str(value.value)
    if isinstance(value, str) and value in names:
        return value
    return choice(value, names, f"one of transformers' {enum.__name__}")


def choice(value: Any, names: list[str], what: str) -> Any:
    """`value` when it is one of `names`; else Mismatch listing the close matches (or the first names)."""
    if isinstance(value, str) and value in names:
        return value
    close = difflib.get_close_matches(str(value), names, n=4, cutoff=0.5)
    shown = close or names[:12]
    more = "" if close or len(names) <= 12 else f", ... ({len(names)} in all)"
    raise Mismatch(f"is not {what}", hint=f"{'did you mean' if close else 'use one of'} {', '.join(shown)}{more}")


def _number(value: Any) -> float | int:
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise Mismatch("is not a number")
    try:
        number = float(value)  # YAML 1.1 reads `2e-5` as a string
    except ValueError:
        raise Mismatch("is not a number") from None
    except OverflowError:  # an int of 400 digits
        raise Mismatch("must be a finite number") from None
    if not math.isfinite(number):
        raise Mismatch("must be a finite number")
    return value if isinstance(value, int) else number  # an int stays one (`logging_steps: 10` in dpa.yaml)


def _integer(value: Any) -> int:
    if not (isinstance(value, int) and not isinstance(value, bool)):
        try:
            number = _number(value)
        except Mismatch:
            raise Mismatch("is not an integer") from None
        if not number.is_integer():
            raise Mismatch("is not an integer")
        value = int(number)
    if not -(2**63) <= value < 2**63:  # torch and numpy hold it in 64 bits
        raise Mismatch("is too large an integer (64 bits at most)")
    return value


def _bool(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    raise Mismatch("is not true or false")


def _text(value: Any, strict: bool = False) -> str:
    """A string; a number stands for its digits where only text fits (`run_name: 2024`)."""
    if isinstance(value, str):
        return value
    if not strict and isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    raise Mismatch("is not a text")


def _list(value: Any, item: Any) -> list[Any]:
    if not isinstance(value, list):
        raise Mismatch("is not a list")
    try:
        return [coerce(v, item) for v in value]
    except Mismatch as bad:
        raise Mismatch(f"has an item that {bad.expected}", bad.hint) from None


def _mapping(value: Any, item: Any) -> dict[str, Any]:
    if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
        raise Mismatch("is not a mapping of names to values")
    try:
        return {k: coerce(v, item) for k, v in value.items()}
    except Mismatch as bad:
        raise Mismatch(f"has an entry that {bad.expected}", bad.hint) from None


def _json_mapping(text: str) -> str:
    try:
        parsed = json.loads(text)
    except json.JSONDecodeError as err:
        raise Mismatch(f"is not valid JSON ({err})") from None
    if not isinstance(parsed, dict):
        raise Mismatch("is not a JSON object")
    return text


SCALARS = {bool: _bool, int: _integer, float: _number, str: _text}


def only_text(hint: Any) -> bool:
    """Whether the hint takes text and nothing else but null (then a `--set` value is taken as typed)."""
    if hint is str:
        return True
    args = typing.get_args(hint)
    return typing.get_origin(hint) in (Union, types.UnionType) and set(args) == {str, type(None)}
