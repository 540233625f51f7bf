"""Workspaces with stage results fabricated the way `dpa train` writes them, without running training.

`upgraded(tiny_checkpoint, target, folder)` runs the real `dpa upgrade` (composed perceiver: the target's
ViT + a tiny Qwen3); `add_stage1` copies the upgraded model as stage 1's result; `add_lora_stage2` wraps
the model with PEFT on the target LLM's linears, sets every LoRA A and B to random non-zero values (so the
merge matters), perturbs phi, and saves the adapter (naming its base as training does) and the base-with-phi;
`add_full_stage2` perturbs every weight and saves the model. dpa.yaml records the stages as training does.
"""

from __future__ import annotations

import shutil
import warnings
from pathlib import Path

import torch
from typer.testing import CliRunner

import dpa_cli.model  # noqa: F401  registers the DPA classes
from dpa_cli.checkpoint.naming import meta_model
from dpa_cli.checkpoint.side_files import point_adapter_at
from dpa_cli.cli.app import app
from dpa_cli.train.save import write_base_with
from dpa_cli.workspace.manifest import read_manifest, write_manifest

LORA_TARGETS = r"model\.language_model\..*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)$"
PHI = "model.multi_modal_projector."


def upgraded(tiny_checkpoint, target: str, folder: Path) -> Path:
    perceiver = f"vit=target,lm={tiny_checkpoint('causal_lm_qwen3')}"
    args = ["upgrade", str(tiny_checkpoint(target)), "--perceiver", perceiver, "-o", str(folder)]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.stderr
    return folder


def _record(workspace: Path, name: str, **summary) -> None:
    manifest = read_manifest(workspace)
    recipe = {"name": f"{name}-test", "trainable": {"phi": "full", "llm": "lora" if summary.get("lora") else "full"}}
    manifest.setdefault("stages", {})[name] = {
        "recipe": recipe,
        "data": {"path": "data.json", "fingerprint": "0123456789abcdef" * 4},
        "steps": 3,
        "final_loss": 1.25,
        "tokens_seen": 1000,
        **summary,
    }
    write_manifest(workspace, manifest)


def add_stage1(workspace: Path) -> Path:
    shutil.copytree(workspace / "model", workspace / "stage1" / "model")
    _record(workspace, "stage1", lora=False)
    return workspace / "stage1" / "model"


def _load(folder: Path):
    from transformers import AutoModelForImageTextToText

    return AutoModelForImageTextToText.from_pretrained(folder, trust_remote_code=True, dtype=torch.float32)


def random_lora(source: Path, seed: int = 0, **lora: object):
    """The model in `source` wrapped with LoRA on the target LLM's linears, A and B random and non-zero."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(**{"r": 4, "lora_alpha": 8, "target_modules": LORA_TARGETS, **lora})
    with warnings.catch_warnings():  # peft 0.21 asks transformers 5 a question it has renamed
        warnings.filterwarnings("ignore", "`is_gradient_checkpointing` is deprecated", FutureWarning)
        model = get_peft_model(_load(source), config)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.2)
    return model


def add_lora_stage2(workspace: Path, seed: int = 0) -> Path:
    """stage2/adapter (random non-zero A and B) and stage2/model (stage 1's weights with a perturbed phi)."""
    source = workspace / "stage1" / "model"
    model = random_lora(source, seed)
    generator = torch.Generator().manual_seed(seed + 1)
    trained = {}
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.removeprefix("base_model.model.").startswith(PHI):
                param.add_(torch.randn(param.shape, generator=generator) * 0.05)
                trained[name.removeprefix("base_model.model.")] = param.detach().clone()
    model.save_pretrained(workspace / "stage2" / "adapter")
    (workspace / "stage2" / "model").mkdir()
    meta = meta_model("AutoModelForImageTextToText", model.get_base_model().config)
    write_base_with(source, workspace / "stage2" / "model", trained, meta)
    point_adapter_at(workspace / "stage2" / "adapter", workspace / "stage2" / "model")
    _record(workspace, "stage2", lora=True)
    return workspace / "stage2"


def add_full_stage2(workspace: Path, seed: int = 0) -> Path:
    """stage2/model: every weight of stage 1 perturbed, saved with save_pretrained plus the processor."""
    from transformers import AutoProcessor

    source = workspace / "stage1" / "model"
    model = _load(source)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(torch.randn(param.shape, generator=generator) * 0.02)
    folder = workspace / "stage2" / "model"
    model.save_pretrained(folder)
    AutoProcessor.from_pretrained(source, trust_remote_code=True).save_pretrained(folder)
    shutil.copy2(source / "generation_config.json", folder / "generation_config.json")
    _record(workspace, "stage2", lora=False)
    return workspace / "stage2"
