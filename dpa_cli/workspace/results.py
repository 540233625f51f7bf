"""Where a trained model lives: a workspace's latest finished stage, or any folder `generate` is pointed at.

In a workspace the latest finished stage is `stage2/model` when it exists, else `stage1/model`, else the
upgraded `model/`. A LoRA stage is its base folder (the upgraded weights with the trained phi) plus a PEFT
adapter in `stageN/adapter/`, applied unmerged. An export made with `--keep-adapter` holds its adapter in
`adapter/` beside the weights.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dpa_cli.errors import BadInputError
from dpa_cli.workspace.layout import (
    ADAPTER_CONFIG,
    ADAPTER_DIR,
    MODEL_DIR,
    STAGES,
    has_adapter,
    latest_checkpoint,
    stage_dir,
    stage_model_dir,
    stage_name,
)
from dpa_cli.workspace.manifest import check_model_folder, is_workspace, read_manifest

_STAGE_DIR = re.compile(r"^stage\d+$")


@dataclass(frozen=True)
class StageResult:
    """A loadable model folder and, for LoRA, the adapter applied on top of it."""

    name: str  # "stage2", "stage1", "model" (the untrained upgrade) or "folder" (any other model folder)
    model_dir: Path
    adapter_dir: Path | None = None
    workspace: Path | None = None

    @property
    def inputs(self) -> list[Path]:
        """The folders this result is read from (an output must not overlap them)."""
        return [self.model_dir, *([self.adapter_dir] if self.adapter_dir else [])]


def stage_result(workspace: Path, stage: int | None = None) -> StageResult:
    """Stage `stage` of `workspace`, or the latest finished one (the upgraded model when none has run)."""
    workspace = Path(workspace)
    if stage is not None and stage not in STAGES:
        raise BadInputError(f"--stage {stage}: the DPA recipe has stages 1 and 2")
    manifest = read_manifest(workspace)  # read once: the stages it records, the model every folder must hold
    for number in [stage] if stage is not None else STAGES:
        model_dir = stage_model_dir(workspace, number)
        if (model_dir / "config.json").is_file():
            return _with_adapter(manifest, workspace, stage_name(number), model_dir)
        if stage is None and _started(manifest, workspace, number):
            raise _unfinished(workspace, number)
    if stage is not None:
        raise BadInputError(
            f"stage {stage} has not finished in {workspace} (no stage{stage}/{MODEL_DIR})",
            hint=f"run `dpa train --stage {stage}` first, or leave out --stage for the latest finished stage",
        )
    if not (workspace / MODEL_DIR / "config.json").is_file():
        raise BadInputError(
            f"{workspace / MODEL_DIR} is not a model folder (no config.json)",
            hint="restore it from the upgrade, or upgrade again into a new folder with -o",
        )
    check_model_folder(workspace / MODEL_DIR, manifest)
    return StageResult(MODEL_DIR, workspace / MODEL_DIR, None, workspace)


def _started(manifest: dict[str, Any], workspace: Path, number: int) -> bool:
    """A stage whose folder exists or that dpa.yaml records: the newest model, once (if ever) it finishes."""
    recorded = (manifest.get("stages") or {}).get(stage_name(number))
    return stage_dir(workspace, number).exists() or recorded is not None


def _unfinished(workspace: Path, number: int) -> BadInputError:
    """The latest stage was started but has no result: using the stage before it instead would be silent."""
    checkpoint = latest_checkpoint(stage_dir(workspace, number))
    if checkpoint is not None:
        finish = f"`dpa train --stage {number} --resume` continues it from {checkpoint.name}"
    else:
        finish = f"train it with `dpa train --stage {number} --restart`"
    if number > 1:
        instead = f"pass --stage {number - 1} to use stage {number - 1}"
    else:
        instead = f"remove {stage_dir(workspace, number)} to use the untrained upgrade"
    what = f"stage {number} was started in {workspace} but has not finished (no stage{number}/{MODEL_DIR})"
    return BadInputError(what, hint=f"{finish}, or {instead}")


def _with_adapter(manifest: dict[str, Any], workspace: Path, name: str, model_dir: Path) -> StageResult:
    """A stage with its adapter when it has one; dpa.yaml saying LoRA without the folder is an error."""
    adapter = model_dir.parent / ADAPTER_DIR
    check_model_folder(model_dir, manifest)
    recorded = (manifest.get("stages") or {}).get(name) or {}
    if recorded.get("lora") and not has_adapter(adapter):
        raise BadInputError(
            f"{name} was trained with LoRA but {adapter / ADAPTER_CONFIG} is missing",
            hint=f"restore {adapter}, or train the stage again with --restart",
        )
    return StageResult(name, model_dir, adapter if has_adapter(adapter) else None, workspace)


def find_runnable(spec: str, stage: int | None = None) -> StageResult:
    """MODEL for `generate` / `chat`: a workspace, a stage folder, a stage's model, an export or any model."""
    path = Path(spec).expanduser()
    if is_workspace(path):
        return stage_result(path.resolve(), stage)  # its folders are checked against dpa.yaml
    return _runnable_folder(spec, path, stage)


def _runnable_folder(spec: str, path: Path, stage: int | None) -> StageResult:
    if stage is not None:
        raise BadInputError(f"--stage applies to a workspace, and {spec} is not one (no dpa.yaml)")
    if path.is_dir() and _STAGE_DIR.match(path.resolve().name) and (path / MODEL_DIR).is_dir():
        path = path / MODEL_DIR  # `ws/stage2` means its result
    if path.is_dir() and (path / "config.json").is_file():
        path = path.resolve()
        in_stage = bool(_STAGE_DIR.match(path.parent.name))
        name = path.parent.name if in_stage else "folder"
        for adapter in (path / ADAPTER_DIR, path.parent / ADAPTER_DIR):
            # An export's own adapter, or the adapter beside a stage's model: the model as trained.
            if has_adapter(adapter) and (adapter.parent == path or in_stage):
                return StageResult(name, path, adapter, None)
        return StageResult(name, path)
    if path.is_dir():
        raise BadInputError(f"{spec} is neither a workspace nor a model folder (no dpa.yaml, no config.json)")
    from dpa_cli.hub import resolve_model

    return StageResult("folder", resolve_model(spec).path)
