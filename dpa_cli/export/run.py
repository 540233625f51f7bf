"""`dpa export` as one library call: pick the stage, refuse what cannot work, write, verify, rename into place.

Everything is written into a hidden temporary sibling of the output and verified there; only a verified
export is renamed into place, so a failed run leaves the workspace and any previous export as they were.
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

from dpa_cli.checkpoint.atomic import check_replaceable, staged_folder
from dpa_cli.checkpoint.side_files import copy_side_files
from dpa_cli.checksums import CHECKSUMS, tree_checksums
from dpa_cli.defaults import SHARD_SIZE, Dtype, ExportLora
from dpa_cli.errors import BadInputError, CheckpointError
from dpa_cli.export import files
from dpa_cli.export.card import model_card
from dpa_cli.export.merge import export_weights
from dpa_cli.export.verify import check_export, reference_probe
from dpa_cli.loading import load_processor, refuse_carried_code
from dpa_cli.records import is_export
from dpa_cli.workspace.layout import ADAPTER_DIR, EXPORT_DIR, EXPORT_RECORD, MODEL_DIR
from dpa_cli.workspace.manifest import read_manifest
from dpa_cli.workspace.results import StageResult, stage_result


@dataclass(frozen=True)
class ExportRequest:
    """What `dpa export` was asked to do; `merge_lora` / `keep_adapter` False both mean: merge if LoRA."""

    workspace: Path
    output: Path | None = None
    stage: int | None = None
    merge_lora: bool = False
    keep_adapter: bool = False
    dtype: str = "auto"
    verify: bool = True
    shard_size: int = SHARD_SIZE
    force: bool = False
    allow_code: bool = False  # --trust-remote-code: the stage may carry (and the export ship) code not dpa's


def check_request(request: ExportRequest) -> None:
    if request.merge_lora and request.keep_adapter:
        raise BadInputError("--merge-lora and --keep-adapter contradict each other", hint="pass one of them")
    if request.dtype not in Dtype.names():
        raise BadInputError(f"--dtype {request.dtype!r} is not one of {', '.join(Dtype.names())}")


def _overlap(path: Path, folder: Path) -> bool:
    return path == folder or folder in path.parents or path in folder.parents


def _model_folders(result: StageResult) -> list[Path]:
    """What the export reads, and every other model folder of the workspace: none may be written into."""
    workspace = result.workspace
    others = [workspace / MODEL_DIR, *workspace.glob("stage*/model"), *workspace.glob("stage*/adapter")]
    return [*result.inputs, *others]


def check_output(output: Path, result: StageResult, force: bool) -> None:
    """The refusals of DESIGN.md section 5, before anything is written."""
    for source in _model_folders(result):
        if _overlap(output, source.resolve()):
            raise BadInputError(
                f"the export {output} and the model folder {source} overlap",
                hint="write the export somewhere else with -o",
            )
    not_ours = f"--force replaces only an export dpa wrote, and {output} is not one (no {EXPORT_RECORD})"
    check_replaceable(output, force, is_export(output), "an export", not_ours)


@dataclass(frozen=True)
class ExportPlan:
    """The request resolved against the workspace: what is read, what is written, how."""

    request: ExportRequest
    result: StageResult
    output: Path
    dtype: torch.dtype | None
    lora: str  # "merged", "kept" or "none"


def plan_export(request: ExportRequest) -> ExportPlan:
    """Resolve the stage and the output, and refuse bad combinations; nothing is read beyond dpa.yaml and the
    stage's processor files (no weights)."""
    check_request(request)
    workspace = Path(request.workspace).resolve()
    result = stage_result(workspace, request.stage)
    if request.keep_adapter and result.adapter_dir is None:
        raise BadInputError(f"--keep-adapter: {result.name} has no LoRA adapter to keep (it was trained in full)")
    output = (request.output or workspace / EXPORT_DIR).expanduser().resolve()
    check_output(output, result, request.force)
    for folder in result.inputs:  # the export copies the stage's side files: its code would ship and run
        refuse_carried_code(folder, request.allow_code, "an export would ship it to be run as the model's code")
    # The side files are shipped as they are: a tokenizer, processor or chat template that does not load would
    # make an export nothing can run (--no-verify would not notice). Loading them reads no weights.
    load_processor(result.model_dir, request.allow_code)
    lora = (
        ExportLora.NONE
        if result.adapter_dir is None
        else ExportLora.KEPT
        if request.keep_adapter
        else ExportLora.MERGED
    )
    return ExportPlan(request, result, output, Dtype(request.dtype).torch(), lora.value)


def _write(
    plan: ExportPlan, folder: Path, on_bytes: Callable[[int], None] | None, digests: dict[str, str]
) -> dict[str, Any]:
    """Weights (merged unless kept), config, remote code, processor, generation config, adapter."""
    result = plan.result
    merge = result.adapter_dir if plan.lora == ExportLora.MERGED else None
    weights = export_weights(result.model_dir, folder, merge, plan.dtype, plan.request.shard_size, on_bytes, digests)
    copy_side_files(result.model_dir, folder)
    files.write_config(result.model_dir, folder, plan.dtype)
    files.ensure_generation_config(folder, [result.workspace / MODEL_DIR])
    if plan.lora == ExportLora.KEPT:
        if not (result.adapter_dir / files.ADAPTER_WEIGHTS).is_file():
            what = f"{result.adapter_dir}: no {files.ADAPTER_WEIGHTS}"
            raise CheckpointError(what, hint="dpa reads safetensors only")
        files.copy_adapter(result.adapter_dir, folder, plan.output)
    return weights


def run_export(
    plan: ExportPlan, on_bytes: Callable[[int], None] | None = None, on_phase: Callable[[str], None] | None = None
) -> dict[str, Any]:
    """Write the planned export through a temporary sibling; verify it there (unless told not to); rename it.

    `on_phase` hears "reference" (the trained model runs the probe), "writing" and "verifying" as they
    start; `on_bytes` hears of every tensor written.
    """
    started = time.perf_counter()
    manifest = read_manifest(plan.result.workspace)
    phase = on_phase or (lambda name: None)
    check: dict[str, Any] = {"max_abs_diff": None, "tolerance": None, "verified": False}
    with (
        tempfile.TemporaryDirectory(prefix="dpa-verify-") as work,
        staged_folder(plan.output, replace=plan.request.force) as staging,
    ):
        probe = Path(work) / "probe.safetensors"
        if plan.request.verify:
            phase("reference")
            reference_probe(plan.result, probe, plan.request.allow_code)
        phase("writing")
        digests: dict[str, str] = {}
        weights = _write(plan, staging, on_bytes, digests)
        if plan.request.verify:
            phase("verifying")
            adapter = staging / ADAPTER_DIR if plan.lora == ExportLora.KEPT else None
            check = check_export(staging, probe, adapter, plan.request.allow_code)
        dtype = weights.pop("dtype")
        summary = {
            "path": str(plan.output),
            **check,
            "stage": plan.result.name,
            "source": str(plan.result.model_dir),
            "lora": plan.lora,
            "dtype": dtype,
            "weights": weights,
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        }
        # The default folder name says nothing; the workspace's name says which model this is.
        title = plan.output.name if plan.output.name != EXPORT_DIR else plan.result.workspace.name
        (staging / "README.md").write_text(model_card(manifest, summary, plan.output, title), encoding="utf-8")
        # The manifest `dpa verify` checks: every file but the record itself; shards hashed while written.
        files.write_record(staging, {**summary, CHECKSUMS: tree_checksums(staging, known=digests)})
    return {**summary, "seconds": round(time.perf_counter() - started, 2)}
