"""`dpa serve EXPORT`: vLLM's OpenAI-compatible server on an export (dpa_cli.serving.launch)."""

from __future__ import annotations

from typing import Annotated

import typer

ExportArg = Annotated[str, typer.Argument(help="The export folder (`dpa export` wrote it).", show_default=False)]
HostOpt = Annotated[str, typer.Option("--host", help="Address to listen on.")]
PortOpt = Annotated[int, typer.Option("--port", min=1, max=65535, help="Port to listen on.")]


def serve(ctx: typer.Context, export: ExportArg, host: HostOpt = "127.0.0.1", port: PortOpt = 8000) -> None:
    """Serve the export with vLLM's OpenAI-compatible API (needs vLLM and a GPU).

    Arguments after the export that dpa does not know go to `vllm serve` unchanged (e.g. --max-model-len 8192).
    Without vLLM, `transformers serve EXPORT --trust-remote-code` serves the same folder (docs/serving.md).

    Examples:
      dpa serve ws/export
      dpa serve ws/export --port 9000 --max-model-len 8192 --gpu-memory-utilization 0.8
    """
    from dpa_cli.serving.launch import serve as run

    raise typer.Exit(run(export, host, port, list(ctx.args)))
