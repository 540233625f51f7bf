"""`dpa train`'s plan: every refusal that needs no weights, made once, before anything is loaded or written.

`plan_stage(request)` reads dpa.yaml once and resolves the recipe (flags and `--set` applied, the recipe gate
passed), the model the stage starts from, the folder the run writes (a `--restart` of an existing stage runs
beside it), the checkpoint `--resume` continues (its files checked), the data (every sample's structure and
image references checked) and the Trainer arguments. `dpa train --dry-run` prints the plan with the
trainable parameters per part, counted on a model built on the meta device (no weight is read).
"""

from __future__ import annotations

import contextlib
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dpa_cli.defaults import OnBadSample
from dpa_cli.errors import BadInputError
from dpa_cli.train.arguments import check_deepspeed_launch, trainer_kwargs, world_size
from dpa_cli.train.freeze import LoraSpec
from dpa_cli.train.recipe import RECIPES, Recipe, gradient_accumulation
from dpa_cli.train.resume import check_checkpoint
from dpa_cli.train.stage import RunFolder, TrainRequest, plan_run_folder, resolve_recipe, source_model
from dpa_cli.workspace.manifest import read_manifest


@dataclass(frozen=True)
class StagePlan:
    """A run of `dpa train`, fully decided: what trains how, from which model, on which data, written where."""

    request: TrainRequest
    recipe: Recipe
    source: Path  # the model folder the stage starts from
    run: RunFolder  # where the run writes, and the checkpoint it resumes from
    samples: Any  # the opened, pre-checked training data
    args: Any  # transformers.TrainingArguments
    notes: tuple[str, ...]
    processes: int  # training processes, on every node

    @property
    def lora(self) -> LoraSpec | None:
        """The adapters of the parts set to `lora` (None without LoRA); A is drawn from the run's seed."""
        recipe = self.recipe
        if not recipe.uses_lora:
            return None
        return LoraSpec(recipe.lora_r, recipe.lora_alpha, recipe.lora_dropout, recipe.lora_targets, self.args.seed)

    def describe(self) -> dict[str, Any]:
        """The plan as `dpa train --dry-run --json` prints it (the trainable table is added by the caller)."""
        return {
            "stage": self.request.stage,
            "workspace": str(self.request.workspace),
            "source": str(self.source),
            "output": str(self.run.stage),
            "builds_in": str(self.run.folder),
            "resume_from": str(self.run.resume_from) if self.run.resume_from else None,
            "data": str(self.request.data),
            "samples": _count(self.samples),
            "recipe": self.recipe.as_dict(),
            "world_size": self.processes,
            "deepspeed": self.request.deepspeed,
            "report_to": list(self.args.report_to or ["none"]),
            "gradient_accumulation_steps": self.args.gradient_accumulation_steps,
            "notes": list(self.notes),
        }


def _count(samples: Any) -> int | None:
    try:
        return len(samples)
    except TypeError:  # a streamed dataset has no length
        return None


def bind_deepspeed_logs_to_stderr() -> None:
    """DeepSpeed's logger writes to the stdout it finds when first imported, and on CPU it warns at import:
    import it with stdout pointing at stderr, so `dpa train --json` prints nothing but the JSON on stdout."""
    with contextlib.redirect_stdout(sys.stderr):
        import deepspeed  # noqa: F401


def deepspeed_config(choice: str | None, launched: bool = False) -> dict[str, Any] | None:
    """`zero2` / `zero3` name the configs shipped with dpa; anything else is a JSON file. `launched`: the run will
    be started by a launcher (a dry run of `--nproc N`), so this process need not have been."""
    from dpa_cli.jsonio import read_json

    if choice is None:
        return None
    path = RECIPES / "deepspeed" / f"{choice}.json" if choice in ("zero2", "zero3") else Path(choice).expanduser()
    if not path.is_file():
        raise BadInputError(f"--deepspeed {choice}: no such file", hint="use zero2, zero3 or a DeepSpeed JSON file")
    config = read_json(path, where=f"--deepspeed {path}")
    if not isinstance(config, dict):
        raise BadInputError(f"--deepspeed {path}: a DeepSpeed config is a JSON object")
    if not launched:
        check_deepspeed_launch(choice)
    return config


def training_arguments(recipe: Recipe, request: TrainRequest, folder: Path, notes: list[str], processes: int) -> Any:
    """The Trainer's arguments: the recipe's, with the accumulation that keeps its global batch on this many
    processes. The batch sizes are filled in here from the process count torchrun gives, rather than left
    `auto`: on CPU the trainer may size them before the process group exists, which DeepSpeed then rejects."""
    from transformers import TrainingArguments

    args = trainer_kwargs(recipe.training_args, notes)
    per_device = args["per_device_train_batch_size"]
    accumulation = gradient_accumulation(recipe.global_batch_size, per_device, processes)
    ds_config = deepspeed_config(request.deepspeed, launched=processes > world_size())
    return TrainingArguments(
        output_dir=str(folder), gradient_accumulation_steps=accumulation, deepspeed=ds_config, **args
    )


def open_data(request: TrainRequest) -> Any:
    """The training samples, checked without decoding or tokenizing (structure, every image reference's kind and
    confinement to the image root) before any model is loaded: a bad sample costs no load and prints nothing."""
    from dpa_cli.data import open_samples
    from dpa_cli.data.dataset import precheck

    samples = open_samples(request.data, request.image_root)
    if request.on_bad_sample == OnBadSample.FAIL:  # `skip` drops such samples instead (none of them is ever read)
        precheck(samples)
    return samples


def plan_stage(request: TrainRequest, processes: int | None = None) -> StagePlan:
    """Every refusal that needs no weights, in the order a user fixes them. Reads dpa.yaml once; writes nothing.
    `processes`: how many will train (default: this run's world size; a dry run of `--nproc N` says N)."""
    bind_deepspeed_logs_to_stderr()
    manifest = read_manifest(request.workspace)
    recipe = resolve_recipe(request, manifest)
    source = source_model(request, manifest)
    run = plan_run_folder(request)
    if run.resume_from is not None:
        check_checkpoint(run.resume_from)
    notes: list[str] = list(recipe.notes)  # e.g. the schedule scaled to the run's length
    processes = processes or world_size()
    args = training_arguments(recipe, request, run.folder, notes, processes)
    samples = open_data(request)
    return StagePlan(request, recipe, source, run, samples, args, tuple(notes), processes)


def preview_trainable(plan: StagePlan) -> tuple[Any, dict[str, dict[str, Any]]]:
    """The model built from its config on the meta device (no weights) with the stage's parts set trainable, and
    the trainable parameters per part."""
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config

    from dpa_cli.checkpoint.naming import meta_model
    from dpa_cli.loading import load_config
    from dpa_cli.train.freeze import apply_trainable

    # Making the Trainer's arguments with a ZeRO-3 config told transformers to partition every model it builds
    # from now on; the preview builds on the meta device in this one process, and trains nothing after.
    unset_hf_deepspeed_config()
    model = meta_model("AutoModelForImageTextToText", load_config(plan.source))
    return apply_trainable(model, plan.recipe.trainable, plan.lora)


def dry_run(request: TrainRequest, processes: int = 1, gpu: Any = None) -> dict[str, Any]:
    """`dpa train --dry-run`: the plan, the trainable parameters per part and whether it fits on `gpu` (a
    `fit.Gpu`; default an A100-80GB), with nothing loaded or written. Refused (exit 2) when it cannot fit."""
    from dpa_cli.train import fit

    plan = plan_stage(request, processes)
    model, trainable = preview_trainable(plan)
    gpu = gpu or fit.Gpu(fit.parse_memory(fit.DEFAULT_MEMORY), fit.DEFAULT_TFLOPS)
    estimate = fit.estimate(plan, model, trainable, gpu)
    fit.refuse_unless_fits(estimate)
    return {**plan.describe(), "trainable": trainable, "fit": estimate}
