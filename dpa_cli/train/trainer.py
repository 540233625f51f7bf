"""The Hugging Face Trainer, adjusted for DPA: per-part learning rates, atomic checkpoints, loud failures.

Checkpoints are written into a hidden staging folder and renamed to `checkpoint-K` only when complete, so a
killed run never leaves a checkpoint that looks whole but is not. A LoRA run's checkpoint also holds the parts
trained in full beside the adapter, which `--resume` puts back (`train/lora_state.py`).
"""

from __future__ import annotations

import math
import os
import shutil
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from transformers import Trainer, TrainerCallback
from transformers.trainer_utils import rotate_checkpoints

from dpa_cli.checkpoint.atomic import replace_folder
from dpa_cli.data.collate import LengthGroupedSampler
from dpa_cli.data.packing import model_inputs
from dpa_cli.errors import DpaError
from dpa_cli.train.freeze import parameter_groups
from dpa_cli.train.keepalive import KEEPALIVE, PerceiverKeepalive
from dpa_cli.train.lora_state import restore_trained_in_full, save_trained_in_full
from dpa_cli.train.schedule import build_scheduler

STAGING = ".saving"


class TrainingStopped(DpaError):
    """Training cannot go on meaningfully (zero or NaN loss, nothing supervised); the message says why."""


class DPATrainer(Trainer):
    def __init__(
        self, *args: Any, part_lrs: dict[str, float] | None = None, lengths: list[int] | None = None, **kwargs: Any
    ):
        self.part_lrs = part_lrs or {}
        self.lengths = lengths  # every sample's length, for group_by_length (data/lengths.py)
        self._saving = False
        super().__init__(*args, **kwargs)
        self.keepalive = PerceiverKeepalive(self.model)

    def create_optimizer(self, model=None):
        if self.optimizer is None:
            model = model or self.model
            groups = parameter_groups(model, self.args.learning_rate, self.part_lrs, self.args.weight_decay)
            optimizer_cls, optimizer_kwargs = self.get_optimizer_cls_and_kwargs(self.args, model)
            optimizer_kwargs.pop("lr", None)
            self.optimizer = optimizer_cls(groups, lr=self.args.learning_rate, **optimizer_kwargs)
        return self.optimizer

    def _get_train_sampler(self, train_dataset=None):
        """`group_by_length` is dpa's own sampler over lengths read without decoding an image (transformers' would
        encode every sample, images decoded, before step 1). It groups the samples of one optimizer micro-step on
        all processes (`per_device x world_size`): accelerate then hands each process its consecutive share."""
        if self.args.train_sampling_strategy != "group_by_length":
            return super()._get_train_sampler(train_dataset)
        if self.lengths is None:
            raise DpaError("group_by_length needs the samples' lengths (dpa_cli.data.lengths.sample_lengths)")
        seed = self.args.data_seed if self.args.data_seed is not None else self.args.seed
        return LengthGroupedSampler(self.lengths, self.args.train_batch_size * self.args.world_size, seed)

    def create_scheduler(self, num_training_steps: int, optimizer=None):
        """The recipe's schedule with its phase fractions resolved for this run's length (train/schedule.py); the
        DeepSpeed path of the Trainer comes here too."""
        if self.lr_scheduler is None:
            self.lr_scheduler = build_scheduler(self.args, optimizer or self.optimizer, num_training_steps)
            self._created_lr_scheduler = True
        return self.lr_scheduler

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        sample_ids = inputs.pop("sample_ids", None)
        stand_in = inputs.pop(KEEPALIVE, None)
        if stand_in is not None:  # a batch without images: the perceiver runs on the stand-in all the same
            self.keepalive.arm(stand_in)
        labels = inputs.get("labels")
        if labels is not None and not (labels != -100).any():
            ids = f" (samples {', '.join(map(str, sample_ids))})" if sample_ids else ""
            raise TrainingStopped(
                f"step {self.state.global_step + 1}: every label in the batch is masked{ids}, nothing to learn",
                hint="check the data with `dpa data check`; samples need assistant answers within max_length",
            )
        # A packed batch loses its padding mask only now: the Trainer has counted the tokens seen from it.
        inputs = model_inputs(inputs)
        return super().compute_loss(model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch)

    # --- atomic checkpoints -------------------------------------------------------------------------
    def _get_output_dir(self, trial) -> str:
        run_dir = super()._get_output_dir(trial)
        return os.path.join(run_dir, STAGING) if self._saving else run_dir

    def _save_checkpoint(self, model, trial) -> None:
        check_weights_finite(self.model, self.state.global_step)  # a diverged run is never saved as resumable
        run_dir = Path(super()._get_output_dir(trial))
        name = f"checkpoint-{self.state.global_step}"
        self._saving = True
        try:
            super()._save_checkpoint(model, trial)
        finally:
            self._saving = False
        # PEFT saved the adapter only: phi and any perceiver part trained in full go beside it.
        save_trained_in_full(self.model, run_dir / STAGING / name, write=self.args.should_save)
        self.accelerator.wait_for_everyone()  # every rank's optimizer shards are in the staging folder
        if self.args.should_save:
            replace_folder(run_dir / STAGING / name, run_dir / name)
            shutil.rmtree(run_dir / STAGING, ignore_errors=True)
            rotate_checkpoints(
                output_dir=str(run_dir),
                save_total_limit=self.args.save_total_limit,
                best_model_checkpoint=self.state.best_model_checkpoint,
                use_mtime=False,
            )
        self.accelerator.wait_for_everyone()

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        """The Trainer reloads a LoRA checkpoint's adapter only; the parts trained in full come back here."""
        super()._load_from_checkpoint(resume_from_checkpoint, model)
        restore_trained_in_full(model or self.model, Path(resume_from_checkpoint))


DIVERGED = "lower the learning rate (--set learning_rate=...), or train in fp32 (--set bf16=false)"


class LossGuard(TrainerCallback):
    """Stop with an explanation on a NaN/inf loss or gradient norm, a loss of exactly zero (a masking bug, not
    a good model), or trained weights that are no longer finite at the end (a learning rate so large that one
    step overflows them: the logged loss is still finite, so the stage must not be recorded as finished)."""

    def on_log(self, args, state, control, logs=None, **kwargs):
        logs = logs or {}
        for key, said in (("loss", "the loss"), ("grad_norm", "the gradient norm")):
            value = logs.get(key)
            if value is not None and not math.isfinite(value):
                raise TrainingStopped(f"step {state.global_step}: {said} is {value}", hint=DIVERGED)
        if logs.get("loss") == 0.0:
            raise TrainingStopped(
                f"step {state.global_step}: the loss is exactly 0",
                hint="labels are probably wrong (the answer is in the prompt?); inspect with `dpa data check`",
            )

    def on_train_end(self, args, state, control, model=None, **kwargs):
        if model is not None:
            check_weights_finite(model, state.global_step)


def check_weights_finite(model: torch.nn.Module, step: int) -> None:
    """TrainingStopped naming the first trained parameter that holds a NaN or inf. Every process agrees: under
    ZeRO-3 each one holds only its shard (`ds_tensor`), so the verdict is all-reduced before anyone raises."""
    bad = next(
        (
            name
            for name, param in model.named_parameters()
            if param.requires_grad and not torch.isfinite(getattr(param, "ds_tensor", param)).all()
        ),
        None,
    )
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else None
        flag = torch.tensor([bad is not None], dtype=torch.int32, device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        bad = bad or ("a weight on another process" if flag.item() else None)
    if bad is not None:
        said = f"step {step}: the trained weights are no longer finite ({bad} holds NaN or inf)"
        raise TrainingStopped(said, hint=DIVERGED)
