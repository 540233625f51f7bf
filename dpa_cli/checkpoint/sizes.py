"""Byte sizes as users write them (`200MB`, `5GB`, `2GiB`); torch-free, so parsing a flag imports nothing heavy."""

from __future__ import annotations

import re

from dpa_cli.errors import BadInputError

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B|B)?\s*$", re.IGNORECASE)
_UNITS = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12}
_UNITS |= {"KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_size(text: str | int) -> int:
    """`"5GB"` -> 5_000_000_000 (decimal units as in transformers; `GiB` for binary), ints pass through."""
    if isinstance(text, int):
        return text
    match = _SIZE.match(text)
    if not match or float(match.group(1)) <= 0:
        raise BadInputError(f"bad size {text!r}", hint="write it like 200MB, 5GB or 2GiB")
    return int(float(match.group(1)) * _UNITS[(match.group(2) or "B").upper()])
