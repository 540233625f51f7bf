"""`dpa train --stage N` as one library call: recipe -> model + data -> Trainer -> stage result -> dpa.yaml."""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import PrinterCallback

from dpa_cli import loading
from dpa_cli.checksums import CHECKSUMS, stage_checksums
from dpa_cli.flops import flops_per_token_estimate, peak_flops
from dpa_cli.train.arguments import world_size
from dpa_cli.train.freeze import apply_trainable
from dpa_cli.train.keepalive import KeepaliveCollator, per_process
from dpa_cli.train.lora_state import check_resume
from dpa_cli.train.metrics import MetricsCallback, QuietReporter, Reporter
from dpa_cli.train.plan import StagePlan, plan_stage
from dpa_cli.train.recipe import Recipe
from dpa_cli.train.resume import check_checkpoint_weights, disk_failure
from dpa_cli.train.save import save_stage_result
from dpa_cli.train.stage import TrainRequest, commit_run_folder, discard_run_folder, resume_hint, start_run_folder
from dpa_cli.train.trainer import DPATrainer, LossGuard
from dpa_cli.workspace.layout import CACHE_DIR
from dpa_cli.workspace.manifest import read_manifest, write_manifest


def load_model(source: Path, bf16: bool):
    """The stage's starting model: dpa's own code only, else dpa's installed classes."""
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()  # dpa's own output says what is loading
    return loading.load_model(source, dtype=torch.bfloat16 if bf16 else torch.float32)


def build_data(request: TrainRequest, processor: Any, recipe: Recipe, samples: Any, text_config: Any = None):
    """The encoded dataset and its collator; with `pack`, rows of several samples planned from their lengths
    (`text_config`, the target LLM's, says whether its position ids are M-RoPE ones)."""
    from dpa_cli.data import DPACollator, EncodedDataset, SampleEncoder
    from dpa_cli.data.packing import PackingCollator, pack_dataset, uses_mrope

    encoder = SampleEncoder(processor, stage=request.stage, max_length=recipe.max_length)
    dataset = EncodedDataset(samples, encoder, on_bad_sample=request.on_bad_sample, precheck=False)  # open_data did
    if not recipe.pack:
        return dataset, DPACollator(processor)
    collator = PackingCollator(DPACollator(processor), mrope=uses_mrope(text_config))
    return pack_dataset(dataset, recipe.max_length, cache_dir=request.workspace / CACHE_DIR), collator


@dataclass
class Prepared:
    """A planned run with its model, processor and data loaded and checked, before the workspace is touched."""

    plan: StagePlan
    model: Any
    processor: Any
    dataset: Any
    collator: KeepaliveCollator
    trainable: dict[str, Any]
    shown: Any  # the first sample, rendered with its supervised span
    lengths: list[int] | None  # every sample's length, when the recipe groups by length


def prepare(plan: StagePlan) -> Prepared:
    """The refusals that need the model: LoRA targets, the resumed checkpoint's tensors, the first sample."""
    from dpa_cli.data import render_supervised

    args, run = plan.args, plan.run
    if args.deepspeed and world_size() > 1:
        # ZeRO-3 partitions weights while from_pretrained builds the model, so DeepSpeed's view of the
        # process group must exist before loading (the trainer would only set it up afterwards).
        import deepspeed

        deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo")
    # The data first (processor and config only): a sample refused while planning lengths costs no model load.
    # Packing and length grouping need every sample's length: the first process of each machine computes them
    # (and fills the cache), the others then read the cache instead of tokenizing the whole dataset again.
    processor, text_config = loading.load_processor(plan.source), loading.load_config(plan.source).text_config
    needs_lengths = plan.recipe.pack or args.train_sampling_strategy == "group_by_length"
    with args.main_process_first(desc="sample lengths") if needs_lengths else contextlib.nullcontext():
        dataset, collator = build_data(plan.request, processor, plan.recipe, plan.samples, text_config)
        lengths = grouping_lengths(plan, dataset)
    model = load_model(plan.source, args.bf16)
    # A batch without images still runs the perceiver (on a stand-in, with zero weight): with only perceiver-side
    # parts trainable (stage 1) its loss would otherwise have no gradient, and across processes no rank may skip
    # the perceiver's collectives.
    collator = KeepaliveCollator(collator, processor)
    model, table = apply_trainable(model, plan.recipe.trainable, plan.lora)
    if args.activation_checkpointing:
        model.config.use_cache = False
    if run.resume_from is not None:
        check_resume(model, run.resume_from)  # a LoRA checkpoint must give back the parts trained in full too
        check_checkpoint_weights(run.resume_from, model)
    first = getattr(dataset, "dataset", dataset)[0]  # a packed dataset's rows hold samples of the one inside
    shown = render_supervised(processor, first)  # encodes the first sample: a bad one is refused here
    return Prepared(plan, model, processor, dataset, collator, table, shown, lengths)


def grouping_lengths(plan: StagePlan, dataset: Any) -> list[int] | None:
    """Every sample's length when the recipe groups by length: from image headers and the cached text tokens,
    no image decoded (a data folder that cannot take the cache keeps it under the workspace's `.cache/`)."""
    if plan.args.train_sampling_strategy != "group_by_length":
        return None
    from dpa_cli.data.lengths import sample_lengths

    return sample_lengths(dataset, cache_dir=plan.request.workspace / CACHE_DIR)


def run_stage(request: TrainRequest, reporter: Reporter | None = None) -> dict[str, Any]:
    """Train one stage and write its result into the workspace; returns the summary stored in dpa.yaml."""
    reporter = reporter or QuietReporter()
    prepared = prepare(plan_stage(request))
    # Only now is the run's folder created (a --restart of an existing stage works beside it, and replaces it
    # when finished): every refusal above leaves the workspace as it was.
    run = prepared.plan.run
    created = start_run_folder(run, request.restart)
    try:
        return _train(prepared, reporter)
    except BaseException as error:
        discard_run_folder(run, created)  # a run that saved a checkpoint is kept, for --resume
        hint = f"free some disk space; then {resume_hint(request.workspace, request.stage)}"
        failure = disk_failure(error, hint)
        if failure is not None:
            raise failure from None
        raise


def _train(prepared: Prepared, reporter: Reporter) -> dict[str, Any]:
    """The training itself, the stage result put in place, and dpa.yaml updated to say so."""
    from dpa_cli.data import dataset_fingerprint

    plan, model = prepared.plan, prepared.model
    request, recipe, run = plan.request, plan.recipe, plan.run
    metrics = MetricsCallback(run.folder, reporter, peak_flops(), flops_per_token_estimate(model))
    trainer = DPATrainer(
        model=model,
        args=plan.args,
        train_dataset=prepared.dataset,
        data_collator=prepared.collator,
        callbacks=[LossGuard(), metrics],
        part_lrs=recipe.learning_rates,
        lengths=prepared.lengths,
    )
    trainer.remove_callback(PrinterCallback)  # metrics go to metrics.jsonl and the reporter, not stdout
    resume = str(run.resume_from) if run.resume_from else None
    if trainer.is_world_process_zero():
        reporter.before_training(
            {
                "recipe": recipe.as_dict(),
                "source": str(plan.source),
                "trainable": prepared.trainable,
                "notes": list(plan.notes),
                "sample": prepared.shown,
                "world_size": world_size(),
                "tokens_per_step": recipe.global_batch_size * recipe.max_length,
                "resume_from": resume,
            }
        )
    started = time.perf_counter()
    result = trainer.train(resume_from_checkpoint=resume)
    seconds = time.perf_counter() - started
    # Text-only batches per process: each ran the perceiver on a stand-in image.
    stand_ins = per_process(prepared.collator.stand_ins)
    save_stage_result(trainer, prepared.processor, plan.source, run.folder, lora=recipe.uses_lora, final=run.stage)
    summary = {
        "recipe": recipe.as_dict(),
        "source": str(plan.source),
        "data": {"path": str(request.data), "fingerprint": dataset_fingerprint(request.data)},
        "steps": trainer.state.global_step,
        "final_loss": metrics.final_loss,
        "train_loss": result.training_loss,
        "seconds": round(seconds, 2),
        "tokens_seen": int(trainer.state.num_input_tokens_seen),
        "skipped_samples": _skipped(prepared.dataset),
        "lora": recipe.uses_lora,
        "deepspeed": request.deepspeed,
        "world_size": world_size(),
        "notes": list(plan.notes),
        "text_only_batches": stand_ins,
    }
    if trainer.is_world_process_zero():
        commit_run_folder(run)  # a restart's result takes the old stage's place only now
        manifest = read_manifest(request.workspace)  # again: another stage may have finished meanwhile
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
