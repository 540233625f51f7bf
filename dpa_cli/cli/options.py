"""Option aliases shared by several commands, so a flag means the same thing everywhere."""

from __future__ import annotations

from typing import Annotated

import typer

JsonFlag = Annotated[
    bool, typer.Option("--json", help="Print the result as one JSON object on stdout, for scripts.")
]
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
