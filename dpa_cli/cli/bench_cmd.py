"""`dpa bench ...`: measurements taken side by side in one run, reported as ratios."""

from __future__ import annotations

import platform
import tempfile
from datetime import date
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from dpa_cli.cli.inspect_cmd import human_bytes
from dpa_cli.cli.options import JsonFlag, SizeOption, TrustRemoteCodeFlag
from dpa_cli.cli.render import DpaTyper, out, print_json

bench_app = DpaTyper(help="Side-by-side measurements, printed as ratios (and as --json).", no_args_is_help=True)
PERFORMANCE_DOC = Path("docs/performance.md")
WriteDocsFlag = Annotated[bool, typer.Option("--write-docs", help=f"Append the result to {PERFORMANCE_DOC}.")]


@bench_app.command("upgrade")
def upgrade(
    size: Annotated[int, SizeOption("Size of the synthetic target checkpoint.")] = "1.7GB",
    input_shard: Annotated[int, SizeOption("Shard size of the synthetic input.")] = "200MB",
    shard_size: Annotated[int, SizeOption("Output shard size of the upgrade.")] = "500MB",
    repeats: Annotated[int, typer.Option(min=1, help="Measurements per side; min and median are reported.")] = 3,
    workdir: Annotated[
        Path | None, typer.Option(help="Where to build the inputs (default: a temporary folder).")
    ] = None,
    write_docs: WriteDocsFlag = False,
    json_: JsonFlag = False,
) -> None:
    """Upgrade time against `cp -r` of the same files, and peak memory against the output shard size.

    Builds a synthetic LLaVA-NeXT target of --size. Each repeat copies it (`cp -r`, and `cp -r` + `sync`).

    Each repeat also upgrades it twice: keeping its dtype, then casting to fp16; each both as work only (a fresh
    process, timed after its imports, its phases probed) and end to end (`dpa upgrade` in a fresh process, timed
    from the outside), next to a fresh process that only imports torch and transformers.

    The upgrade fsyncs its shards, hence the durable baseline; a table shows where the time goes.

    Examples:
      dpa bench upgrade
      dpa bench upgrade --size 400MB --repeats 1 --json
    """
    from dpa_cli.bench.upgrade import bench_upgrade

    with _scratch(workdir) as tmp:
        result = bench_upgrade(Path(tmp), size, input_shard, shard_size, repeats)
    _report_ratios("dpa bench upgrade", result, json_, write_docs)


def _scratch(workdir: Path | None) -> tempfile.TemporaryDirectory:
    """A temporary folder for a bench's inputs, inside --workdir (created when missing) or the system's."""
    if workdir is not None:
        workdir.mkdir(parents=True, exist_ok=True)
    return tempfile.TemporaryDirectory(prefix="dpa-bench-", dir=workdir)


def _report_ratios(command: str, result: dict[str, Any], json_: bool, write_docs: bool) -> None:
    result["machine"] = machine()
    if json_:
        print_json(result)
    else:
        out.print(ratio_table(command, result))
        out.print(breakdown_table(command, result))
    if write_docs:
        append_doc(command, ratio_markdown(result))


def machine() -> dict[str, Any]:
    import os

    import torch

    return {
        "cpu": platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "system": platform.platform(),
    }


RATIO_COLUMNS = {
    "time_over_cp": "work / cp -r",
    "time_over_cp_sync": "work / (cp -r + sync)",
    "end_to_end_over_cp_sync": "end to end / (cp -r + sync)",
    "end_to_end_net_over_cp_sync": "end to end - import torch, transformers / (cp -r + sync)",
    "rss_growth_over_shard": "RSS growth / output shard",
}


def _ratio_rows(result: dict[str, Any]) -> list[tuple[str, ...]]:
    return [
        (mode, *(f"{r[key]['min']:.2f} / {r[key]['median']:.2f}" for key in RATIO_COLUMNS))
        for mode, r in result["ratios"].items()
    ]


def _breakdown_rows(result: dict[str, Any]) -> list[tuple[str, ...]]:
    """One row per phase, one column per mode: median seconds (phases a mode never entered are left out)."""
    modes = list(result["breakdown"])
    labels: list[str] = []
    for mode in modes:  # a phase only some modes enter goes right after the phase it follows there
        previous = None
        for label in result["breakdown"][mode]:
            if label not in labels:
                labels.insert(labels.index(previous) + 1 if previous in labels else len(labels), label)
            previous = label
    return [
        (
            label,
            *(
                f"{result['breakdown'][mode][label]:.2f}" if label in result["breakdown"][mode] else ""
                for mode in modes
            ),
        )
        for label in labels
    ]


def ratio_table(command: str, result: dict[str, Any]) -> Table:
    table = Table(
        "run",
        *RATIO_COLUMNS.values(),
        title=f"{command}: {human_bytes(result['input_bytes'])} input, "
        f"{human_bytes(result['output_shard_size'])} shards, {result['repeats']} repeats (min / median)",
    )
    for row in _ratio_rows(result):
        table.add_row(*row)
    return table


def breakdown_table(command: str, result: dict[str, Any]) -> Table:
    table = Table("phase (median seconds)", *result["breakdown"], title=f"{command}: where the time goes")
    for row in _breakdown_rows(result):
        table.add_row(*row)
    return table


def ratio_markdown(result: dict[str, Any]) -> str:
    from dpa_cli.cli.bench_tables import markdown_table

    return (
        f"Input {human_bytes(result['input_bytes'])}, output shards of {human_bytes(result['output_shard_size'])}, "
        f"{result['repeats']} repeats (min / median).\n\n"
        + markdown_table(("run", *RATIO_COLUMNS.values()), _ratio_rows(result))
        + '\n\nWhere the time goes (median seconds; "(thread)" rows overlap the others):\n\n'
        + markdown_table(("phase", *result["breakdown"]), _breakdown_rows(result))
    )


def append_doc(command: str, body: str) -> None:
    info = machine()
    header = (
        f"\n## `{command}` ({date.today().isoformat()})\n\nMachine: {info['cpu']}, {info['cores']} cores, "
        f"{info['system']}, Python {info['python']}, torch {info['torch']}.\n\n"
    )
    with PERFORMANCE_DOC.open("a", encoding="utf-8") as handle:
        handle.write(header + body + "\n")


@bench_app.command("export")
def export(
    size: Annotated[int, SizeOption("Size of the synthetic target the DPA model is made from.")] = "1.7GB",
    shard_size: Annotated[int, SizeOption("Shard size of the DPA model and of the export.")] = "500MB",
    repeats: Annotated[int, typer.Option(min=1, help="Measurements per side; min and median are reported.")] = 3,
    workdir: Annotated[
        Path | None, typer.Option(help="Where to build the inputs (default: a temporary folder).")
    ] = None,
    write_docs: WriteDocsFlag = False,
    json_: JsonFlag = False,
) -> None:
    """The streamed LoRA merge of `dpa export` against `cp -r` of the same files, and its peak memory.

    Upgrades a synthetic target once, adds a rank-32 LoRA adapter on every linear layer of its LLM.

    Each repeat merges in a fresh process (work only, after the imports; and end to end, timed from the outside)
    and copies the model (`cp -r`, with `sync`); a table shows where the time goes.

    Examples:
      dpa bench export
      dpa bench export --size 400MB --repeats 1 --json
    """
    from dpa_cli.bench.export import bench_export

    with _scratch(workdir) as tmp:
        result = bench_export(Path(tmp), size, shard_size, repeats)
    _report_ratios("dpa bench export", result, json_, write_docs)


@bench_app.command("train")
def train(
    repeats: Annotated[
        int | None,
        typer.Option(
            min=1,
            help="Timed steps per model after two warm-up steps (default 5); "
            "with --pack, timed passes per mode (default 2).",
            show_default=False,
        ),
    ] = None,
    batch: Annotated[
        int | None,
        typer.Option(
            min=1,
            help="Samples per step (default 2, one image each); with --pack, samples per padded step (default 8).",
            show_default=False,
        ),
    ] = None,
    pack: Annotated[
        bool, typer.Option("--pack", help="Packed rows against padded batches on a length-skewed mix.")
    ] = False,
    samples: Annotated[int, typer.Option(min=2, help="With --pack: samples in the mix.")] = 64,
    max_length: Annotated[int, typer.Option(min=16, help="With --pack: tokens per packed row (and the cut).")] = 1024,
    workdir: Annotated[
        Path | None, typer.Option(help="Where to build the models (default: a temporary folder).")
    ] = None,
    write_docs: WriteDocsFlag = False,
    json_: JsonFlag = False,
) -> None:
    """A stage-2 training step of a DPA model against the original LLaVA model it was upgraded from.

    Same target LLM, same images and text; the DPA perceiver is the original ViT plus a small Qwen3.

    Reports the step-time ratio next to the FLOP ratio counted from one real step of each model.

    With --pack: packed rows against padded batches on a synthetic length-skewed LLaVA-style mix, the same
    samples and weights: effective (non-padding) tokens/s of each, their ratio, and the loss per token of each.

    Examples:
      dpa bench train
      dpa bench train --repeats 10 --json
      dpa bench train --pack --json
    """
    if pack:
        return _train_pack(repeats or 2, batch or 8, samples, max_length, workdir, write_docs, json_)
    from dpa_cli.bench.train import bench_train

    with _scratch(workdir) as tmp:
        result = bench_train(Path(tmp), repeats or 5, batch or 2)
    result["machine"] = machine()
    if json_:
        print_json(result)
    else:
        out.print(train_table(result))
    if write_docs:
        append_doc("dpa bench train", train_markdown(result))


def _train_pack(
    repeats: int, batch: int, samples: int, max_length: int, workdir: Path | None, write_docs: bool, json_: bool
) -> None:
    from dpa_cli.bench.pack import bench_pack, build_model
    from dpa_cli.cli.bench_tables import PACK_COLUMNS, markdown_table, pack_rows, pack_title, rich_table

    with _scratch(workdir) as tmp:
        model = build_model(Path(tmp))
        result = bench_pack(model, Path(tmp) / "mix", samples, batch, max_length, repeats)
    result["machine"] = machine()
    if json_:
        print_json(result)
    else:
        out.print(rich_table(PACK_COLUMNS, pack_rows(result), pack_title(result)))
    if write_docs:
        append_doc(
            "dpa bench train --pack", pack_title(result) + ".\n\n" + markdown_table(PACK_COLUMNS, pack_rows(result))
        )


def _train_rows(result: dict[str, Any]) -> list[tuple[str, str, str, str]]:
    models = result["models"]
    rows = [
        (
            name,
            f"{m['flops'] / 1e9:.1f}",
            f"{m['step_s']['min']:.3f} / {m['step_s']['median']:.3f}",
            f"{m['params'] / 1e6:.1f}M",
        )
        for name, m in models.items()
    ]
    ratio, closeness = result["time_ratio"], result["time_over_flop_ratio"]
    rows.append(("dpa / original", f"{result['flop_ratio']:.3f}", f"{ratio['min']:.3f} / {ratio['median']:.3f}", ""))
    rows.append(("(time ratio) / (FLOP ratio)", "", f"{closeness['min']:.3f} / {closeness['median']:.3f}", ""))
    return rows


def train_table(result: dict[str, Any]) -> Table:
    table = Table(
        "model",
        "GFLOPs per step",
        "step seconds (min / median)",
        "params",
        title=f"dpa bench train: stage-2 step, batch {result['batch']}, {result['repeats']} timed steps",
    )
    for row in _train_rows(result):
        table.add_row(*row)
    return table


def train_markdown(result: dict[str, Any]) -> str:
    rows = "\n".join("| " + " | ".join(row) + " |" for row in _train_rows(result))
    return "| model | GFLOPs per step | step seconds (min / median) | params |\n|---|---|---|---|\n" + rows


@bench_app.command("infer")
def infer(
    model: Annotated[
        str | None,
        typer.Argument(
            help="The DPA model: a workspace, a stage folder or an export "
            "\\[default: a synthetic pair built for the run].",
            show_default=False,
        ),
    ] = None,
    baseline: Annotated[
        str | None,
        typer.Option(
            help="The original LLaVA model \\[default: the target recorded in the workspace's dpa.yaml].",
            show_default=False,
        ),
    ] = None,
    device: Annotated[
        str | None, typer.Option(help="cpu or cuda \\[default: cuda when present].", show_default=False)
    ] = None,
    max_new_tokens: Annotated[int, typer.Option(min=2, help="Tokens generated per prompt (exactly this many).")] = 32,
    repeats: Annotated[
        int, typer.Option(min=1, help="Timed passes over the prompt set per model, after a warm-up.")
    ] = 3,
    prompts: Annotated[
        int, typer.Option(min=1, max=3, help="How many of the 3 fixed prompts (one image each) to use.")
    ] = 3,
    sequential: Annotated[
        bool,
        typer.Option("--sequential", help="Hold one model in memory at a time (for pairs that do not fit together)."),
    ] = False,
    synthetic: Annotated[
        str, typer.Option(help="Without MODEL: size of the synthetic pair, quick or default.")
    ] = "default",
    workdir: Annotated[
        Path | None, typer.Option(help="Where to build a synthetic pair (default: a temporary folder).")
    ] = None,
    trust_remote_code: TrustRemoteCodeFlag = False,
    write_docs: WriteDocsFlag = False,
    json_: JsonFlag = False,
) -> None:
    """A DPA model against the original LLaVA model it was upgraded from, answering the same prompts.

    Prefill latency per image, decode and end-to-end tokens/s, peak memory and counted FLOPs per image of both.

    Printed as DPA / original ratios over the repeats, with the analytic FLOP ratio at the paper's 4B and 32B.

    Checks that the perceiver runs once per prompt (at prefill), never per decoded token.

    Examples:
      dpa bench infer ws
      dpa bench infer ws/export --baseline llava-next-qwen3-4b --device cuda --max-new-tokens 256 --json
      dpa bench infer --synthetic quick --repeats 1
    """
    from dpa_cli.bench.infer import bench_infer
    from dpa_cli.bench.pairs import PAIRS, build_pair
    from dpa_cli.cli.bench_tables import (
        INFER_COLUMNS,
        PAPER_COLUMNS,
        infer_markdown,
        infer_rows,
        infer_title,
        paper_rows,
        paper_title,
        rich_table,
    )
    from dpa_cli.errors import BadInputError

    if model is None and synthetic not in PAIRS:
        raise BadInputError(f"--synthetic {synthetic!r} is not one of {', '.join(PAIRS)}")
    with _scratch(workdir) as tmp:
        model = model or str(build_pair(Path(tmp), synthetic))
        result = bench_infer(model, baseline, device, max_new_tokens, repeats, prompts, sequential, trust_remote_code)
    result["machine"] = machine()
    if json_:
        print_json(result)
    else:
        out.print(rich_table(INFER_COLUMNS, infer_rows(result), infer_title(result)))
        out.print(f"perceiver runs per prompt: {result['perceiver_calls_per_prompt']:g}")
        out.print(rich_table(PAPER_COLUMNS, paper_rows(result["paper"]), paper_title(result["paper"])))
    if write_docs:
        append_doc("dpa bench infer", infer_markdown(result))


@bench_app.command("flops")
def flops(
    prompt_tokens: Annotated[int, typer.Option(min=0, help="Text tokens of the prompt around the image.")] = 64,
    new_tokens: Annotated[int, typer.Option(min=1, help="Tokens generated, for the whole-generation ratio.")] = 256,
    json_: JsonFlag = False,
) -> None:
    """Analytic FLOPs per image of the paper's setups (Qwen3-4B and Qwen3-32B targets), from their configs.

    Original: Qwen2.5-VL-3B's ViT + merger + target. DPA: the same ViT + phi_p + Qwen3-0.6B's 28 blocks + phi + target.

    Pure arithmetic: nothing is downloaded or loaded.

    Examples:
      dpa bench flops
      dpa bench flops --prompt-tokens 1024 --new-tokens 512 --json
    """
    from dpa_cli.bench.analytic import paper_table
    from dpa_cli.cli.bench_tables import PAPER_COLUMNS, paper_rows, paper_title, rich_table

    paper = paper_table(prompt_tokens, new_tokens)
    if json_:
        print_json(paper)
    else:
        out.print(rich_table(PAPER_COLUMNS, paper_rows(paper), paper_title(paper)))


@bench_app.command("all")
def all_(
    quick: Annotated[
        bool, typer.Option("--quick", help="Tiny-but-not-trivial inputs: a few minutes on a CPU.")
    ] = False,
    only: Annotated[
        list[str] | None,
        typer.Option(
            help="Run only this bench (repeat for several): upgrade, train, export, infer.", show_default=False
        ),
    ] = None,
    workdir: Annotated[
        Path | None, typer.Option(help="Where to build the inputs (default: a temporary folder).")
    ] = None,
    write_docs: Annotated[bool, typer.Option("--write-docs", help=f"Append the summary to {PERFORMANCE_DOC}.")] = False,
    json_: JsonFlag = False,
) -> None:
    """Every bench (upgrade, train, export, infer) in one run, summarised in one table (and as --json).

    Without --quick each bench runs at its own command's defaults (tens of minutes on a CPU).

    Examples:
      dpa bench all --quick
      dpa bench all --quick --only infer --only train --json
    """
    from dpa_cli.bench.suite import BENCHES, bench_all
    from dpa_cli.cli.bench_tables import ALL_COLUMNS, all_rows, markdown_table, rich_table
    from dpa_cli.cli.render import err
    from dpa_cli.errors import BadInputError

    unknown = sorted(set(only or ()) - set(BENCHES))
    if unknown:
        raise BadInputError(f"--only {unknown[0]}: no such bench", hint=f"choose from {', '.join(BENCHES)}")
    names = tuple(name for name in BENCHES if name in (only or BENCHES))
    with _scratch(workdir) as tmp:
        result = bench_all(Path(tmp), quick, names, say=lambda line: err.print(line))
    result["machine"] = machine()
    title = f"dpa bench all{' --quick' if quick else ''}: seconds " + ", ".join(
        f"{k} {v}" for k, v in result["seconds"].items()
    )
    if json_:
        print_json(result)
    else:
        out.print(rich_table(ALL_COLUMNS, all_rows(result), title))
    if write_docs:
        append_doc(
            f"dpa bench all{' --quick' if quick else ''}",
            title + ".\n\n" + markdown_table(ALL_COLUMNS, all_rows(result)),
        )
