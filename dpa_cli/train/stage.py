"""Stages chain through the workspace: where a stage starts from, whether it may run, and its recipe."""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dpa_cli.checkpoint.atomic import replace_folder
from dpa_cli.defaults import OnBadSample
from dpa_cli.describe import check_json_files
from dpa_cli.errors import BadInputError
from dpa_cli.train.recipe import Recipe, default_recipe, load_recipe
from dpa_cli.workspace.layout import MODEL_DIR, latest_checkpoint, restart_dir, stage_dir, stage_model_dir
from dpa_cli.workspace.manifest import check_model_folder

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
    values: dict[str, Any] = field(default_factory=dict)  # recipe values from a config file (typed by YAML)
    lora: bool | None = None  # --lora / --full; None: the recipe decides
    freeze_perceiver: bool = False
    lora_targets: str | None = None
    deepspeed: str | None = None
    resume: bool = False
    restart: bool = False
    max_steps: int | None = None
    from_model: str | None = None  # --from: "model", "stage1" or a folder
    on_bad_sample: str = OnBadSample.FAIL
    pack: bool = False  # --pack: the recipe key `pack` set to true


def source_model(request: TrainRequest, manifest: dict[str, Any]) -> Path:
    """Stage 1 starts from the upgraded model, stage 2 from stage 1's result (or --from); `manifest` is dpa.yaml."""
    workspace = Path(request.workspace)
    if request.from_model is not None:
        named = {"model": workspace / MODEL_DIR, "stage1": stage_model_dir(workspace, 1)}
        source = named.get(request.from_model, Path(request.from_model).expanduser())
    elif request.stage == 1:
        source = workspace / MODEL_DIR
    else:
        source = stage_model_dir(workspace, 1)
        if not source.is_dir():
            raise BadInputError(
                f"stage 1 has not been run in {workspace}",
                hint="run `dpa train --stage 1 --data CAPTIONS` first, or pass --from model to start from the upgrade",
            )
    if not (source / "config.json").is_file():
        raise BadInputError(f"{source} is not a model folder (no config.json)", hint="check the workspace or --from")
    if request.from_model in (None, "model", "stage1"):  # the workspace's own folders: the model dpa.yaml describes
        check_model_folder(source, manifest)
    else:  # any folder: it must hold this workspace's DPA model (another stage of it, a copy, an export)
        hint = (
            "training starts from a DPA model: pass --from model or stage1, or upgrade that folder with `dpa upgrade`"
        )
        check_json_files(source)  # every JSON file read as dpa reads user files, before transformers does
        check_model_folder(source, manifest, hint=hint, what="--from ")
        _check_same_tensors(source, workspace / MODEL_DIR)
    return source


def _check_same_tensors(source: Path, reference: Path) -> None:
    """A --from folder holds this workspace's model only with the same tensors of the same shapes (headers only;
    names compared as transformers loads them, so legacy key spellings and tied copies do not matter)."""
    from dpa_cli.checkpoint import read_checkpoint_index
    from dpa_cli.checkpoint.naming import meta_model, meta_state, rename_to_memory
    from dpa_cli.loading import load_config

    model = meta_model("AutoModelForImageTextToText", load_config(reference))
    wanted = {name: tuple(tensor.shape) for name, tensor in meta_state(model).items()}
    known = set(model.state_dict())
    tensors = read_checkpoint_index(source).tensors
    names = rename_to_memory(model, tensors, source)
    found = {names[key]: tuple(info.shape) for key, info in tensors.items()}
    for name in sorted(wanted.keys() | (found.keys() - known)):
        if found.get(name) != wanted.get(name):
            have = f"{list(found[name])}" if name in found else "nothing"
            want = f"{list(wanted[name])}" if name in wanted else "no such tensor"
            raise BadInputError(
                f"--from {source} holds another model than this workspace's: tensor {name!r} has "
                f"{have} there, {want} here",
                hint="pass --from model or stage1, or a stage result of this workspace",
            )


@dataclass(frozen=True)
class RunFolder:
    """Where this run writes its checkpoints, metrics and result (`folder`), and the stage folder the result
    becomes (`stage`). A `--restart` of an existing stage runs beside it and replaces it only when finished,
    so a refused, crashed or killed restart leaves the old stage (and dpa.yaml) exactly as they were."""

    folder: Path
    stage: Path
    resume_from: Path | None = None

    @property
    def beside(self) -> bool:
        return self.folder != self.stage


def plan_run_folder(request: TrainRequest) -> RunFolder:
    """Refuse to overwrite a finished or interrupted stage, and say where this run goes. Nothing is changed
    here: the folder is created (or a stale restart folder cleared) by `start_run_folder`."""
    folder = stage_dir(request.workspace, request.stage)
    pending = restart_dir(request.workspace, request.stage)
    if request.restart:
        in_use = folder.is_dir() and any(folder.iterdir())
        return RunFolder(pending if in_use else folder, folder)
    if request.resume:
        for place in (pending, folder):  # an interrupted --restart first: it is the newer run
            checkpoint = latest_checkpoint(place)
            if checkpoint is not None:
                return RunFolder(place, folder, checkpoint)
        raise BadInputError(f"nothing to resume in {folder}: no checkpoint", hint="start it without --resume")
    interrupted = latest_checkpoint(pending)
    if (folder / MODEL_DIR).is_dir():
        hint = "pass --restart to train it again from scratch (its result is replaced only when the new run ends)"
        if interrupted is not None:
            hint = f"pass --resume to continue the interrupted --restart run from {interrupted.name}, or --restart"
        raise BadInputError(f"stage {request.stage} has already finished in {request.workspace}", hint=hint)
    checkpoint = latest_checkpoint(folder)
    if checkpoint is not None:
        raise BadInputError(
            f"stage {request.stage} has an unfinished run in {folder} (last checkpoint {checkpoint.name})",
            hint="pass --resume to continue it, or --restart to start over",
        )
    return RunFolder(folder, folder)


def start_run_folder(run: RunFolder, restart: bool) -> bool:
    """Create the run's folder (a stale one cleared first with --restart); True when this run created it.

    Only the main process changes folders: the others write nothing before the trainer's first collective."""
    if int(os.environ.get("RANK", "0")) != 0:
        return False
    if restart and run.folder.exists():  # an empty stage folder, or the side folder of an earlier --restart
        shutil.rmtree(run.folder)
    created = not run.folder.exists()
    run.folder.mkdir(parents=True, exist_ok=True)
    return created


def discard_run_folder(run: RunFolder, created: bool) -> None:
    """After a failed run: remove the folder this run created, unless it holds a checkpoint to resume by now."""
    if int(os.environ.get("RANK", "0")) != 0:
        return
    if (created or run.beside) and latest_checkpoint(run.folder) is None:
        shutil.rmtree(run.folder, ignore_errors=True)


def commit_run_folder(run: RunFolder) -> None:
    """Put a finished run in the stage's place: a restart's folder is exchanged with the old stage in one step."""
    if run.beside and int(os.environ.get("RANK", "0")) == 0:
        replace_folder(run.folder, run.stage)


def resume_hint(workspace: Path, stage: int) -> str:
    """What to do after a run stopped: resume it from its last checkpoint, or run again."""
    folder, pending = stage_dir(workspace, stage), restart_dir(workspace, stage)
    if latest_checkpoint(pending) is not None:
        return (
            f"{folder.name} is untouched; run the same command with --resume instead of --restart to continue "
            f"from {latest_checkpoint(pending).name}"
        )
    if (folder / MODEL_DIR).is_dir():
        return f"{folder.name}'s finished result is untouched: run the command again"
    checkpoint = latest_checkpoint(folder)
    if checkpoint is None:
        return "no checkpoint was saved yet: run the command again (add --restart if the stage folder is in the way)"
    return f"run the same command with --resume to continue from {checkpoint.name}"


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
    if request.pack:
        flags.append("pack=true")
    return flags + list(request.overrides)


def resolve_recipe(request: TrainRequest, manifest: dict[str, Any]) -> Recipe:
    """The recipe the run uses: by name or file, else the stage's default, with flags and --set applied."""
    name = request.recipe or default_recipe(request.stage, request.lora)
    recipe = load_recipe(name, _flag_overrides(request, manifest), values=request.values)
    if recipe.stage != request.stage:
        raise BadInputError(f"recipe {recipe.name!r} is for stage {recipe.stage}, not stage {request.stage}")
    return recipe
