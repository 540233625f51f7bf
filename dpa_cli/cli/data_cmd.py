"""`dpa data check DATA`: the dataset's problems against the workspace's processor, before training."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Column, Table
from rich.text import Text

from dpa_cli.cli.options import JsonFlag
from dpa_cli.cli.render import DpaTyper, err, out, print_json

data_app = DpaTyper(help="Training data: check a dataset against a workspace before training.", no_args_is_help=True)


@data_app.command("check", no_args_is_help=True)
def check(
    data: Annotated[
        str,
        typer.Argument(
            help="LLaVA JSON/JSONL file, or a Hugging Face datasets folder / parquet / arrow file.", show_default=False
        ),
    ],
    image_root: Annotated[
        str | None,
        typer.Option(metavar="DIR", help="Folder the data's image paths are relative to (default: the data's folder)."),
    ] = None,
    workspace: Annotated[
        Path | None,
        typer.Option(
            "--workspace", "-w", help="Workspace whose processor is used (default: found like git finds a repo)."
        ),
    ] = None,
    limit: Annotated[int | None, typer.Option(min=1, help="Check only the first N samples.")] = None,
    fast: Annotated[
        bool, typer.Option("--fast", help="Read image headers only (size, mode) instead of decoding images.")
    ] = False,
    stage: Annotated[
        int, typer.Option(min=1, max=2, help="1: captions (the caption is supervised); 2: instructions.")
    ] = 2,
    max_length: Annotated[
        int | None, typer.Option(min=1, help="Longest sample in target tokens (default: the recipe's max_length).")
    ] = None,
    recipe: Annotated[
        str | None, typer.Option(help="The recipe training will use, for its max_length (default: the stage's).")
    ] = None,
    preview: Annotated[
        bool, typer.Option("--preview", help="Also show what the perceiver reads for each image of the sample shown.")
    ] = False,
    json_: JsonFlag = False,
) -> None:
    """Check a dataset before training: images, markers, turns, supervised tokens, lengths, duplicate ids.

    Prints one sample with what is learned highlighted (with --preview also the perceiver text of each of its
    images, the feature positions highlighted), then the problems by kind with the first sample ids, then token
    statistics. Errors (exit code 2): missing, unreadable, truncated or oversized images, image
    paths leaving --image-root, <image> markers vs. images, markers in assistant turns, empty conversations,
    nothing to supervise, samples over --max-length that training cannot cut, duplicate ids. Warnings (exit 0):
    images converted from CMYK, alpha, grayscale or 16-bit; samples training cuts at max_length.

    Examples:
      dpa data check llava_v1_5_mix665k.json --image-root data/
      dpa data check captions.jsonl --image-root images/ --stage 1 --fast
      dpa data check ./my_hf_dataset --limit 1000 --json
      dpa data check instruct.json --limit 1 --preview
    """
    from dpa_cli.data.check import check_dataset
    from dpa_cli.train.recipe import recipe_max_length
    from dpa_cli.workspace.manifest import find_workspace

    folder = find_workspace(workspace)
    max_length = max_length or recipe_max_length(stage, recipe)  # what training cuts at
    with _progress(quiet=json_) as report:
        result = check_dataset(
            data,
            folder,
            image_root=image_root,
            limit=limit,
            fast=fast,
            max_length=max_length,
            stage=stage,
            progress=report,
        )
    if json_:
        print_json(result)
    else:
        show(result, preview)
    if result["errors"]:
        raise typer.Exit(2)


class _progress:
    """A progress bar on stderr while samples are checked (none with --json)."""

    def __init__(self, quiet: bool):
        self.bar = (
            None
            if quiet
            else Progress(
                TextColumn("checking"),
                BarColumn(),
                MofNCompleteColumn(),
                TimeRemainingColumn(),
                console=err,
                transient=True,
            )
        )
        self.task = None

    def __enter__(self):
        return None if self.bar is None else self.update

    def update(self, done: int, total: int | None) -> None:
        if self.task is None:  # started only once samples flow: a refused file prints nothing before its error
            self.bar.start()
            self.task = self.bar.add_task("check", total=total)
        self.bar.update(self.task, completed=done)

    def __exit__(self, *exc: Any) -> None:
        if self.task is not None:
            self.bar.stop()


PERCEIVER_LEGEND = (("read before the image", "prompt"), ("features", "image"))


def show(result: dict[str, Any], preview: bool = False) -> None:
    from dpa_cli.data.render import render_segments

    sample = result["sample"]
    if sample is not None:
        title = f"sample {sample['id']}: {sample['supervised_tokens']} of {sample['tokens']} tokens learned"
        out.print(render_segments(sample["segments"], title))
        for index, image in enumerate(sample["perceiver"] if preview else []):
            title = f"perceiver input of image {index + 1}: {image['features']} features"
            out.print(render_segments(image["segments"], title, legend=PERCEIVER_LEGEND))
    elif preview:
        out.print("no sample to preview: none was encoded without an error")
    if result["problems"]:
        table = Table(
            Column("kind", no_wrap=True),
            "severity",
            Column("count", justify="right"),
            Column("first samples", overflow="fold"),
            Column("example", overflow="fold", ratio=1),
            title="problems",
            title_justify="left",
        )
        for problem in result["problems"]:
            colour = "red" if problem["severity"] == "error" else "yellow"
            # Ids and messages quote the data (paths like `a[/b].png`): plain Text, never read as markup.
            table.add_row(
                problem["kind"],
                f"[{colour}]{problem['severity']}[/]",
                str(problem["count"]),
                Text(", ".join(problem["examples"])),
                Text(problem["message"]),
            )
        out.print(table)
    out.print(stats_table(result["stats"]))
    rate, per_core = result["samples_per_second"], result["samples_per_cpu_second"]
    shown = (
        result["samples"]
        if result["samples"] == result["total_samples"]
        else (f"{result['samples']} of {result['total_samples']}")
    )
    line = f"checked {shown} samples in {result['seconds']:.2f} s, {result['mode']} mode"
    if rate and per_core:
        line += f": {rate:,.0f} samples/s, {per_core:,.0f} samples per CPU-second (one core)"
    out.print(line)
    if result["errors"]:
        out.print(f"[red]{result['errors']} error(s)[/], {result['warnings']} warning(s)")
    else:
        out.print(f"[green]no errors[/], {result['warnings']} warning(s)")


def stats_table(stats: dict[str, Any]) -> Table:
    table = Table(
        "tokens",
        "total",
        "mean per sample",
        title=f"stage {stats['stage']}, max_length {stats['max_length']}",
        title_justify="left",
    )
    for name in ("prompt", "answer", "image"):
        entry = stats[f"{name}_tokens"]
        table.add_row(name, f"{entry['total']:,}", f"{entry['mean']:,}")
    length = stats.get("length")
    if length:
        table.caption = (
            f"sample length p50 {length['p50']}, p90 {length['p90']}, p99 {length['p99']}, max {length['max']}; "
            f"{stats['images']} images, {stats['text_only_samples']} text-only samples"
        )
    return table
