"""Typed errors the library raises and the CLI renders as one-line messages.

Exit code 2 means the input was wrong (the user can fix it); 1 means the work failed.
"""

from __future__ import annotations


class DpaError(Exception):
    """A failure the user can read: `message` says what, `hint` says what to do."""

    exit_code = 1

    def __init__(self, message: str, hint: str | None = None):
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return self.message if not self.hint else f"{self.message}\n{self.hint}"


class BadInputError(DpaError):
    """The user's input (a path, a checkpoint, a flag, data) cannot be used."""

    exit_code = 2


class ModelNotFoundError(BadInputError):
    """MODEL is neither a folder, a cached repo id, nor a catalog alias."""


class CheckpointError(BadInputError):
    """A checkpoint folder is missing a file or holds a corrupt one."""


class UnknownFamilyError(BadInputError):
    """config.json names a model no family adapter recognises."""


def yaml_problem(err: Exception) -> str:
    """A YAML parse error in one line: where and what (PyYAML's own text spans several lines)."""
    mark = getattr(err, "problem_mark", None)
    where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
    what = getattr(err, "problem", None) or str(err).strip().splitlines()[0]
    return where + what
