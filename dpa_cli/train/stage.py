"""Stages chain through the workspace: where a stage starts from, whether it may run, and its recipe."""

from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dpa_cli.describe import check_json_files
from dpa_cli.errors import BadInputError
from dpa_cli.train.recipe import Recipe, load_recipe
from dpa_cli.train.trainer import latest_checkpoint
from dpa_cli.workspace import MODEL_DIR, check_model_folder, read_manifest

PERCEIVER_PARTS = ("vit", "phi_p", "perceiver_lm")


@dataclass
class TrainRequest:
    """What `dpa train` was asked to do, flags as given."""

    stage: int
    data: str
    workspace: Path
    image_root: str | None = None
    recipe: str | None = None
    overrides: list[str] = field(default_factory=list)
    lora: bool | None = None  # --lora / --full; None: the recipe decides
    freeze_perceiver: bool = False
    lora_targets: str | None = None
    deepspeed: str | None = None
    resume: bool = False
    restart: bool = False
    max_steps: int | None = None
    from_model: str | None = None  # --from: "model", "stage1" or a folder
    on_bad_sample: str = "fail"


def stage_dir(workspace: Path, stage: int) -> Path:
    return Path(workspace) / f"stage{stage}"


def source_model(request: TrainRequest) -> Path:
    """Stage 1 starts from the upgraded model, stage 2 from stage 1's result (or --from)."""
    workspace = Path(request.workspace)
    if request.from_model is not None:
        named = {"model": workspace / MODEL_DIR, "stage1": workspace / "stage1" / MODEL_DIR}
        source = named.get(request.from_model, Path(request.from_model).expanduser())
    elif request.stage == 1:
        source = workspace / MODEL_DIR
    else:
        source = workspace / "stage1" / MODEL_DIR
        if not source.is_dir():
            raise BadInputError(
                f"stage 1 has not been run in {workspace}",
                hint="run `dpa train --stage 1 --data CAPTIONS` first, or pass --from model to start from the upgrade",
            )
    if not (source / "config.json").is_file():
        raise BadInputError(f"{source} is not a model folder (no config.json)", hint="check the workspace or --from")
    if request.from_model in (None, "model", "stage1"):  # the workspace's own folders: the model dpa.yaml describes
        check_model_folder(source, read_manifest(workspace))
    else:
        check_json_files(source)  # another folder: at least every JSON file is read before transformers does
    return source


def prepare_stage_dir(request: TrainRequest) -> Path | None:
    """Refuse to overwrite a finished stage; returns the checkpoint to resume from. Nothing is changed here:
    --restart clears the old run only once every check has passed (`start_stage_dir`)."""
    folder = stage_dir(request.workspace, request.stage)
    finished = (folder / MODEL_DIR).is_dir()
    checkpoint = latest_checkpoint(folder) if folder.is_dir() else None
    if request.restart:
        return None
    if request.resume:
        if checkpoint is None:
            raise BadInputError(f"nothing to resume in {folder}: no checkpoint", hint="start it without --resume")
        return checkpoint
    if finished:
        raise BadInputError(
            f"stage {request.stage} has already finished in {request.workspace}",
            hint="pass --restart to train it again from scratch (its result will be replaced)",
        )
    if checkpoint is not None:
        raise BadInputError(
            f"stage {request.stage} has an unfinished run in {folder} (last checkpoint {checkpoint.name})",
            hint="pass --resume to continue it, or --restart to start over",
        )
    return None


def start_stage_dir(request: TrainRequest) -> bool:
    """Create the stage folder (cleared first with --restart); True when this run created it."""
    folder = stage_dir(request.workspace, request.stage)
    if request.restart:
        shutil.rmtree(folder, ignore_errors=True)
    created = not folder.exists()
    folder.mkdir(parents=True, exist_ok=True)
    return created


def discard_stage_dir(request: TrainRequest, created: bool) -> None:
    """After a failed start: remove the stage folder this run created, unless it holds a checkpoint by now."""
    folder = stage_dir(request.workspace, request.stage)
    if created and latest_checkpoint(folder) is None:
        shutil.rmtree(folder, ignore_errors=True)


def _flag_overrides(request: TrainRequest, manifest: dict[str, Any]) -> list[str]:
    """Flags are shorthands for recipe keys; explicit --set values come last and win."""
    flags: list[str] = []
    if request.stage == 1 and manifest.get("plan", {}).get("perceiver", {}).get("kind") == "composed":
        flags.append("trainable.phi_p=full")  # a composed perceiver's phi_p starts untrained
    if request.lora is True:
        flags.append("trainable.llm=lora")
    elif request.lora is False:
        flags.append("trainable.llm=full")
    if request.freeze_perceiver:
        flags += [f"trainable.{part}=frozen" for part in PERCEIVER_PARTS]
    if request.lora_targets:
        flags.append(f"lora_targets={request.lora_targets}")
    if request.max_steps is not None:
        flags.append(f"max_steps={request.max_steps}")
    return flags + list(request.overrides)


def resolve_recipe(request: TrainRequest) -> Recipe:
    """The recipe the run uses: by name or file, else the stage's default, with flags and --set applied."""
    manifest = read_manifest(request.workspace)
    name = request.recipe or ("stage1" if request.stage == 1 else "stage2-lora" if request.lora else "stage2-full")
    recipe = load_recipe(name, _flag_overrides(request, manifest))
    if recipe.stage != request.stage:
        raise BadInputError(f"recipe {recipe.name!r} is for stage {recipe.stage}, not stage {request.stage}")
    return recipe
