"""`dpa eval MODEL --data FILE`: batched answers on a local benchmark file, predictions JSONL and a score table."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Column, Table

from dpa_cli.cli.generate_cmd import DeviceOpt, RunModelArg
from dpa_cli.cli.options import JsonFlag, TrustRemoteCodeFlag
from dpa_cli.cli.render import err, out, print_json


def eval_(
    model: RunModelArg,
    data: Annotated[
        str,
        typer.Option(
            "--data",
            "-d",
            help="Items: VQA / multiple-choice JSONL or JSON, MMLU-style CSV, or a datasets folder (save_to_disk).",
            show_default=False,
        ),
    ],
    metric: Annotated[
        str | None,
        typer.Option(
            "--metric",
            "-m",
            help="exact, anls or choice \\[default: choice when the items have options, else exact].",
            show_default=False,
        ),
    ] = None,
    scoring: Annotated[
        str,
        typer.Option(
            "--scoring",
            help="Multiple choice: loglik (each option letter's log-likelihood, as MMLU) "
            "or generate (parse the reply).",
        ),
    ] = "loglik",
    baseline: Annotated[
        str | None,
        typer.Option(
            "--baseline",
            "-b",
            help="Also score this model (e.g. the original LLaVA or LLM) on the same items.",
            show_default=False,
        ),
    ] = None,
    image_root: Annotated[
        str | None,
        typer.Option(metavar="DIR", help="Folder the items' image paths are relative to (default: the data's folder)."),
    ] = None,
    output: Annotated[
        Path | None,
        typer.Option(
            "--output",
            "-o",
            help="Predictions JSONL \\[default: DATA-NAME.predictions.jsonl here].",
            show_default=False,
        ),
    ] = None,
    batch_size: Annotated[int, typer.Option("--batch-size", min=1, help="Prompts per forward pass (left-padded).")] = 8,
    max_new_tokens: Annotated[int, typer.Option("--max-new-tokens", min=1, help="Longest generated answer.")] = 32,
    instruction: Annotated[
        str | None,
        typer.Option(
            "--instruction",
            help="Line after each question \\[default: LLaVA's short-answer / option-letter line]; '' for none.",
            show_default=False,
        ),
    ] = None,
    limit: Annotated[int | None, typer.Option(min=1, help="Score only the first N items.")] = None,
    device: DeviceOpt = None,
    force: Annotated[bool, typer.Option("--force", help="Replace an existing predictions file.")] = False,
    trust_remote_code: TrustRemoteCodeFlag = False,
    json_: JsonFlag = False,
) -> None:
    """Score a model on a local benchmark file: exact match, ANLS, or multiple-choice option letters.

    Prompts go through the model's chat template in left-padded batches; answers are greedy. Items with options
    are scored by option letter. Text-only items (e.g. MMLU CSV) measure language forgetting: compare with
    --baseline, the original VLM or LLM. Writes one JSONL line per item and model; prints the scores.

    Examples:
      dpa eval ws/export --data textvqa_val.jsonl --metric anls --image-root images/
      dpa eval ws --data mmbench_dev.jsonl --metric choice --batch-size 16 -o mmbench.pred.jsonl
      dpa eval ws/export --data mmlu/test/anatomy_test.csv --baseline Qwen/Qwen3-4B --json
    """
    from dpa_cli.evaluation import evaluate

    output = output or Path(f"{Path(data).name.split('.')[0]}.predictions.jsonl")
    result = evaluate(
        str(model),
        data,
        output,
        metric=metric,
        scoring=scoring,
        baseline=baseline,
        image_root=image_root,
        limit=limit,
        batch_size=batch_size,
        max_new_tokens=max_new_tokens,
        instruction=instruction,
        device=device,
        force=force,
        allow_code=trust_remote_code,
        progress=None if json_ else _say_progress,
    )
    if json_:
        print_json(result)
        return
    out.print(score_table(result))
    out.print(f"{result['items']} items in {result['seconds']:.1f} s; predictions in {result['predictions']}")


def _say_progress(role: str, done: int, total: int) -> None:
    if done == total:
        err.print(f"[dim]{role}: {total} items scored[/]")


def score_table(result: dict[str, Any]) -> Table:
    """Score per model (%), overall and per category, with the difference when a baseline ran."""
    models = result["models"]
    how = f"{result['metric']}" + (f", {result['scoring']}" if result["metric"] == "choice" else "")
    columns = [Column("items"), *(Column(m["role"], justify="right") for m in models)]
    if len(models) == 2:
        columns.append(Column("difference", justify="right"))
    table = Table(*columns, title=f"score in % ({how})", title_justify="left")

    def add(name: str, scores: list[float | None]) -> None:
        cells = [f"{s:.2f}" if s is not None else "" for s in scores]
        if len(scores) == 2:
            cells.append(f"{scores[0] - scores[1]:+.2f}" if None not in scores else "")
        table.add_row(name, *cells)

    add(f"all ({result['items']})", [m["score"] for m in models])
    for category in models[0]["categories"]:
        add(category, [m["categories"].get(category) for m in models])
    table.caption = "; ".join(f"{m['role']}: {m['path']}" for m in models)
    return table
