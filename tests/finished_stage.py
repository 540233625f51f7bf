"""A workspace whose stage 1 has finished by real training (3 steps, a checkpoint after each), and its data:
the fixtures `stage_data` and `finished` (registered in conftest.py) that the stage and train-plan tests share."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from dpa_cli.cli.app import app
from tests.test_faults import _captions
from tests.test_train import COLOURS

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
    "save_steps=1",
    "--set",
    "learning_rate=1e-2",
]


def _data(root: Path) -> Path:
    """test_faults' captions, plus captions with text-only samples and captions whose second image is cut short."""
    _captions(root, COLOURS)
    captions = json.loads((root / "captions.json").read_text())[: len(COLOURS)]
    text_only = {
        "id": "hello",
        "conversations": [{"from": "human", "value": "Say hello."}, {"from": "gpt", "value": "Hello."}],
    }
    (root / "captions.json").write_text(json.dumps(captions))
    (root / "with_text.json").write_text(json.dumps([text_only, *captions, text_only]))
    (root / "bad_second.json").write_text(json.dumps([captions[0], {**captions[1], "image": "truncated.png"}] * 2))
    (root / "images" / "truncated.png").write_bytes((root / "images" / "red.png").read_bytes()[:60])
    return root


def train_args(ws: Path, data: Path, *extra: str, file: str = "captions.json") -> list[str]:
    return [
        "train",
        "--stage",
        "1",
        "-w",
        str(ws),
        "--data",
        str(data / file),
        "--image-root",
        str(data / "images"),
        *SMALL,
        *extra,
    ]


@pytest.fixture(scope="module")
def stage_data(tmp_path_factory) -> Path:
    return _data(tmp_path_factory.mktemp("stage-data"))


@pytest.fixture(scope="module")
def finished(tiny_checkpoint, stage_data, tmp_path_factory) -> Path:
    """A workspace whose stage 1 finished (3 steps, a checkpoint after each): copy it before changing it."""
    ws = tmp_path_factory.mktemp("finished") / "ws"
    perceiver = f"vit=target,lm={tiny_checkpoint('causal_lm_qwen3')}"
    assert (
        CliRunner()
        .invoke(
            app,
            [
                "upgrade",
                str(tiny_checkpoint("llava_next")),
                "--perceiver",
                perceiver,
                "-o",
                str(ws),
                "--no-verify-load",
            ],
        )
        .exit_code
        == 0
    )
    result = CliRunner().invoke(app, train_args(ws, stage_data, "--max-steps", "3"))
    assert result.exit_code == 0, result.stderr
    return ws


def own(ws: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(ws, tmp_path / "ws", symlinks=True))
