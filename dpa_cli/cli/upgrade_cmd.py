"""`dpa upgrade TARGET --perceiver PERCEIVER`: plan the surgery, show it, and write the workspace."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from dpa_cli.cli.inspect_cmd import human_bytes, human_count
from dpa_cli.cli.options import JsonFlag, SizeOption
from dpa_cli.cli.render import byte_bar, out, print_json
from dpa_cli.defaults import SHARD_SIZE_TEXT, Dtype


def upgrade(
    target: Annotated[
        str,
        typer.Argument(help="The LLaVA-style model to upgrade: folder, cached repo id or alias.", show_default=False),
    ],
    perceiver: Annotated[
        str | None,
        typer.Option(
            "--perceiver",
            "-p",
            help="A small VLM (folder, repo id, alias) or vit=<target|source>,lm=<text model>; "
            "none for an official DPA checkpoint.",
            show_default=False,
        ),
    ] = None,
    output: Annotated[
        Path | None,
        typer.Option("--output", "-o", help="Workspace folder to create (default: ./<target>-dpa-<perceiver>)."),
    ] = None,
    projector: Annotated[
        str, typer.Option(help="phi: mlp2x_relu (the paper's), mlp2x_gelu (LLaVA's) or linear.")
    ] = "mlp2x_relu",
    feature_span: Annotated[
        str | None,
        typer.Option(
            help="Perceiver positions fed to the target: image, or image+markers (N+2). "
            "Default: the encoding's (image; paper: image+markers).",
            show_default=False,
        ),
    ] = None,
    early_fusion: Annotated[
        bool, typer.Option("--early-fusion", help="Also feed the user's turn text to the perceiver, before the image.")
    ] = False,
    encoding: Annotated[
        str | None,
        typer.Option(
            help="Text encoding: dpa (the target's chat template) or paper (the official DPA code's, token for token). "
            "Default: paper for the paper's pair (a paper-skeleton perceiver, a Qwen3 target), else dpa.",
            show_default=False,
        ),
    ] = None,
    dtype: Annotated[str, typer.Option(help="Output dtype: auto (the target's), bf16, fp16 or fp32.")] = "auto",
    seed: Annotated[int, typer.Option(help="Seed of the new projector weights (same seed, same bytes).")] = 0,
    perceiver_layers: Annotated[
        int | None,
        typer.Option(min=0, help="Keep only the perceiver's first N language blocks (0: the ViT-only ablation)."),
    ] = None,
    shard_size: Annotated[int, SizeOption("Largest output shard, e.g. 200MB, 5GB.")] = SHARD_SIZE_TEXT,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Print the plan and write nothing.")] = False,
    force: Annotated[bool, typer.Option("--force", help="Replace an existing workspace.")] = False,
    verify_load: Annotated[
        bool | None,
        typer.Option(
            "--verify-load/--no-verify-load",
            help="Load and run the result (default: when at most 2 GB).",
            show_default=False,
        ),
    ] = None,
    json_: JsonFlag = False,
) -> None:
    """Turn a LLaVA-style checkpoint into a DPA workspace: its ViT is replaced by a small VLM, the perceiver.

    Keeps the target LLM and the perceiver's ViT, projector and language blocks; adds a fresh projector phi.

    Drops the target's ViT and projector and the perceiver's LM head. The plan is printed before any tensor moves.

    Tensors stream one at a time into a temporary sibling, renamed into place when complete and checked.

    Output up to 2 GB is also loaded with transformers and run on an image.

    Examples:
      dpa upgrade llava-next-qwen3-4b --perceiver qwen3-0.6b-vl
      dpa upgrade ./my-llava --perceiver Qwen/Qwen2.5-VL-3B-Instruct -o ws --dry-run
      dpa upgrade ./my-llava --perceiver vit=target,lm=./Qwen3-0.6B --dtype bf16 --json
      dpa upgrade ./Qwen3-4B --perceiver ./paper-perceiver --encoding paper -o ws
      dpa upgrade team6013/DPA-4B-init -o ws        # an official DPA checkpoint, renamed into a workspace
    """
    from dpa_cli.upgrade.fingerprint import InputHashes
    from dpa_cli.upgrade.plan import Options
    from dpa_cli.upgrade.run import check_output, default_workspace, plan_upgrade, run_upgrade
    from dpa_cli.upgrade.summary import plan_summary

    options = Options(projector, feature_span, early_fusion, dtype, seed, shard_size, perceiver_layers, encoding)
    _check_choices(options)
    inputs = None if dry_run else InputHashes()  # hashed while the plan imports and builds its models
    try:
        plan = plan_upgrade(target, perceiver, options, inputs)
        summary = plan_summary(plan)
        workspace = output or default_workspace(target, perceiver)
        if dry_run:
            print_json({"dry_run": True, "workspace": str(workspace), **summary}) if json_ else render_plan(
                summary, workspace
            )
            return
        check_output(workspace, plan.sources, force)  # refuse before printing a plan the user must scroll past
        if not json_:
            render_plan(summary, workspace)
        with _progress(plan.output_bytes, quiet=json_) as on_bytes:
            result = run_upgrade(
                plan, workspace, force=force, verify_load=verify_load, on_bytes=on_bytes, inputs=inputs
            )
    finally:
        if inputs is not None:
            inputs.cancel()  # a refusal or a failure does not wait for the hashing
    if json_:
        print_json(result)
    else:
        render_result(result)


def _check_choices(options: Any) -> None:
    """The flags whose values DPAConfig checks, refused as flags before anything loads."""
    from dpa_cli.errors import BadInputError
    from dpa_cli.model.configuration_dpa import ENCODINGS, FEATURE_SPANS, PROJECTOR_TYPES

    choices = {
        "projector": PROJECTOR_TYPES,
        "feature_span": FEATURE_SPANS,
        "encoding": ENCODINGS,
        "dtype": Dtype.names(),
    }
    for name, allowed in choices.items():
        value = getattr(options, name)
        if value is not None and value not in allowed:
            flag = "--" + name.replace("_", "-")
            raise BadInputError(f"{flag} {value!r} is not one of {', '.join(allowed)}")


class _progress:
    """A byte progress bar with ETA on stderr; yields the callback the surgery reports written bytes to."""

    def __init__(self, total: int, quiet: bool):
        self.total, self.quiet = total, quiet
        self.bar = byte_bar(disable=quiet)

    def __enter__(self):
        self.bar.start()
        task = self.bar.add_task("writing", total=self.total)
        return lambda n: self.bar.advance(task, n)

    def __exit__(self, *exc: object) -> None:
        self.bar.stop()


def render_plan(summary: dict[str, Any], workspace: Path) -> None:
    dims = summary["dimensions"]
    perceiver = summary["perceiver"]
    out.print(f"[bold]upgrade plan[/] -> {workspace}")
    out.print(f"target    {summary['target']['path']} ({summary['target']['family']})")
    what = perceiver.get("spec") if perceiver["kind"] == "composed" else perceiver["path"]
    out.print(f"perceiver {what} ({perceiver['family']}, {perceiver['kind']})")
    out.print(f"phi       {dims['phi']} (perceiver width -> target width)")
    config = summary["config"]
    out.print(
        f"features  {config['feature_span']}; encoding {config['encoding']}"
        f"{'; early fusion' if config['early_fusion'] else ''}"
    )
    table = Table("part", "from", "tensors", "params", title="kept", title_justify="left")
    for name, part in summary["kept"].items():
        table.add_row(name, ", ".join(part["from"]), str(part["tensors"]), human_count(part["params"]))
    out.print(table)
    dropped = Table("part", "tensors", "params", title="dropped", title_justify="left")
    for name, part in summary["dropped"].items():
        dropped.add_row(name, str(part["tensors"]), human_count(part["params"]))
    out.print(dropped)
    for name, new in summary["new"].items():
        shapes = ", ".join("x".join(map(str, s)) for s in new["shapes"].values())
        out.print(
            f"new {name}: {human_count(new['params'])} params ({shapes}), "
            f"init {'/'.join(new['init'])}, seed {new['seed']}"
        )
    out.print(
        f"output: {human_count(summary['total_params'])} params, {summary['dtype']}, "
        f"{human_bytes(summary['output_bytes'])} in {summary['num_shards']} shard(s)"
    )
    for note in summary["notes"]:
        out.print(f"[yellow]note:[/] {note}")


def render_result(result: dict[str, Any]) -> None:
    upgrade = result["upgrade"]
    written = upgrade["written"]
    out.print(
        f"[green]wrote[/] {result['workspace']} in {upgrade['seconds']:.1f} s: {written['keys']} tensors, "
        f"{written['shards']} shard(s), {human_bytes(written['bytes'])}"
    )
    if "loaded" in upgrade:
        out.print("verified: loads with transformers (remote code) and runs a forward on an image")
    plan = result["plan"]
    out.print(
        f"trainable in stage 1: {human_count(plan['trainable_stage1_params'])} params (phi"
        f"{' + phi_p' if 'phi_p' in plan['new'] else ''}); next: dpa train --stage 1 --data captions.json"
    )
