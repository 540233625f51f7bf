"""The command line's own refusals, the same for every command and sub-command: one `error:` line, exit 2.

Click (under Typer) parses the arguments before any dpa code runs. Its usage errors (unknown option,
missing argument, bad choice, a value that is not an integer) would print Typer's framed usage box; here
they become `error: MESSAGE` plus `  see dpa COMMAND --help`. More rules every command keeps, checked
right after parsing: a single-valued option given twice is refused (click would silently keep the last); a
value holding bytes that are not UTF-8, and a number given as inf or nan, are refused naming the option; an
output path (`-o`, `--workdir`) that could only fail to be written (below a regular file, a link to nothing,
a name too long, a folder it may not write in) is refused naming the reason.
"""

from __future__ import annotations

import contextlib
import math
import os
import re
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import typer
import typer.core

# Typer >= 0.22 vendors click as typer._click; older releases use click itself.
click: Any = getattr(typer.core, "_click", None) or typer.core.click
OUTPUT_OPTIONS = ("--output", "--workdir")


def _one_line(text: str) -> str:
    return re.sub(r"\s+", " ", text).strip()


@contextlib.contextmanager
def usage_errors() -> Iterator[None]:
    """Render click's usage errors as dpa's one-line errors (exit 2); the no-arguments help passes through."""
    try:
        yield
    except click.exceptions.NoArgsIsHelpError:
        raise
    except click.exceptions.ClickException as exc:
        if os.environ.get("DPA_DEBUG") == "1":
            raise
        from dpa_cli.cli.render import err

        ctx = getattr(exc, "ctx", None)
        err.print(f"[bold red]error:[/] {_one_line(exc.format_message())}", markup=True, highlight=False)
        if ctx is not None:
            err.print(f"  see {ctx.command_path} --help", markup=False, highlight=False)
        raise typer.Exit(2) from None


def _is_option(param: Any) -> bool:
    return getattr(param, "param_type_name", None) == "option"  # click's Option and Typer's own alike


def _flag(param: Any) -> str:
    """The name people know an option by: its longest spelling (`--perceiver`), with its `--no-` twin."""
    name = max(param.opts, key=len)
    return f"{name}/{max(param.secondary_opts, key=len)}" if param.secondary_opts else name


def refuse_repeats(ctx: Any, order: list[Any]) -> None:
    """A single-valued option given more than once is a mistake (which one did the user mean?), not `last wins`."""
    counts = Counter(p for p in order if _is_option(p) and not p.multiple and not getattr(p, "count", False))
    for param, times in counts.items():
        if times > 1:
            raise click.exceptions.UsageError(f"{_flag(param)} is given {times} times; it takes one value", ctx=ctx)


def _shown(text: str) -> str:
    """A value as it can be printed: bytes that were not UTF-8 (surrogate escapes) as \\xNN."""
    return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def _name(param: Any) -> str:
    return _flag(param) if _is_option(param) else param.name.upper()


def refuse_undecodable(ctx: Any) -> None:
    """A value with bytes that are not UTF-8 (a file name from another system): every writer and the tokenizers
    library would fail on it deep inside (`surrogates not allowed`), so it is named now, whatever the command."""
    for param in ctx.command.params:
        value = ctx.params.get(param.name)
        for item in value if isinstance(value, (list, tuple)) else [value]:
            text = str(item) if isinstance(item, (str, Path)) else ""
            if any("\udc80" <= char <= "\udcff" for char in text):
                raise click.exceptions.UsageError(
                    f"{_name(param)} {_shown(text)}: the name holds bytes that are not UTF-8 text; rename it", ctx=ctx
                )


def refuse_non_finite(ctx: Any) -> None:
    """`--temperature inf` passes a `min=0` range check and would sample uniformly at random (nan and -inf fail
    the range): a number option given as inf or nan is refused for every command."""
    for param in ctx.command.params:
        value = ctx.params.get(param.name)
        for item in value if isinstance(value, (list, tuple)) else [value]:
            if isinstance(item, float) and not math.isfinite(item):
                raise click.exceptions.UsageError(f"{_name(param)} {item}: not a finite number", ctx=ctx)


# An output is built as the hidden sibling `.NAME.dpa-tmp-PID` (checkpoint/atomic.py), so NAME must leave room
# within the 255 bytes Linux file systems (ext4, xfs, btrfs, tmpfs) take for one name.
NAME_MAX = 255
_TMP_SUFFIX = len(".") + len(".dpa-tmp-") + 7


def _output_problem(path: Path) -> str | None:
    """Why `path` cannot become an output folder, in words (None when it can): a name longer than the file system
    takes, a link to nothing or a loop, a parent that is a file, or a parent this process may not write in."""
    names = path.parts[1:]
    for index, name in enumerate(names):
        room = NAME_MAX - (_TMP_SUFFIX if index == len(names) - 1 else 0)
        if len(os.fsencode(name)) > room:
            return f"the name {name[:24]}... is {len(os.fsencode(name))} bytes, more than the {room} there is room for"
    if path.is_symlink() and not path.exists():
        return f"{path} is a symbolic link that leads nowhere (a loop or a missing target)"
    for parent in path.parents:
        if parent.exists() or parent.is_symlink():
            if not parent.is_dir():
                what = "a file, not a folder" if parent.is_file() else "not a folder"  # or a dangling link
                return f"{parent} is {what}"
            if not os.access(parent, os.W_OK | os.X_OK):
                return f"cannot write in {parent} (no permission, or a read-only file system)"
            return None
    return None


def refuse_output_below_file(ctx: Any) -> None:
    """`-o a/file/ws`: say that `a/file` is a file, before any work (mkdir would say only 'File exists'); the same
    for any output the command could only fail to write (`_output_problem`)."""
    for param in ctx.command.params:
        value = ctx.params.get(param.name)
        if value is None or not _is_option(param) or not set(param.opts) & set(OUTPUT_OPTIONS):
            continue
        problem = _output_problem(Path(str(value)).expanduser().absolute())
        if problem is not None:
            raise click.exceptions.UsageError(f"{_flag(param)} {value}: {problem}", ctx=ctx)


class DpaCommand(typer.core.TyperCommand):
    """A command that refuses repeated options and outputs below a file, right after click parses."""

    def make_parser(self, ctx: Any) -> Any:
        parser = super().make_parser(ctx)
        parse = parser.parse_args

        def parse_checked(args: list[str]) -> Any:
            try:
                opts, rest, order = parse(args=args)
            except click.exceptions.UsageError as exc:
                exc.ctx = exc.ctx or ctx  # `--dtype` without its value: say which command's help to read
                raise
            refuse_repeats(ctx, order)
            return opts, rest, order

        parser.parse_args = parse_checked
        return parser

    def parse_args(self, ctx: Any, args: list[str]) -> list[str]:
        rest = super().parse_args(ctx, args)
        refuse_undecodable(ctx)
        refuse_non_finite(ctx)
        refuse_output_below_file(ctx)
        return rest


class DpaGroup(typer.core.TyperGroup):
    """The root (and each sub-app): usage errors anywhere below it become one-line errors."""

    def make_context(self, *args: Any, **kwargs: Any) -> Any:
        with usage_errors():
            return super().make_context(*args, **kwargs)

    def invoke(self, ctx: Any) -> Any:
        with usage_errors():
            return super().invoke(ctx)
