"""Distributed faults (issue 10, part 5), with real torchrun processes, gloo on CPU and real signals.

1. Under ZeRO-3 one process gets only text-only batches for several steps: the keepalive stand-in image keeps
   it in the perceiver's collectives, so the run ends instead of hanging (a subprocess timeout bounds it).
2. A worker killed by SIGKILL mid-run: the launcher exits non-zero naming the rank and suggesting --resume,
   and `--resume` continues from the checkpoint to the stage result.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import yaml
from PIL import Image
from typer.testing import CliRunner

from dpa_cli.cli.app import app

runner = CliRunner()
COLOURS = {"red": (220, 30, 30), "green": (30, 200, 60), "blue": (30, 60, 220), "yellow": (230, 220, 40)}
# One sample per process per step, no accumulation, data in file order: step k gives rank r sample 2k + r.
SMALL = [
    "--set",
    "global_batch_size=2",
    "--set",
    "per_device_train_batch_size=1",
    "--set",
    "logging_steps=1",
    "--set",
    "max_length=512",
    "--set",
    "gradient_checkpointing=false",
    "--set",
    "train_sampling_strategy=sequential",
]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    """captions.json (all with images) and mixed.json: text-only samples at even indices, images at odd ones."""
    root = tmp_path_factory.mktemp("data")
    (root / "images").mkdir()
    captions, mixed = [], []
    for i, (name, rgb) in enumerate(COLOURS.items()):
        Image.new("RGB", (48 + 8 * i, 40), rgb).save(root / "images" / f"{name}.png")
        captions.append(
            {
                "id": f"cap-{name}",
                "image": f"{name}.png",
                "conversations": [
                    {"from": "human", "value": "<image>\nDescribe the image."},
                    {"from": "gpt", "value": f"A {name} picture."},
                ],
            }
        )
        mixed.append(
            {
                "id": f"text-{name}",
                "conversations": [
                    {"from": "human", "value": f"Name a {name} fruit."},
                    {"from": "gpt", "value": "A cherry, perhaps."},
                ],
            }
        )
        mixed.append(
            {
                "id": f"img-{name}",
                "image": f"{name}.png",
                "conversations": [
                    {"from": "human", "value": "<image>\nWhat colour is it?"},
                    {"from": "gpt", "value": f"It is {name}."},
                ],
            }
        )
    (root / "captions.json").write_text(json.dumps(captions * 4))
    (root / "mixed.json").write_text(json.dumps(mixed))
    return root


@pytest.fixture(scope="module")
def workspace(tiny_checkpoint, tmp_path_factory) -> Path:
    """One upgrade shared by both tests: test 1 trains stage 2 from the upgrade, test 2 stage 1."""
    ws = tmp_path_factory.mktemp("dist") / "ws"
    perceiver = f"vit=target,lm={tiny_checkpoint('causal_lm_qwen3')}"
    result = runner.invoke(
        app, ["upgrade", str(tiny_checkpoint("llava_next")), "--perceiver", perceiver, "-o", str(ws)]
    )
    assert result.exit_code == 0, result.stderr
    return ws


def dpa_train(ws: Path, data: Path, stage: int, data_file: str, *extra: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "dpa_cli",
        "train",
        "--stage",
        str(stage),
        "--workspace",
        str(ws),
        "--data",
        str(data / data_file),
        "--image-root",
        str(data / "images"),
        *SMALL,
        "--nproc",
        "2",
        *extra,
    ]


def test_zero3_rank_with_only_text_batches_does_not_hang(workspace, data):
    done = subprocess.run(
        dpa_train(
            workspace,
            data,
            2,
            "mixed.json",
            "--from",
            "model",
            "--deepspeed",
            "zero3",
            "--max-steps",
            "4",
            "--set",
            "save_steps=1000",
        ),
        capture_output=True,
        text=True,
        timeout=600,
        env=ENV,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert (workspace / "stage2" / "model" / "config.json").is_file()
    summary = yaml.safe_load((workspace / "dpa.yaml").read_text())["stages"]["stage2"]
    assert summary["steps"] == 4 and summary["deepspeed"] == "zero3" and summary["world_size"] == 2
    # Observed, not assumed: every batch of rank 0 was text-only (ran the perceiver on the stand-in image),
    # no batch of rank 1 was (at least 4, as the loader may fetch one batch ahead).
    text_only = summary["text_only_batches"]
    assert text_only[0] >= 4 and text_only[1] == 0, text_only


def _worker(launcher: psutil.Process, rank: int) -> psutil.Process:
    for child in launcher.children(recursive=True):
        try:
            if child.environ().get("RANK") == str(rank) and "dpa_cli" in child.cmdline():
                return child
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    raise AssertionError(f"no worker with RANK={rank} under pid {launcher.pid}")


def test_killed_rank_stops_the_launcher_with_a_message_and_resume_continues(workspace, data):
    stage = workspace / "stage1"
    command = dpa_train(workspace, data, 1, "captions.json", "--max-steps", "6", "--set", "save_steps=2")
    launcher = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)
    try:
        deadline = time.monotonic() + 600  # a hang detector: a loaded machine may take minutes
        while not list(stage.glob("checkpoint-*")):
            assert time.monotonic() < deadline and launcher.poll() is None, "no checkpoint appeared"
            time.sleep(0.02)
        victim = _worker(psutil.Process(launcher.pid), rank=1)
        victim.send_signal(signal.SIGKILL)
        _, stderr = launcher.communicate(timeout=300)
    finally:
        if launcher.poll() is None:
            launcher.kill()
    assert launcher.returncode == 1, stderr[-3000:]
    assert not (stage / "model").exists()
    line = next(line for line in stderr.splitlines() if "training process" in line)
    assert f"error: training process rank 1 (pid {victim.pid}) was killed by SIGKILL" in line  # the cause first
    assert "--resume" in stderr and "checkpoint-" in stderr
    assert "Traceback" not in stderr.split("training process")[-1]
    checkpoint = max(int(p.name.split("-")[1]) for p in stage.glob("checkpoint-*"))
    assert 2 <= checkpoint < 6

    resumed = subprocess.run([*command, "--resume"], capture_output=True, text=True, timeout=600, env=ENV)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resuming from {stage / f'checkpoint-{checkpoint}'}" in resumed.stdout.replace("\n", "")
    assert (stage / "model" / "config.json").is_file()
    assert yaml.safe_load((workspace / "dpa.yaml").read_text())["stages"]["stage1"]["steps"] == 6
    logged = [json.loads(line)["step"] for line in (stage / "metrics.jsonl").read_text().splitlines()]
    assert logged[-1] == 6 and checkpoint + 1 in logged  # the resumed run logged the steps after the checkpoint
