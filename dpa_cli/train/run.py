"""`dpa train --stage N` as one library call: recipe -> model + data -> Trainer -> stage result -> dpa.yaml."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import torch
from transformers import PrinterCallback

from dpa_cli.checksums import CHECKSUMS, stage_checksums
from dpa_cli.errors import BadInputError, DpaError
from dpa_cli.flops import flops_per_token_estimate, peak_flops
from dpa_cli.jsonio import read_json
from dpa_cli.train.freeze import apply_trainable
from dpa_cli.train.keepalive import KeepaliveCollator, per_process
from dpa_cli.train.metrics import MetricsCallback, QuietReporter, Reporter
from dpa_cli.train.recipe import RECIPES, Recipe, gradient_accumulation
from dpa_cli.train.save import save_stage_result
from dpa_cli.train.stage import (
    TrainRequest, discard_stage_dir, prepare_stage_dir, resolve_recipe, source_model, stage_dir, start_stage_dir,
)  # fmt: skip
from dpa_cli.train.trainer import DPATrainer, LossGuard
from dpa_cli.workspace import read_manifest, write_manifest
from dpa_cli.trust import trust_remote_code


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
    return config


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def training_arguments(recipe: Recipe, request: TrainRequest, folder: Path, notes: list[str]) -> Any:
    from transformers import TrainingArguments

    args = dict(recipe.training_args)
    per_device = int(args.get("per_device_train_batch_size", 8))
    args["per_device_train_batch_size"] = per_device
    if args.get("bf16") and not torch.cuda.is_available():
        args["bf16"] = False
        notes.append("bf16 needs a GPU here: training in fp32")
    # Recipes may use the classic names; transformers v5 calls them activation checkpointing.
    if "gradient_checkpointing" in args:
        args["activation_checkpointing"] = args.pop("gradient_checkpointing")
    if "gradient_checkpointing_kwargs" in args:
        args["activation_checkpointing_kwargs"] = args.pop("gradient_checkpointing_kwargs")
    if args.get("activation_checkpointing"):
        args.setdefault("activation_checkpointing_kwargs", {"use_reentrant": False})
    if not torch.cuda.is_available():
        args.setdefault("dataloader_pin_memory", False)
    if not torch.cuda.is_available():
        # Without this the process group is not set up on CPU and the world looks like one process.
        args.setdefault("use_cpu", True)
        if world_size() > 1:
            args.setdefault("ddp_backend", "gloo")
    args.setdefault("optim", "adamw_torch")
    args.setdefault("report_to", "none")
    accumulation = gradient_accumulation(recipe.global_batch_size, per_device, world_size())
    return TrainingArguments(
        output_dir=str(folder),
        gradient_accumulation_steps=accumulation,
        remove_unused_columns=False,
        deepspeed=deepspeed_config(request.deepspeed, per_device, accumulation),
        include_num_input_tokens_seen="non_padding",
        disable_tqdm=True,
        logging_first_step=True,
        **args,
    )


def load_model(source: Path, bf16: bool):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    import dpa_cli.model  # noqa: F401  (the DPA classes; the folder's remote code is the same)

    dtype = torch.bfloat16 if bf16 else torch.float32
    trust = trust_remote_code(source)  # dpa's own model code only; else dpa's installed classes
    model = AutoModelForImageTextToText.from_pretrained(source, trust_remote_code=trust, dtype=dtype)
    return model, AutoProcessor.from_pretrained(source, trust_remote_code=trust)


def build_data(request: TrainRequest, processor: Any, recipe: Recipe):
    from dpa_cli.data import DPACollator, EncodedDataset, SampleEncoder, open_samples

    source = open_samples(request.data, request.image_root)
    encoder = SampleEncoder(processor, stage=request.stage, max_length=recipe.max_length)
    dataset = EncodedDataset(source, encoder, on_bad_sample=request.on_bad_sample)
    return dataset, DPACollator(processor)


def _lora(recipe: Recipe) -> dict[str, Any] | None:
    if not recipe.uses_lora:
        return None
    return {"r": recipe.lora_r, "alpha": recipe.lora_alpha, "dropout": recipe.lora_dropout, "targets": recipe.lora_targets}


def run_stage(request: TrainRequest, reporter: Reporter | None = None) -> dict[str, Any]:
    """Train one stage and write its result into the workspace; returns the summary stored in dpa.yaml."""
    from dpa_cli.data import dataset_fingerprint, render_supervised

    reporter = reporter or QuietReporter()
    recipe = resolve_recipe(request)
    source = source_model(request)
    resume_from = prepare_stage_dir(request)
    folder = stage_dir(request.workspace, request.stage)
    notes: list[str] = []
    args = training_arguments(recipe, request, folder, notes)
    if args.deepspeed and world_size() > 1:
        # ZeRO-3 partitions weights while from_pretrained builds the model, so DeepSpeed's view of the
        # process group must exist before loading (the trainer would only set it up afterwards).
        import deepspeed

        deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo")
    model, processor = load_model(source, args.bf16)
    dataset, collator = build_data(request, processor, recipe)
    if world_size() > 1:
        collator = KeepaliveCollator(collator, processor)
    model, table = apply_trainable(model, recipe.trainable, _lora(recipe))
    if args.activation_checkpointing:
        model.config.use_cache = False
    shown = render_supervised(processor, dataset[0])  # encodes the first sample: a bad one is refused here
    # Only now, every flag, recipe key and the first sample checked, is the stage folder created (or cleared
    # by --restart; the trainer creates it too): a refusal before this point leaves the workspace as it was.
    created = start_stage_dir(request)
    metrics = MetricsCallback(folder, reporter, peak_flops(), flops_per_token_estimate(model))
    trainer = DPATrainer(
        model=model, args=args, train_dataset=dataset, data_collator=collator,
        callbacks=[LossGuard(), metrics], part_lrs=recipe.learning_rates,
    )  # fmt: skip
    trainer.remove_callback(PrinterCallback)  # metrics go to metrics.jsonl and the reporter, not stdout
    if trainer.is_world_process_zero():
        reporter.before_training({
            "recipe": recipe.as_dict(), "source": str(source), "trainable": table, "notes": notes,
            "sample": shown, "world_size": world_size(),
            "tokens_per_step": recipe.global_batch_size * recipe.max_length,
            "resume_from": str(resume_from) if resume_from else None,
        })  # fmt: skip
    started = time.perf_counter()
    try:
        result = trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
    except DpaError:  # a bad sample met in the first batches: leave no empty run behind
        discard_stage_dir(request, created)
        raise
    seconds = time.perf_counter() - started
    # Text-only batches per process: each ran the perceiver on a stand-in image so no process skipped a collective.
    stand_ins = per_process(collator.stand_ins) if isinstance(collator, KeepaliveCollator) else None
    save_stage_result(trainer, processor, source, folder, lora=recipe.uses_lora)
    summary = {
        "recipe": recipe.as_dict(), "source": str(source), "data": {"path": str(request.data),
        "fingerprint": dataset_fingerprint(request.data)}, "steps": trainer.state.global_step,
        "final_loss": metrics.final_loss, "train_loss": result.training_loss, "seconds": round(seconds, 2),
        "tokens_seen": int(trainer.state.num_input_tokens_seen), "skipped_samples": _skipped(dataset),
        "lora": recipe.uses_lora, "deepspeed": request.deepspeed, "world_size": world_size(), "notes": notes,
    }  # fmt: skip
    if stand_ins is not None:
        summary["text_only_batches"] = stand_ins
    if trainer.is_world_process_zero():
        manifest = read_manifest(request.workspace)
        manifest.setdefault("stages", {})[f"stage{request.stage}"] = summary
        manifest[CHECKSUMS] = stage_checksums(manifest.get(CHECKSUMS), folder, f"stage{request.stage}")
        write_manifest(request.workspace, manifest)
        reporter.after_training(summary)
    return summary


def _skipped(dataset: Any) -> dict[str, Any]:
    skipped = getattr(dataset, "skipped", None)
    if not skipped:
        return {}
    return {"count": sum(skipped.values()) if hasattr(skipped, "values") else len(skipped), "by_kind": dict(skipped)}
