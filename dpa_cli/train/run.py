"""`dpa train --stage N` as one library call: recipe -> model + data -> Trainer -> stage result -> dpa.yaml."""

from __future__ import annotations

import contextlib
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import PrinterCallback

from dpa_cli import loading
from dpa_cli.checksums import CHECKSUMS, stage_checksums
from dpa_cli.errors import BadInputError
from dpa_cli.flops import flops_per_token_estimate, peak_flops
from dpa_cli.train.arguments import check_deepspeed_launch, trainer_kwargs, world_size
from dpa_cli.jsonio import read_json
from dpa_cli.train.freeze import apply_trainable
from dpa_cli.train.keepalive import KeepaliveCollator, per_process
from dpa_cli.train.metrics import MetricsCallback, QuietReporter, Reporter
from dpa_cli.train.recipe import RECIPES, Recipe, gradient_accumulation
from dpa_cli.train.lora_state import check_resume
from dpa_cli.train.save import save_stage_result
from dpa_cli.train.resume import check_checkpoint, check_checkpoint_weights, disk_failure
from dpa_cli.train.stage import (
    RunFolder, TrainRequest, commit_run_folder, discard_run_folder, plan_run_folder, resolve_recipe, resume_hint,
    source_model, start_run_folder,
)  # fmt: skip
from dpa_cli.train.trainer import DPATrainer, LossGuard
from dpa_cli.workspace import read_manifest, write_manifest


def bind_deepspeed_logs_to_stderr() -> None:
    """DeepSpeed's logger writes to the stdout it finds when first imported, and on CPU it warns at import:
    import it with stdout pointing at stderr, so `dpa train --json` prints nothing but the JSON on stdout."""
    with contextlib.redirect_stdout(sys.stderr):
        import deepspeed  # noqa: F401


def deepspeed_config(choice: str | None, per_device: int, accumulation: int) -> dict[str, Any] | None:
    """`zero2` / `zero3` name the configs shipped with dpa; anything else is a JSON file.

    The batch sizes are filled in here from the process count torchrun gives, rather than left `auto`:
    on CPU the trainer may size them before the process group exists, which DeepSpeed then rejects.
    """
    if choice is None:
        return None
    path = RECIPES / "deepspeed" / f"{choice}.json" if choice in ("zero2", "zero3") else Path(choice).expanduser()
    if not path.is_file():
        raise BadInputError(f"--deepspeed {choice}: no such file", hint="use zero2, zero3 or a DeepSpeed JSON file")
    config = read_json(path, f"--deepspeed {path}")
    if not isinstance(config, dict):
        raise BadInputError(f"--deepspeed {path}: a DeepSpeed config is a JSON object")
    check_deepspeed_launch(choice)
    return config


def training_arguments(recipe: Recipe, request: TrainRequest, folder: Path, notes: list[str]) -> Any:
    from transformers import TrainingArguments

    args = trainer_kwargs(recipe.training_args, notes)
    per_device = args["per_device_train_batch_size"]
    accumulation = gradient_accumulation(recipe.global_batch_size, per_device, world_size())
    return TrainingArguments(
        output_dir=str(folder),
        gradient_accumulation_steps=accumulation,
        deepspeed=deepspeed_config(request.deepspeed, per_device, accumulation),
        **args,
    )


def load_model(source: Path, bf16: bool):
    """The stage's starting model and processor: dpa's own code only, else dpa's installed classes."""
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()  # dpa's own output says what is loading
    dtype = torch.bfloat16 if bf16 else torch.float32
    return loading.load_model(source, dtype=dtype), loading.load_processor(source)


def open_data(request: TrainRequest) -> Any:
    """The training samples, checked without decoding or tokenizing (structure, every image reference's kind and
    confinement to the image root) before any model is loaded: a bad sample costs no load and prints nothing."""
    from dpa_cli.data import open_samples
    from dpa_cli.data.dataset import precheck

    samples = open_samples(request.data, request.image_root)
    if request.on_bad_sample == "fail":  # `skip` drops such samples instead (none of them is ever read)
        precheck(samples)
    return samples


def build_data(request: TrainRequest, processor: Any, recipe: Recipe, samples: Any):
    from dpa_cli.data import DPACollator, EncodedDataset, SampleEncoder

    encoder = SampleEncoder(processor, stage=request.stage, max_length=recipe.max_length)
    dataset = EncodedDataset(samples, encoder, on_bad_sample=request.on_bad_sample, precheck=False)  # open_data did
    return dataset, DPACollator(processor)


def _lora(recipe: Recipe, seed: int) -> dict[str, Any] | None:
    if not recipe.uses_lora:
        return None
    return {"r": recipe.lora_r, "alpha": recipe.lora_alpha, "dropout": recipe.lora_dropout, "targets": recipe.lora_targets,
            "seed": seed}  # fmt: skip


@dataclass
class Prepared:
    """A run with every input checked and loaded, before anything in the workspace is touched."""

    request: TrainRequest
    recipe: Recipe
    run: RunFolder
    source: Path
    args: Any
    notes: list[str]
    model: Any
    processor: Any
    dataset: Any
    collator: KeepaliveCollator
    trainable: dict[str, Any]
    shown: Any  # the first sample, rendered with its supervised span


def prepare(request: TrainRequest) -> Prepared:
    """Every refusal: flags, recipe, source model, data, checkpoint to resume, the first sample. Writes nothing."""
    from dpa_cli.data import render_supervised

    bind_deepspeed_logs_to_stderr()
    recipe = resolve_recipe(request)
    source = source_model(request)
    run = plan_run_folder(request)
    if run.resume_from is not None:
        check_checkpoint(run.resume_from)
    notes: list[str] = list(recipe.notes)
    args = training_arguments(recipe, request, run.folder, notes)
    samples = open_data(request)
    if args.deepspeed and world_size() > 1:
        # ZeRO-3 partitions weights while from_pretrained builds the model, so DeepSpeed's view of the
        # process group must exist before loading (the trainer would only set it up afterwards).
        import deepspeed

        deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo")
    model, processor = load_model(source, args.bf16)
    dataset, collator = build_data(request, processor, recipe, samples)
    # A batch without images still runs the perceiver (on a stand-in, with zero weight): with only perceiver-side
    # parts trainable (stage 1) its loss would otherwise have no gradient, and across processes no rank may skip
    # the perceiver's collectives.
    collator = KeepaliveCollator(collator, processor)
    model, table = apply_trainable(model, recipe.trainable, _lora(recipe, args.seed))
    if args.activation_checkpointing:
        model.config.use_cache = False
    if run.resume_from is not None:
        check_resume(model, run.resume_from)  # a LoRA checkpoint must give back the parts trained in full too
        check_checkpoint_weights(run.resume_from, model)
    shown = render_supervised(processor, dataset[0])  # encodes the first sample: a bad one is refused here
    return Prepared(request, recipe, run, source, args, notes, model, processor, dataset, collator, table, shown)


def run_stage(request: TrainRequest, reporter: Reporter | None = None) -> dict[str, Any]:
    """Train one stage and write its result into the workspace; returns the summary stored in dpa.yaml."""
    reporter = reporter or QuietReporter()
    prepared = prepare(request)
    # Only now is the run's folder created (a --restart of an existing stage works beside it, and replaces it
    # when finished): every refusal above leaves the workspace as it was.
    created = start_run_folder(prepared.run, request.restart)
    try:
        return _train(prepared, reporter)
    except BaseException as error:
        discard_run_folder(prepared.run, created)  # a run that saved a checkpoint is kept, for --resume
        hint = f"free some disk space; then {resume_hint(request.workspace, request.stage)}"
        failure = disk_failure(error, hint)
        if failure is not None:
            raise failure from None
        raise


def _train(prepared: Prepared, reporter: Reporter) -> dict[str, Any]:
    """The training itself, the stage result put in place, and dpa.yaml updated to say so."""
    from dpa_cli.data import dataset_fingerprint

    request, recipe, run, model = prepared.request, prepared.recipe, prepared.run, prepared.model
    metrics = MetricsCallback(run.folder, reporter, peak_flops(), flops_per_token_estimate(model))
    trainer = DPATrainer(
        model=model, args=prepared.args, train_dataset=prepared.dataset, data_collator=prepared.collator,
        callbacks=[LossGuard(), metrics], part_lrs=recipe.learning_rates,
    )  # fmt: skip
    trainer.remove_callback(PrinterCallback)  # metrics go to metrics.jsonl and the reporter, not stdout
    resume = str(run.resume_from) if run.resume_from else None
    if trainer.is_world_process_zero():
        reporter.before_training({
            "recipe": recipe.as_dict(), "source": str(prepared.source), "trainable": prepared.trainable,
            "notes": prepared.notes, "sample": prepared.shown, "world_size": world_size(),
            "tokens_per_step": recipe.global_batch_size * recipe.max_length, "resume_from": resume,
        })  # fmt: skip
    started = time.perf_counter()
    result = trainer.train(resume_from_checkpoint=resume)
    seconds = time.perf_counter() - started
    # Text-only batches per process: each ran the perceiver on a stand-in image.
    stand_ins = per_process(prepared.collator.stand_ins)
    save_stage_result(trainer, prepared.processor, prepared.source, run.folder, lora=recipe.uses_lora, final=run.stage)
    summary = {
        "recipe": recipe.as_dict(), "source": str(prepared.source), "data": {"path": str(request.data),
        "fingerprint": dataset_fingerprint(request.data)}, "steps": trainer.state.global_step,
        "final_loss": metrics.final_loss, "train_loss": result.training_loss, "seconds": round(seconds, 2),
        "tokens_seen": int(trainer.state.num_input_tokens_seen), "skipped_samples": _skipped(prepared.dataset),
        "lora": recipe.uses_lora, "deepspeed": request.deepspeed, "world_size": world_size(),
        "notes": prepared.notes, "text_only_batches": stand_ins,
    }  # fmt: skip
    if trainer.is_world_process_zero():
        commit_run_folder(run)  # a restart's result takes the old stage's place only now
        manifest = read_manifest(request.workspace)
        manifest.setdefault("stages", {})[run.stage.name] = summary
        manifest[CHECKSUMS] = stage_checksums(manifest.get(CHECKSUMS), run.stage, run.stage.name)
        write_manifest(request.workspace, manifest)
        reporter.after_training(summary)
    return summary


def _skipped(dataset: Any) -> dict[str, Any]:
    skipped = getattr(dataset, "skipped", None)
    if not skipped:
        return {}
    return {"count": sum(skipped.values()) if hasattr(skipped, "values") else len(skipped), "by_kind": dict(skipped)}
