"""Option aliases shared by several commands, so a flag means the same thing everywhere."""

from __future__ import annotations

from typing import Annotated, Any

import typer

JsonFlag = Annotated[bool, typer.Option("--json", help="Print the result as one JSON object on stdout, for scripts.")]
ModelArg = Annotated[
    str,
    typer.Argument(
        help="A local checkpoint folder, a Hugging Face repo id in the local cache, or a catalog alias (dpa catalog).",
        show_default=False,
    ),
]
TrustRemoteCodeFlag = Annotated[
    bool,
    typer.Option(
        "--trust-remote-code",
        help="Run the model folder's own Python code even when it is not dpa's (only for folders you trust).",
    ),
]


def size_value(text: str | int) -> int:
    """A size flag's value (`200MB`, `5GB`, `2GiB`) in bytes. A bad one is a usage error, so the message names
    the flag it was given to (`Invalid value for '--shard-size': bad size 'lots'`)."""
    from dpa_cli.checkpoint.sizes import parse_size
    from dpa_cli.errors import BadInputError

    try:
        return parse_size(text)
    except BadInputError as exc:
        raise typer.BadParameter(f"{exc.message} ({exc.hint})") from None


def SizeOption(help: str) -> Any:  # reads like the typer.Option it returns
    """A `--...-size` option whose value is parsed by `size_value`: the command receives bytes."""
    return typer.Option(help=help, parser=size_value, metavar="SIZE")
