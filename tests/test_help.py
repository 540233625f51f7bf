"""Every command's `--help` works and shows at least one example that parses against the real command line."""

from __future__ import annotations

import re

import pytest
import typer
from typer.testing import CliRunner

from dpa_cli.cli.app import app
from tests.test_docs import parse

ROOT = typer.main.get_command(app)


def _commands(group, path=()) -> list[tuple[str, ...]]:
    found = []
    for name, command in sorted(group.commands.items()):
        if getattr(command, "hidden", False):
            continue
        if hasattr(command, "commands"):
            found += _commands(command, (*path, name))
        else:
            found.append((*path, name))
    return found


COMMANDS = _commands(ROOT)


def test_the_command_tree_is_the_documented_one():
    names = {" ".join(c) for c in COMMANDS}
    assert {
        "inspect",
        "catalog",
        "upgrade",
        "data check",
        "train",
        "export",
        "generate",
        "chat",
        "demo",
        "verify",
        "eval",
        "analyze modality-gap",
        "bench infer",
    } <= names


@pytest.mark.parametrize("path", COMMANDS, ids=lambda p: " ".join(p))
def test_help_shows_an_example_that_parses(path):
    result = CliRunner().invoke(app, [*path, "--help"], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    examples = re.findall(r"^\s*(dpa \S.*?)\s*│?$", result.output.split("Examples:", 1)[-1], re.M)
    examples = [e for e in examples if e.startswith("dpa " + " ".join(path))]
    assert "Examples:" in result.output and examples, f"`dpa {' '.join(path)} --help` shows no example"
    for example in examples:
        parse(example.split(" | ")[0], strict=False)  # `dpa inspect M --json | jq ...`: the dpa part
