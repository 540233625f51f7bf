"""Typed shapes for the files dpa reads back (config.json, dpa.yaml, dpa_export.json), checked in one pass.

A shape is data: `Record` fields, `MapOf` / `ListOf` containers and scalar rules (`Int`, `Number`, `Str`,
`Bool`, `Digest`, `RelPath`). `validate` walks a parsed value against one and stops at the first thing
wrong with a `BadInputError` that names the file and the key path, e.g.
`dpa.yaml: stages.stage1.steps must be an integer, not 'x'`. Unknown keys are allowed (files written by a
newer dpa, or notes a user added); known keys must have the right type, and required ones must be there.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import date
from pathlib import Path, PurePosixPath
from typing import Any

from dpa_cli.checkpoint.hashing import ALGORITHMS
from dpa_cli.errors import BadInputError


def show(value: Any) -> str:
    """A value as the user wrote it, short: 'x', -8, 1.5, null, true, a list [1, 2], a mapping."""
    if isinstance(value, str):
        return repr(value if len(value) <= 60 else value[:57] + "...")
    if isinstance(value, (list, tuple)):
        text = json.dumps(value, default=str)
        return f"a list {text}" if len(text) <= 40 else "a list"
    if isinstance(value, Mapping):
        return "a mapping"
    if value is None or isinstance(value, bool):
        return json.dumps(value)
    return str(value)


def key_path(parent: str, key: Any) -> str:
    """`stages.stage1`; keys that are not plain names are quoted: `plan.kept['target vision']`."""
    name = str(key)
    plain = isinstance(key, str) and re.fullmatch(r"[A-Za-z_][A-Za-z0-9_-]*", name)
    return (f"{parent}.{name}" if parent else name) if plain else f"{parent}[{key!r}]"


@dataclass(frozen=True)
class Context:
    """What a rule may need beyond the value: the folder relative paths must stay inside."""

    root: Path | None = None
    root_name: str = "the folder"


class Spec:
    """A rule for one value. `problem` returns what is wrong (a phrase after the key path), or None."""

    nullable: bool = False

    def problem(self, value: Any, ctx: Context) -> str | None:
        raise NotImplementedError

    def children(self, value: Any) -> list[tuple[Any, Any, Spec]]:
        """(key, value, spec) of the parts to check next; keys are checked by a MapOf's key rule."""
        return []


@dataclass(frozen=True)
class AnyValue(Spec):
    nullable: bool = True

    def problem(self, value: Any, ctx: Context) -> str | None:
        return None


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass(frozen=True)
class Int(Spec):
    """An integer (true / false and 2.0 are not), at least `minimum` when one is given."""

    minimum: int | None = None
    nullable: bool = False

    def problem(self, value: Any, ctx: Context) -> str | None:
        if _is_int(value) and (self.minimum is None or value >= self.minimum):
            return None
        what = {None: "an integer", 0: "an integer >= 0", 1: "a positive integer"}.get(
            self.minimum, f"an integer >= {self.minimum}"
        )
        return f"must be {what}{' or null' if self.nullable else ''}, not {show(value)}"


@dataclass(frozen=True)
class Number(Spec):
    """A finite number (integers too; `finite=False` also takes NaN, a loss that went wrong), at least
    `minimum` when one is given."""

    minimum: float | None = None
    nullable: bool = False
    finite: bool = True

    def problem(self, value: Any, ctx: Context) -> str | None:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        ok = ok and (math.isfinite(value) or not self.finite)
        if ok and (self.minimum is None or not value < self.minimum):
            return None
        what = "a number" if not self.finite else "a finite number"
        what += "" if self.minimum is None else f" >= {self.minimum:g}"
        return f"must be {what}{' or null' if self.nullable else ''}, not {show(value)}"


@dataclass(frozen=True)
class Str(Spec):
    """Text; `choices` or `pattern` (a regex, with `like` an example of it) limit it; `timestamp` also takes
    the date YAML reads from an unquoted timestamp."""

    choices: tuple[str, ...] = ()
    nullable: bool = False
    timestamp: bool = False
    pattern: str | None = None
    like: str = ""

    def problem(self, value: Any, ctx: Context) -> str | None:
        if self.timestamp and isinstance(value, date):
            return None
        if not isinstance(value, str):
            return f"must be text{' or null' if self.nullable else ''}, not {show(value)}"
        if self.choices and value not in self.choices:
            return f"must be one of {', '.join(self.choices)}, not {show(value)}"
        if self.pattern and not re.fullmatch(self.pattern, value):
            return f"must look like {self.like or self.pattern}, not {show(value)}"
        return None


@dataclass(frozen=True)
class Bool(Spec):
    nullable: bool = False

    def problem(self, value: Any, ctx: Context) -> str | None:
        return None if isinstance(value, bool) else f"must be true or false, not {show(value)}"


@dataclass(frozen=True)
class Digest(Spec):
    """A file digest as dpa records it: `blake3:<64 hex>` or `sha256:<64 hex>`, or a bare sha256 (older records)."""

    def problem(self, value: Any, ctx: Context) -> str | None:
        if isinstance(value, str) and re.fullmatch(rf"(?:(?:{'|'.join(ALGORITHMS)}):)?[0-9a-f]{{64}}", value):
            return None
        spellings = " or ".join(f"{algorithm}:<64 hex digits>" for algorithm in ALGORITHMS)
        return f"must be a file digest ({spellings}), not {show(value)}"


@dataclass(frozen=True)
class RelPath(Spec):
    """A path relative to `ctx.root` that stays inside it: no `..`, not absolute, no symlink leading out."""

    nullable: bool = False

    def problem(self, value: Any, ctx: Context) -> str | None:
        if not isinstance(value, str) or not value.strip():
            return f"must be a path inside {ctx.root_name}, not {show(value)}"
        posix = PurePosixPath(value.replace("\\", "/"))
        if posix.is_absolute() or re.match(r"^[A-Za-z]:", value) or value.startswith("~"):
            return f"is an absolute path; only paths inside {ctx.root_name} are allowed"
        if ".." in posix.parts:
            return f"leaves {ctx.root_name} (a path with '..')"
        if ctx.root is not None:
            root = ctx.root.resolve()
            resolved = (root / posix).resolve()
            if resolved != root and root not in resolved.parents:
                return f"leads outside {ctx.root_name} through a symbolic link"
        return None


@dataclass(frozen=True)
class ListOf(Spec):
    item: Spec = field(default_factory=AnyValue)
    nullable: bool = False

    def problem(self, value: Any, ctx: Context) -> str | None:
        return None if isinstance(value, list) else f"must be a list, not {show(value)}"

    def children(self, value: Any) -> list[tuple[Any, Any, Spec]]:
        return [(index, item, self.item) for index, item in enumerate(value)]


@dataclass(frozen=True)
class MapOf(Spec):
    """A mapping whose keys follow `key` (text by default) and whose values follow `value`."""

    value: Spec = field(default_factory=AnyValue)
    key: Spec = field(default_factory=Str)
    nullable: bool = False

    def problem(self, value: Any, ctx: Context) -> str | None:
        return None if isinstance(value, Mapping) else f"must be a mapping, not {show(value)}"

    def children(self, value: Any) -> list[tuple[Any, Any, Spec]]:
        return [(key, item, self.value) for key, item in value.items()]


@dataclass(frozen=True, eq=False)
class Record(Spec):
    """A mapping with known fields (others allowed); `required` ones must be present."""

    fields: dict[str, Spec] = field(default_factory=dict)
    required: tuple[str, ...] = ()
    nullable: bool = False

    def problem(self, value: Any, ctx: Context) -> str | None:
        if not isinstance(value, Mapping):
            return f"must be a mapping, not {show(value)}"
        return None

    def children(self, value: Any) -> list[tuple[Any, Any, Spec]]:
        return [(key, value[key], spec) for key, spec in self.fields.items() if key in value]


def find_problem(value: Any, spec: Spec, ctx: Context | None = None, path: str = "") -> str | None:
    """The first thing wrong with `value`, as `KEY.PATH must be ...`, or None. Iterative: no recursion limit."""
    ctx = ctx or Context()
    stack = [(path, value, spec)]
    while stack:
        where, node, rule = stack.pop()
        if node is None and rule.nullable:
            continue
        found = rule.problem(node, ctx)
        if found:
            return f"{where or 'the top level'} {found}"
        if isinstance(rule, Record):
            missing = [name for name in rule.required if name not in node]
            if missing:
                return f"{key_path(where, missing[0])} is missing"
        if isinstance(rule, MapOf):
            for key in node:
                if (bad := rule.key.problem(key, ctx)) is not None:
                    return f"{where} key {show(key)} {bad}"
        stack.extend((key_path(where, key), item, child) for key, item, child in reversed(rule.children(node)))
    return None


def validate(
    value: Any,
    spec: Spec,
    where: str,
    hint: str | None = None,
    ctx: Context | None = None,
    error: type[BadInputError] = BadInputError,
) -> Any:
    """`value` when it has the shape `spec`; else `error` saying `WHERE: KEY.PATH must be ...`."""
    found = find_problem(value, spec, ctx)
    if found:
        raise error(f"{where}: {found}", hint=hint)
    return value
