"""Reading the JSON and YAML files a user hands dpa (configs, recipes, data, records), with one-line errors.

Every user-supplied JSON / YAML file is parsed here, so a hostile or damaged one fails the same way
everywhere: a `BadInputError` naming the file and what is wrong (not JSON, not UTF-8, nested deeper than
anything real, a number Python will not convert, NaN or Infinity where JSON has none), never a
RecursionError or ValueError traceback from deep inside a parser.
"""

from __future__ import annotations

import errno
import json
import math
import os
import re
import stat
from pathlib import Path
from typing import Any

import yaml

from dpa_cli.errors import BadInputError, yaml_problem

# Deeper than any config, recipe or record dpa reads; deeper values would only make later code recurse.
MAX_DEPTH = 64


class JsonError(ValueError):
    """Why a text is not acceptable JSON / YAML, in words; callers add the file name."""


def _no_constant(name: str) -> float:
    raise JsonError(f"{name} is not a JSON number")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise JsonError(f"the number {text[:20]}{'...' if len(text) > 20 else ''} is too large for a float")
    return value


def _nan_ok_float(text: str) -> float:
    return float(text)


# One decoder for every user file: NaN / Infinity literals and floats that overflow to inf are refused.
DECODER = json.JSONDecoder(parse_constant=_no_constant, parse_float=_finite_float)
_LENIENT = json.JSONDecoder(parse_float=_nan_ok_float)  # files dpa wrote itself, where NaN means "no value"


def reason(err: BaseException) -> str:
    """The words for a parse failure of `parse_json` / `parse_yaml` or of `DECODER.raw_decode`."""
    if isinstance(err, JsonError):
        return str(err)
    if isinstance(err, json.JSONDecodeError):
        return f"not valid JSON (line {err.lineno}, column {err.colno}: {err.msg})"
    if isinstance(err, yaml.YAMLError):
        return f"not valid YAML, {yaml_problem(err)}"
    if isinstance(err, RecursionError):
        return f"nested too deeply (more than {MAX_DEPTH} levels of lists or objects)"
    if isinstance(err, UnicodeDecodeError):
        return f"not UTF-8 text (byte {err.object[err.start]:#04x} at offset {err.start})"
    if isinstance(err, ValueError) and "digits" in str(err):  # int() refuses numbers over 4300 digits
        return "holds an integer with thousands of digits"
    return str(err).splitlines()[0] if str(err) else type(err).__name__


PARSE_ERRORS = (JsonError, json.JSONDecodeError, yaml.YAMLError, RecursionError, UnicodeDecodeError, ValueError)


def check_depth(value: Any, limit: int = MAX_DEPTH) -> Any:
    """`value` itself, or a JsonError when lists / mappings nest deeper than `limit`.

    Iterative, and each container is visited once: a YAML alias graph (a "billion laughs") costs its size.
    """
    seen: set[int] = set()
    stack = [(value, 1)]
    while stack:
        node, depth = stack.pop()
        if not isinstance(node, (dict, list)) or id(node) in seen:
            continue
        if depth > limit:
            raise JsonError(f"nested too deeply (more than {limit} levels of lists or objects)")
        seen.add(id(node))
        stack.extend((child, depth + 1) for child in (node.values() if isinstance(node, dict) else node))
    return value


def parse_json(text: str | bytes, allow_nan: bool = False, max_depth: int | None = MAX_DEPTH) -> Any:
    """JSON text -> value; raises one of PARSE_ERRORS (turn it into words with `reason`)."""
    if isinstance(text, bytes):
        text = text.decode("utf-8-sig")
    decoder = _LENIENT if allow_nan else DECODER
    value, end = decoder.raw_decode(text, _skip_space(text, 0))
    if _skip_space(text, end) != len(text):
        raise json.JSONDecodeError("Extra data", text, end)
    return check_depth(value, max_depth) if max_depth else value


def _skip_space(text: str, position: int) -> int:
    while position < len(text) and text[position] in " \t\n\r":
        position += 1
    return position


_QUOTED_OR_COMMENT = re.compile(r"'[^']*'|\"(?:[^\"\\]|\\.)*\"|#[^\n]*")
_BRACKET = re.compile(r"[\[\]{}]")


def _flow_depth(text: str) -> int:
    """How deep YAML flow collections ([...], {...}) nest, outside quotes and comments (a cheap upper bound)."""
    depth = deepest = 0
    for match in _BRACKET.finditer(_QUOTED_OR_COMMENT.sub("", text)):
        depth = depth + 1 if match.group() in "[{" else max(depth - 1, 0)
        deepest = max(deepest, depth)
    return deepest


def parse_yaml(text: str | bytes, max_depth: int | None = MAX_DEPTH, loader: Any = yaml.SafeLoader) -> Any:
    """YAML text -> value (a safe loader, `yaml.SafeLoader` or a subclass); raises one of PARSE_ERRORS.

    Deep flow nesting is refused before PyYAML sees it: its scanner is quadratic in the nesting depth (100k
    levels of `[` take minutes before the recursion limit is even reached).
    """
    if isinstance(text, bytes):
        text = text.decode("utf-8-sig")
    if max_depth and _flow_depth(text) > max_depth:
        raise JsonError(f"nested too deeply (more than {max_depth} levels of lists or objects)")
    value = yaml.load(text, Loader=loader)  # noqa: S506  (a SafeLoader: plain data only)
    return check_depth(value, max_depth) if max_depth else value


def read_regular(path: Path | str) -> bytes:
    """The bytes of a regular file. A FIFO, socket or device is an OSError ("not a regular file ..."), not a
    read that blocks for ever (a FIFO with no writer) or never ends (/dev/zero); a folder is IsADirectoryError.
    The file is opened without blocking and judged by the open handle, so it cannot be swapped in between."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    try:
        mode = os.fstat(fd).st_mode
        if stat.S_ISDIR(mode):
            raise IsADirectoryError(errno.EISDIR, "Is a directory", str(path))
        if not stat.S_ISREG(mode):
            raise OSError(errno.EINVAL, "not a regular file (a FIFO, socket or device)", str(path))
        with os.fdopen(fd, "rb") as handle:
            fd = -1  # the handle owns it now
            return handle.read()
    finally:
        if fd >= 0:
            os.close(fd)


def _read(path: Path, where: str, hint: str | None, error: type[BadInputError]) -> bytes:
    try:
        return read_regular(path)
    except FileNotFoundError:
        raise error(f"{where}: no such file", hint=hint) from None
    except IsADirectoryError:
        raise error(f"{where}: a folder, not a file", hint=hint) from None
    except OSError as err:
        raise error(f"{where}: cannot read it ({err.strerror or err})", hint=hint) from None


def read_json(
    path: Path | str,
    where: str | None = None,
    hint: str | None = None,
    *,
    allow_nan: bool = False,
    max_depth: int | None = MAX_DEPTH,
    error: type[BadInputError] = BadInputError,
) -> Any:
    """The JSON value in `path`; anything wrong is `error` (a BadInputError) naming `where` (default: the path)."""
    where = where or str(path)
    raw = _read(Path(path), where, hint, error)
    try:
        return parse_json(raw, allow_nan=allow_nan, max_depth=max_depth)
    except PARSE_ERRORS as err:
        raise error(f"{where}: {reason(err)}", hint=hint) from None


def read_yaml(
    path: Path | str,
    where: str | None = None,
    hint: str | None = None,
    *,
    max_depth: int | None = MAX_DEPTH,
    error: type[BadInputError] = BadInputError,
    loader: Any = yaml.SafeLoader,
) -> Any:
    """The YAML value in `path` (a safe loader); anything wrong is `error` naming `where` (default: the path)."""
    where = where or str(path)
    raw = _read(Path(path), where, hint, error)
    try:
        return parse_yaml(raw, max_depth=max_depth, loader=loader)
    except PARSE_ERRORS as err:
        raise error(f"{where}: {reason(err)}", hint=hint) from None
