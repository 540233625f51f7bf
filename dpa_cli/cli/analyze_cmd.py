"""`dpa analyze modality-gap MODEL --data DATA`: image vs text tokens in every layer of the target LLM."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Column, Table

from dpa_cli.cli.generate_cmd import DeviceOpt, RunModelArg
from dpa_cli.cli.options import JsonFlag, TrustRemoteCodeFlag
from dpa_cli.cli.render import DpaTyper, err, out, print_json

analyze_app = DpaTyper(
    help="Look inside a model: how image and text tokens relate, layer by layer.", no_args_is_help=True
)


@analyze_app.command("modality-gap", no_args_is_help=True)
def modality_gap(
    model: RunModelArg,
    data: Annotated[
        str,
        typer.Option(
            "--data",
            "-d",
            help="Image-text pairs: LLaVA JSON/JSONL, or a Hugging Face datasets folder.",
            show_default=False,
        ),
    ],
    baseline: Annotated[
        str | None,
        typer.Option(
            "--baseline",
            "-b",
            help="The original model to compare with \\[default: the target recorded in the workspace's dpa.yaml].",
            show_default=False,
        ),
    ] = None,
    image_root: Annotated[
        str | None,
        typer.Option(metavar="DIR", help="Folder the data's image paths are relative to (default: the data's folder)."),
    ] = None,
    output: Annotated[
        Path, typer.Option("--output", "-o", help="Folder for modality_gap.csv and modality_gap.png.")
    ] = Path("modality-gap"),
    limit: Annotated[int, typer.Option(min=1, help="Use the first N samples that hold images.")] = 32,
    device: DeviceOpt = None,
    force: Annotated[bool, typer.Option("--force", help="Replace an earlier CSV and plot in --output.")] = False,
    trust_remote_code: TrustRemoteCodeFlag = False,
    json_: JsonFlag = False,
) -> None:
    """Measure the modality gap in every layer of the target LLM, for MODEL and the original model.

    For each sample, the hidden states at image-token positions and at text positions are compared per layer:
    centroid distance relative to spread, linear CKA of per-sample mean-pooled image vs text vectors, and mean
    cosine similarity (formulas in docs/evaluation.md). Writes a CSV (one row per layer per model) and a plot.

    Examples:
      dpa analyze modality-gap ws --data val.json --image-root images/
      dpa analyze modality-gap ws/export --data val.jsonl --baseline llava-hf/llava-v1.6-mistral-7b-hf -o gap
      dpa analyze modality-gap ws --data val.json --limit 8 --force --json
    """
    from dpa_cli.analyze import check_outputs, write_outputs
    from dpa_cli.analyze import modality_gap as run

    check_outputs(output, force)
    progress = None if json_ else _say_progress
    result = run(
        model,
        data,
        baseline=baseline,
        image_root=image_root,
        limit=limit,
        device=device,
        progress=progress,
        allow_code=trust_remote_code,
    )
    result["files"] = write_outputs(result, output)
    if json_:
        print_json(result)
        return
    for note in result["notes"]:
        err.print(f"[dim]{note}[/]")
    out.print(layer_table(result["rows"]))
    out.print(
        f"{result['samples']} samples in {result['seconds']:.1f} s; wrote {result['files']['csv']} and "
        f"{result['files']['png']}"
    )


def _say_progress(role: str, done: int, total: int) -> None:
    if done == total:
        err.print(f"[dim]{role}: {total} samples read[/]")


def _number(value: Any) -> str:
    return "-" if isinstance(value, float) and math.isnan(value) else f"{value:.3f}"


def layer_table(rows: list[dict[str, Any]]) -> Table:
    """One line per layer, the three measures side by side for each model."""
    roles = list(dict.fromkeys(row["role"] for row in rows))
    columns = [Column("layer", justify="right")]
    columns += [Column(f"{key} {role}", justify="right") for key in ("gap", "CKA", "cosine") for role in roles]
    table = Table(*columns, title="modality gap per layer (gap: lower is closer)", title_justify="left")
    by_layer: dict[int, dict[str, dict[str, Any]]] = {}
    for row in rows:
        by_layer.setdefault(row["layer"], {})[row["role"]] = row
    for layer, per_role in sorted(by_layer.items()):
        cells = [str(layer)]
        for key in ("centroid_gap", "cka", "cosine"):
            cells += [_number(per_role[role][key]) if role in per_role else "" for role in roles]
        table.add_row(*cells)
    return table
