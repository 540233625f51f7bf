"""Terminal output shared by every command: JSON results, error lines, consoles."""

from __future__ import annotations

import functools
import json
import os
import sys
from collections.abc import Callable
from typing import Any

import typer
from rich.console import Console
from rich.markup import escape

from dpa_cli.errors import DpaError

# Results go to stdout, messages and errors to stderr, so `--json` output stays parseable.
out = Console(highlight=False, soft_wrap=True)
err = Console(stderr=True, highlight=False, soft_wrap=True)


def print_json(payload: Any) -> None:
    """Write one JSON document to stdout (plain, no colour codes)."""
    sys.stdout.write(json.dumps(payload, indent=2, default=str) + "\n")
    sys.stdout.flush()


def report_errors(command: Callable) -> Callable:
    """Turn a `DpaError` raised by the library into a one-line message and its exit code.

    A traceback is shown only with DPA_DEBUG=1; a user mistake never prints one.
    """

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except DpaError as exc:
            if os.environ.get("DPA_DEBUG") == "1":
                raise
            # The message quotes user input (paths, keys): escaped, so `a[/b].png` is text, not a markup error.
            err.print(f"[bold red]error:[/] {escape(exc.message)}", markup=True, highlight=False)
            if exc.hint:
                err.print(f"  {exc.hint}", markup=False)
            raise typer.Exit(exc.exit_code) from None
        except OSError as exc:  # a full disk, a permission: the system's words, one line, nothing half-written
            if os.environ.get("DPA_DEBUG") == "1":
                raise
            where = f" ({exc.filename})" if exc.filename else ""
            err.print(f"[bold red]error:[/] {exc.strerror or exc}{where}", markup=True, highlight=False)
            raise typer.Exit(1) from None

    return wrapper


class DpaTyper(typer.Typer):
    """A Typer app whose commands render `DpaError`s as one-line messages with their exit code, and whose
    usage errors, repeated options and outputs below a file are refused the same way (`dpa_cli.cli.usage`)."""

    def __init__(self, *args, **kwargs):
        from dpa_cli.cli.usage import DpaGroup

        kwargs.setdefault("cls", DpaGroup)
        super().__init__(*args, **kwargs)

    def command(self, *args, **kwargs):
        from dpa_cli.cli.usage import DpaCommand

        kwargs.setdefault("cls", DpaCommand)
        register = super().command(*args, **kwargs)
        return lambda fn: register(report_errors(fn))


def byte_bar(disable: bool = False) -> Any:
    """The bar `upgrade` and `export` show while shards stream: bytes written, speed and ETA, on stderr."""
    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn, TransferSpeedColumn

    columns = (TextColumn("writing"), BarColumn(), DownloadColumn(), TransferSpeedColumn(), TimeRemainingColumn())
    return Progress(*columns, console=err, transient=True, disable=disable)
