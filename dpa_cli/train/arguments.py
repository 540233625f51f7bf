"""What dpa hands `transformers.TrainingArguments`: a recipe's Trainer fields plus the settings dpa fixes.

One function builds them, so the recipe gate's dry construction and the real run see the same arguments.
"""

from __future__ import annotations

import importlib.util
import os
from typing import Any

import torch

from dpa_cli.errors import BadInputError

# Set by dpa on every run (not recipe keys): the data plumbing, token counting, and output that goes to the
# reporter instead of tqdm. A recipe value would clash with them ("got multiple values").
FIXED = {
    "remove_unused_columns": False,
    "include_num_input_tokens_seen": "non_padding",
    "disable_tqdm": True,
    "logging_first_step": True,
}
# Recipes may use the classic names; transformers v5 calls them activation checkpointing.
RENAMED = {
    "gradient_checkpointing": "activation_checkpointing",
    "gradient_checkpointing_kwargs": "activation_checkpointing_kwargs",
}


# What torchrun (or `deepspeed`) sets for each process; DeepSpeed reads its process group from them.
LAUNCHER_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


def check_deepspeed_launch(choice: str) -> None:
    """DeepSpeed finds its process group in a launcher's environment, else through MPI (mpi4py): a plain
    one-process `dpa train --deepspeed` has neither, and would fail only once training starts."""
    if all(name in os.environ for name in LAUNCHER_ENV) or importlib.util.find_spec("mpi4py") is not None:
        return
    raise BadInputError(
        f"--deepspeed {choice} needs a distributed launcher, and this is one process started without one",
        hint="add --nproc 2 (or more), run `torchrun --nproc_per_node 1 -m dpa_cli train ...`, or drop --deepspeed",
    )


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def trainer_kwargs(training_args: dict[str, Any], notes: list[str]) -> dict[str, Any]:
    """The keyword arguments of TrainingArguments, except the run's folder, accumulation and DeepSpeed config."""
    args = dict(training_args)
    args["per_device_train_batch_size"] = int(args.get("per_device_train_batch_size", 8))
    if args.get("bf16") and not torch.cuda.is_available():
        args["bf16"] = False
        notes.append("bf16 needs a GPU here: training in fp32")
    for classic, current in RENAMED.items():
        if classic in args:
            args[current] = args.pop(classic)
    if args.get("activation_checkpointing"):
        args.setdefault("activation_checkpointing_kwargs", {"use_reentrant": False})
    if not torch.cuda.is_available():
        args.setdefault("dataloader_pin_memory", False)
        # Without this the process group is not set up on CPU and the world looks like one process.
        args.setdefault("use_cpu", True)
        if world_size() > 1:
            args.setdefault("ddp_backend", "gloo")
    args.setdefault("optim", "adamw_torch")
    args.setdefault("report_to", default_report_to())
    return {**args, **FIXED}


def default_report_to() -> str:
    """TensorBoard when it is installed (the Trainer writes its events under the run's folder, `runs/`), else
    nothing: a run never needs an account or a server it was not asked to use (wandb, mlflow)."""
    from transformers.integrations import is_tensorboard_available

    return "tensorboard" if is_tensorboard_available() else "none"
