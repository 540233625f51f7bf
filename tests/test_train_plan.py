"""`dpa train --dry-run` (the plan, nothing loaded or written) and the Trainer internals dpa's trainer overrides."""

from __future__ import annotations

import inspect
import json
import shutil
from pathlib import Path

import pytest
from transformers import Trainer
from typer.testing import CliRunner

from dpa_cli.cli.app import app
from dpa_cli.train.trainer import DPATrainer
from tests.fault_kit import tree_hash
from tests.finished_stage import SMALL, own

runner = CliRunner()


@pytest.fixture(scope="module")
def data(stage_data: Path) -> Path:
    """The captions and images of tests.finished_stage (the data `finished` was trained on)."""
    return stage_data


def dry_run(ws: Path, data: Path, *extra: str):
    return runner.invoke(
        app,
        [
            "train",
            "--stage",
            "2",
            "-w",
            str(ws),
            "--data",
            str(data / "captions.json"),
            "--image-root",
            str(data / "images"),
            *SMALL,
            *extra,
            "--dry-run",
            "--json",
        ],
    )


@pytest.mark.parametrize(
    "flags", [(), ("--lora",), ("--lora", "--freeze-perceiver"), ("--set", "trainable.vit=frozen")]
)
def test_the_dry_run_plan_is_what_training_would_do_and_nothing_is_written(finished, data, tmp_path, flags):
    from dpa_cli import loading
    from dpa_cli.train.freeze import apply_trainable
    from dpa_cli.train.plan import plan_stage
    from dpa_cli.train.stage import TrainRequest

    ws = own(finished, tmp_path)
    before = tree_hash(ws)
    result = dry_run(ws, data, "--set", "learning_rate=3e-4", "--set", "global_batch_size=4", *flags)
    assert result.exit_code == 0, result.stderr[-2000:]
    assert tree_hash(ws) == before
    plan = json.loads(result.stdout)
    assert plan["source"] == str(ws / "stage1" / "model") and plan["output"] == str(ws / "stage2")
    assert plan["recipe"]["learning_rate"] == 3e-4 and plan["gradient_accumulation_steps"] == 4
    assert plan["samples"] == 4 and plan["resume_from"] is None
    # The table counted on the meta device equals the one the run computes on the loaded model.
    request = TrainRequest(
        stage=2,
        data=str(data / "captions.json"),
        workspace=ws,
        image_root=str(data / "images"),
        lora=True if "--lora" in flags else None,
        freeze_perceiver="--freeze-perceiver" in flags,
        overrides=[f for f in flags if "=" in f],
    )
    planned = plan_stage(request)
    model = loading.load_model(planned.source)
    assert apply_trainable(model, planned.recipe.trainable, planned.lora)[1] == plan["trainable"]


def test_a_dry_run_names_the_resume_point_and_the_restart_folder(finished, data, tmp_path):
    ws = own(finished, tmp_path)
    argv = [
        "train",
        "--stage",
        "1",
        "-w",
        str(ws),
        "--data",
        str(data / "captions.json"),
        "--image-root",
        str(data / "images"),
        *SMALL,
        "--dry-run",
        "--json",
    ]
    restart = json.loads(runner.invoke(app, [*argv, "--restart"]).stdout)
    assert restart["builds_in"] == str(ws / ".stage1.restart") and restart["output"] == str(ws / "stage1")
    shutil.rmtree(ws / "stage1" / "model")
    resume = json.loads(runner.invoke(app, [*argv, "--resume"]).stdout)
    assert resume["resume_from"] == str(ws / "stage1" / "checkpoint-3")


def test_a_dry_run_refuses_what_the_run_would_refuse(finished, data, tmp_path):
    ws = own(finished, tmp_path)
    result = dry_run(ws, data, "--set", "learning_rate=inf")
    assert result.exit_code == 2 and "learning_rate" in result.stderr and "Traceback" not in result.stderr


def test_a_dry_run_of_nproc_plans_for_that_many_processes(finished, data, tmp_path):
    ws = own(finished, tmp_path)
    result = dry_run(ws, data, "--set", "global_batch_size=8", "--nproc", "2", "--deepspeed", "zero3")
    assert result.exit_code == 0, result.stderr[-2000:]
    plan = json.loads(result.stdout)
    assert plan["world_size"] == 2 and plan["gradient_accumulation_steps"] == 4 and plan["deepspeed"] == "zero3"


# --- the Trainer internals DPATrainer overrides: a transformers upgrade that changes them must fail here ---------
PINNED = {
    "_get_output_dir": ["self", "trial"],  # checkpoints are staged in a hidden folder, renamed when whole
    "_save_checkpoint": ["self", "model", "trial"],
    "_load_from_checkpoint": ["self", "resume_from_checkpoint", "model"],  # LoRA runs restore phi beside the adapter
}


@pytest.mark.parametrize("name", PINNED)
def test_the_trainer_methods_dpa_overrides_still_exist_with_the_same_signature(name):
    assert name in vars(DPATrainer), f"DPATrainer no longer overrides {name}: update PINNED"
    original = getattr(Trainer, name, None)
    assert original is not None, f"transformers' Trainer has no {name} any more: the override is dead code"
    assert list(inspect.signature(original).parameters) == PINNED[name]
    assert list(inspect.signature(getattr(DPATrainer, name)).parameters) == PINNED[name]


def test_the_deepspeed_launcher_rank_argument_is_accepted(finished, data, tmp_path):
    """`deepspeed --module dpa_cli train ...` runs `python -m dpa_cli --local_rank=N train ...` on each worker."""
    ws = own(finished, tmp_path)
    argv = [
        "--local_rank=0",
        "train",
        "--stage",
        "2",
        "-w",
        str(ws),
        "--data",
        str(data / "captions.json"),
        "--image-root",
        str(data / "images"),
        *SMALL,
        "--dry-run",
        "--json",
    ]
    result = runner.invoke(app, argv)
    assert result.exit_code == 0, result.stderr[-2000:]
