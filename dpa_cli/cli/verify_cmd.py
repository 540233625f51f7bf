"""`dpa verify PATH`: re-hash a workspace or an export against the manifest of digests it carries."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from dpa_cli.cli.options import JsonFlag
from dpa_cli.cli.render import err, out, print_json

SHOWN = 20  # files listed per kind before "... and N more"


def verify(
    path: Annotated[
        Path, typer.Argument(help="A workspace (dpa.yaml) or an export (dpa_export.json).", show_default=False)
    ],
    json_: JsonFlag = False,
) -> None:
    """Check that every file dpa wrote is still what it wrote: report each changed, missing or extra file.

    A workspace is checked against the manifest of digests in dpa.yaml (model/ and every stage result, plus an
    export inside it); an export against the one in dpa_export.json. Training checkpoints and logs are not
    covered.

    Exit code 0: all files match. 1: something differs (listed). 2: PATH is not a workspace or export.

    Examples:
      dpa verify my-workspace
      dpa verify my-workspace/export --json
    """
    from dpa_cli.checksums import verify_path

    report = verify_path(path)
    print_json(report.as_dict()) if json_ else render(report.as_dict())
    if not report.clean:
        raise typer.Exit(1)


def render(result: dict[str, Any]) -> None:
    covered = ", ".join(result["parts"])
    if result["clean"]:
        out.print(
            f"[green]verified[/] {result['path']}: {result['checked']} files match their recorded digests ({covered})"
        )
        return
    for kind, colour in (("changed", "red"), ("missing", "red"), ("extra", "yellow")):
        names = result[kind]
        for name in names[:SHOWN]:
            out.print(f"[{colour}]{kind:8}[/] {name}")
        if len(names) > SHOWN:
            out.print(f"[{colour}]{kind:8}[/] ... and {len(names) - SHOWN} more")
    counts = ", ".join(f"{len(result[k])} {k}" for k in ("changed", "missing", "extra") if result[k])
    err.print(
        f"[bold red]error:[/] {result['path']} differs from its manifest: {counts} ({result['checked']} files recorded)"
    )
