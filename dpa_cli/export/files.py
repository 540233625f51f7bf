"""The export's other files: config with `auto_map`, remote code, processor and tokenizers, generation config,
the kept adapter, and `dpa_export.json`, the record that marks a folder as an export dpa wrote.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch

from dpa_cli.errors import CheckpointError
from dpa_cli.export.stages import ADAPTER_CONFIG, ADAPTER_DIR
from dpa_cli.train.save import point_adapter_at
from dpa_cli.jsonio import read_json
from dpa_cli.records import EXPORT_RECORD
from dpa_cli.upgrade.files import AUTO_MAP, GENERATION_KEYS, copy_model_code

ADAPTER_WEIGHTS = "adapter_model.safetensors"
# Generic loaders (lmms-eval's `huggingface` model, scripts written for any checkpoint) fall back to AutoModel for
# a model type transformers does not know: in an export it gives the model that generates. Workspaces keep
# AutoModel -> DPAModel (the base, as for transformers' own VLMs) for code that wants the hidden states.
EXPORT_AUTO_MAP = {**AUTO_MAP, "AutoModel": AUTO_MAP["AutoModelForImageTextToText"]}
# Never shipped: weights are written afresh, pickles never (training_args.bin), the card is ours.
_SKIP_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".pkl")
_SKIP_NAMES = {"model.safetensors.index.json", "README.md", EXPORT_RECORD}


def copy_side_files(source: Path, dest: Path) -> None:
    """Processor, tokenizers (with the chat template) and their subfolders; weights and pickles are left out."""
    for item in sorted(Path(source).iterdir()):
        if item.name.startswith(".") or item.name in _SKIP_NAMES or item.name == ADAPTER_DIR:
            continue
        if item.is_file() and not item.name.endswith(_SKIP_SUFFIXES):
            shutil.copy2(item, dest / item.name)
        elif item.is_dir() and not any(p.name.endswith(_SKIP_SUFFIXES) for p in item.rglob("*")):
            shutil.copytree(item, dest / item.name)


def write_config(source: Path, dest: Path, dtype: torch.dtype | None) -> None:
    """The source's config, made to load as remote code, with the dtype the weights are written in."""
    path = Path(source) / "config.json"
    config: dict[str, Any] = read_json(path, hint="restore the stage's model folder", error=CheckpointError)
    config.update(architectures=["DPAForConditionalGeneration"], auto_map=EXPORT_AUTO_MAP)
    if dtype is not None:
        config["dtype"] = str(dtype).removeprefix("torch.")
    (Path(dest) / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    copy_model_code(dest)


def ensure_generation_config(dest: Path, fallbacks: list[Path]) -> None:
    """Keep the stage's generation_config.json (the target's stop tokens); else the workspace model's, else
    one made from the text config's special tokens."""
    if (dest / "generation_config.json").is_file():
        return
    for folder in fallbacks:
        if (folder / "generation_config.json").is_file():
            shutil.copy2(folder / "generation_config.json", dest / "generation_config.json")
            return
    text = read_json(dest / "config.json").get("text_config") or {}
    generation = {key: text[key] for key in GENERATION_KEYS if text.get(key) is not None}
    (dest / "generation_config.json").write_text(json.dumps(generation, indent=2, sort_keys=True) + "\n")


def copy_adapter(adapter: Path, dest: Path, final: Path) -> None:
    """The PEFT adapter as `dest/adapter/`, pointing at the export's final path as its base model, with
    transformers' auto class (never dpa_cli's) in `auto_mapping`: plain peft loads it on a machine without dpa."""
    folder = dest / ADAPTER_DIR
    folder.mkdir()
    shutil.copy2(adapter / ADAPTER_WEIGHTS, folder / ADAPTER_WEIGHTS)
    shutil.copy2(adapter / ADAPTER_CONFIG, folder / ADAPTER_CONFIG)
    point_adapter_at(folder, final)


def write_record(dest: Path, summary: dict[str, Any]) -> None:
    (dest / EXPORT_RECORD).write_text(json.dumps({"dpa_export": 1, **summary}, indent=2, default=str) + "\n")
