"""`dpa export`: the workspace's latest stage as a self-contained Hugging Face folder, verified before it lands."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from dpa_cli.cli.inspect_cmd import human_bytes
from dpa_cli.cli.options import JsonFlag, SizeOption, TrustRemoteCodeFlag
from dpa_cli.cli.render import byte_bar, err, out, print_json
from dpa_cli.defaults import SHARD_SIZE_TEXT
from dpa_cli.export.card import load_line

SPINNERS = {
    "reference": "running the trained model on the probe image",
    "verifying": "verifying: a fresh process reloads the export with plain transformers",
}


def export(
    workspace: Annotated[
        Path | None, typer.Option("--workspace", "-w", help="Workspace \\[default: found like git finds a repo].")
    ] = None,
    output: Annotated[
        Path | None, typer.Option("--output", "-o", help="Folder to write \\[default: WORKSPACE/export].")
    ] = None,
    stage: Annotated[
        int | None,
        typer.Option("--stage", help="Export stage 1 or 2 \\[default: the latest finished].", show_default=False),
    ] = None,
    merge_lora: Annotated[
        bool, typer.Option("--merge-lora", help="Merge a LoRA adapter into the weights (the default).")
    ] = False,
    keep_adapter: Annotated[
        bool, typer.Option("--keep-adapter", help="Ship the LoRA adapter unmerged, in OUT/adapter/.")
    ] = False,
    dtype: Annotated[str, typer.Option(help="Weights dtype: auto (as trained), bf16, fp16 or fp32.")] = "auto",
    verify: Annotated[
        bool, typer.Option("--verify/--no-verify", help="Reload with plain transformers and compare logits.")
    ] = True,
    shard_size: Annotated[int, SizeOption("Largest output shard, e.g. 200MB, 5GB.")] = SHARD_SIZE_TEXT,
    force: Annotated[bool, typer.Option("--force", help="Replace an existing export.")] = False,
    trust_remote_code: TrustRemoteCodeFlag = False,
    json_: JsonFlag = False,
) -> None:
    """Write the latest trained stage as a Hugging Face folder that loads anywhere, with no dpa installed.

    With config.json (auto_map), model code, shards, processor, tokenizers, generation config, model card.

    A LoRA adapter is merged tensor by tensor while the shards stream (or kept with --keep-adapter).

    Verified before it lands: a fresh process loads it with plain transformers and compares logits on a probe.

    A failed check leaves nothing behind; the workspace is never changed.

    Examples:
      dpa export
      dpa export -w ws -o my-model --dtype bf16 --json
      dpa export --keep-adapter --force
    """
    from dpa_cli.export.merge import output_bytes
    from dpa_cli.export.run import ExportRequest, plan_export, run_export
    from dpa_cli.workspace.manifest import find_workspace

    request = ExportRequest(
        workspace=find_workspace(workspace),
        output=output,
        stage=stage,
        merge_lora=merge_lora,
        keep_adapter=keep_adapter,
        dtype=dtype,
        verify=verify,
        shard_size=shard_size,
        force=force,
        allow_code=trust_remote_code,
    )
    plan = plan_export(request)  # every refusal comes before any output
    display = _Display(output_bytes(plan.result.model_dir, plan.dtype), quiet=json_)
    try:
        result = run_export(plan, on_bytes=display.on_bytes, on_phase=display.phase)
    finally:
        display.close()
    print_json(result) if json_ else render(result)


class _Display:
    """One live display at a time on stderr: a spinner while a model runs, a byte bar with ETA while shards stream."""

    def __init__(self, total: int, quiet: bool):
        self.quiet, self.live = quiet, None
        self.bar = byte_bar()
        self.task = self.bar.add_task("writing", total=total)

    def phase(self, name: str) -> None:
        self.close()
        if not self.quiet:
            self.live = self.bar if name == "writing" else err.status(SPINNERS[name], spinner="dots")
            self.live.start()

    def on_bytes(self, count: int) -> None:
        self.bar.advance(self.task, count)

    def close(self) -> None:
        if self.live is not None:
            self.live.stop()
            self.live = None


def render(result: dict[str, Any]) -> None:
    weights = result["weights"]
    lora = {"merged": f"LoRA merged into {weights['merged_modules']} layers", "kept": "LoRA adapter kept"}
    size = f"{weights['tensors']} tensors in {weights['shards']} shard(s), {human_bytes(weights['bytes'])}"
    what = f"{lora.get(result['lora'], 'no LoRA')}; {result['dtype']}; {size}"
    out.print(f"[green]exported[/] {result['stage']} -> {result['path']} ({what})")
    if result["verified"]:
        out.print(
            f"verified: plain transformers reloads it in a fresh process; max |logit difference| on the probe "
            f"{result['max_abs_diff']:.3g} (tolerance {result['tolerance']:.3g})"
        )
    else:
        out.print("[yellow]not verified[/] (--no-verify)")
    out.print(f"load it: {load_line(result['path'], result['lora'] == 'kept')}", markup=False)
