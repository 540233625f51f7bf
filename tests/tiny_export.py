"""One tiny export shared by the serving and evaluation-harness tests (`tiny_export`, registered in conftest.py).

A real `dpa upgrade` (LLaVA-NeXT target, composed perceiver: the target's ViT + a tiny Qwen3) whose stage 1 is
the upgraded model with noise on the target LLM's weights (random tiny LLMs answer every prompt with one
repeated token; noise makes different images and prompts answer differently), exported by `dpa export`.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from dpa_cli.cli.app import app
from tests.trained_workspace import _record


def _perturb(model_dir: Path, scale: float = 0.3) -> None:
    generator = torch.Generator().manual_seed(0)
    for file in sorted(model_dir.glob("*.safetensors")):
        tensors = load_file(file)
        for name in sorted(tensors):
            if "language_model" in name and "norm" not in name and tensors[name].is_floating_point():
                noise = torch.randn(tensors[name].shape, generator=generator) * scale
                tensors[name] = (tensors[name].float() + noise).to(tensors[name].dtype)
        save_file(tensors, file, metadata={"format": "pt"})


@pytest.fixture(scope="session")
def tiny_export(tiny_checkpoint, tmp_path_factory) -> Path:
    """The export folder (never modify it: copy it first)."""
    ws = tmp_path_factory.mktemp("tiny-export") / "ws"
    perceiver = f"vit=target,lm={tiny_checkpoint('causal_lm_qwen3')}"
    runner = CliRunner()
    result = runner.invoke(
        app,
        ["upgrade", str(tiny_checkpoint("llava_next")), "--perceiver", perceiver, "-o", str(ws), "--no-verify-load"],
    )
    assert result.exit_code == 0, result.stderr
    shutil.copytree(ws / "model", ws / "stage1" / "model")
    _perturb(ws / "stage1" / "model")
    _record(ws, "stage1", lora=False)
    result = runner.invoke(app, ["export", "-w", str(ws), "--no-verify"])
    assert result.exit_code == 0, result.stderr
    return ws / "export"
