"""Wires the `dpa` commands into one Typer app. Each command lives in its own module."""

from __future__ import annotations

import gc

import typer

from dpa_cli import __version__
from dpa_cli.cli import (
    catalog_cmd,
    chat_cmd,
    data_cmd,
    demo_cmd,
    eval_cmd,
    export_cmd,
    generate_cmd,
    inspect_cmd,
    serve_cmd,
    train_cmd,
    upgrade_cmd,
    verify_cmd,
)
from dpa_cli.cli.analyze_cmd import analyze_app
from dpa_cli.cli.bench_cmd import bench_app
from dpa_cli.cli.render import DpaTyper

app = DpaTyper(
    name="dpa",
    help="Upgrade a LLaVA-style vision-language model in place with Deep Pre-Alignment (DPA).",
    no_args_is_help=True,
    add_completion=True,  # --install-completion / --show-completion (bash, zsh, fish, PowerShell)
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"dpa {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Show the version."),
    # `deepspeed --module dpa_cli train ...` runs `python -m dpa_cli --local_rank=N train ...` on each worker; the
    # launcher also sets LOCAL_RANK in the environment, which is what torch reads, so the value is not needed.
    local_rank: int | None = typer.Option(None, "--local_rank", "--local-rank", hidden=True, help="Set by launchers."),
) -> None:
    """Upgrade a LLaVA-style vision-language model in place with Deep Pre-Alignment (DPA)."""


app.command("inspect", no_args_is_help=True)(inspect_cmd.inspect)
app.command("catalog")(catalog_cmd.catalog)
app.command("upgrade", no_args_is_help=True)(upgrade_cmd.upgrade)
app.command("train", no_args_is_help=True)(train_cmd.train)
app.command("export")(export_cmd.export)
app.command("generate", no_args_is_help=True)(generate_cmd.generate)
app.command("chat", no_args_is_help=True)(chat_cmd.chat)
app.command("eval", no_args_is_help=True)(eval_cmd.eval_)
app.command("verify", no_args_is_help=True)(verify_cmd.verify)
# Unknown options and arguments after EXPORT are vLLM's (`vllm serve` flags), passed through unchanged.
app.command("serve", no_args_is_help=True, context_settings={"allow_extra_args": True, "ignore_unknown_options": True})(
    serve_cmd.serve
)
app.command("demo")(demo_cmd.demo)
app.add_typer(bench_app, name="bench")
app.add_typer(data_cmd.data_app, name="data")
app.add_typer(analyze_app, name="analyze")


def main() -> None:
    try:
        app(prog_name="dpa")
    finally:
        # The command is done: its files written (and fsynced), its output printed. Interpreter shutdown would now
        # walk every object torch and transformers made in cyclic-GC passes, 1 s after a model import on this
        # machine; frozen, they are left to reference counting (atexit handlers still run) and exit takes 0.1 s.
        gc.freeze()
