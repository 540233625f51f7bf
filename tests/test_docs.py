"""Every `dpa ...` command shown in README.md and docs/ parses against the real command line.

Fenced blocks tagged `bash`, `sh`, `console` or untagged are commands; synopsis blocks are tagged `text`.
Inline code spans that start with `dpa ` name a command in prose (`dpa train --stage 1`): for them the
command and every option must exist, but required arguments may be left out.
Parsing is click's own (types, choices, required arguments, unknown options) without running the command;
the commands the demo runs for real are exercised end to end by tests/test_demo.py.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
import typer
from typer._click.exceptions import MissingParameter, NoArgsIsHelpError, UsageError  # typer vendors click

from dpa_cli.cli.app import app

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.S | re.M)
COMMAND_BLOCKS = {"", "bash", "sh", "console", "shell"}
INLINE = re.compile(r"(?<!`)`(dpa [^`]+)`(?!`)")
SYNOPSIS = re.compile(r"\[|\||\.\.\.|<")


def _commands(path: Path) -> list[tuple[str, bool]]:
    """(command, strict) pairs: fenced commands parse strictly, inline mentions leniently."""
    text = path.read_text()
    commands = [(span, False) for span in INLINE.findall(FENCE.sub("", text)) if not SYNOPSIS.search(span)]
    for tag, body in FENCE.findall(text):
        if tag not in COMMAND_BLOCKS:
            continue
        for line in body.replace("\\\n", " ").splitlines():
            line = line.strip().removeprefix("$ ")
            for part in re.split(r"\s*(?:&&|;)\s*", line):  # `pip install ... && dpa demo`
                if part.startswith("dpa "):
                    commands.append((part, True))
    return commands


COMMAND = typer.main.get_command(app)
CASES = [(path.relative_to(ROOT).as_posix(), *case) for path in DOCS for case in _commands(path)]


def parse(command: str, strict: bool = True) -> None:
    """Resolve the (sub)command and parse its arguments the way `dpa` would, without invoking it.

    Not strict: unknown commands, unknown options and bad values are still errors; missing ones are not."""
    words = shlex.split(command, comments=True)[1:]
    try:
        cmd, ctx = COMMAND, COMMAND.make_context("dpa", words)
        while hasattr(cmd, "resolve_command"):  # a group: descend into the named subcommand
            name, cmd, rest = cmd.resolve_command(ctx, ctx._protected_args + ctx.args)
            ctx = cmd.make_context(name, rest, parent=ctx)
    except (MissingParameter, NoArgsIsHelpError):
        if strict:
            raise


def test_the_docs_show_commands_of_every_kind():
    shown = {command.split()[1] for _, command, _ in CASES}
    assert {"demo", "upgrade", "train", "export", "data", "inspect", "generate", "bench"} <= shown


@pytest.mark.parametrize(
    ("doc", "command", "strict"), CASES, ids=[f"{doc}:{command[:60]}" for doc, command, _ in CASES]
)
def test_documented_command_parses(doc, command, strict):
    try:
        parse(command, strict)
    except UsageError as error:
        pytest.fail(f"{doc}: `{command}` does not parse: {error.format_message()}")


def test_a_broken_command_is_caught():
    with pytest.raises(UsageError):
        parse("dpa train --stage 1 --no-such-flag")
    with pytest.raises(UsageError):
        parse("dpa inspect --json")  # MODEL is required (`dpa upgrade` needs no --perceiver for an official DPA)
    with pytest.raises(UsageError):
        parse("dpa train --stage one")
    with pytest.raises(UsageError):
        parse("dpa export --no-such-flag", strict=False)
    with pytest.raises(UsageError):
        parse("dpa no-such-command", strict=False)
