"""The command line's own refusals, the same for every command and sub-command: one `error:` line, exit 2.

Click (under Typer) parses the arguments before any dpa code runs. Its usage errors (unknown option,
missing argument, bad choice, a value that is not an integer) would print Typer's framed usage box; here
they become `error: MESSAGE` plus `  see dpa COMMAND --help`. Two more rules every command keeps, checked
right after parsing: a single-valued option given twice is refused (click would silently keep the last),
and an output path (`-o`, `--workdir`) below a regular file is refused naming that file.
"""

from __future__ import annotations

import contextlib
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


def refuse_output_below_file(ctx: Any) -> None:
    """`-o a/file/ws`: say that `a/file` is a file, before any work (mkdir would say only 'File exists')."""
    for param in ctx.command.params:
        value = ctx.params.get(param.name)
        if value is None or not _is_option(param) or not set(param.opts) & set(OUTPUT_OPTIONS):
            continue
        for parent in Path(str(value)).expanduser().parents:
            if parent.exists() or parent.is_symlink():
                if not parent.is_dir():
                    what = "a file, not a folder" if parent.is_file() else "not a folder"  # or a dangling link
                    raise click.exceptions.UsageError(f"{_flag(param)} {value}: {parent} is {what}", ctx=ctx)
                break


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
