"""The export's other files: config with `auto_map`, remote code, processor and tokenizers, generation config,
the kept adapter, and `dpa_export.json`, the record that marks a folder as an export dpa wrote.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch

from dpa_cli.checkpoint.side_files import (
    EXPORT_AUTO_MAP,
    copy_model_code,
    point_adapter_at,
    remote_code_config,
    write_generation_config,
    write_json,
)
from dpa_cli.errors import CheckpointError
from dpa_cli.jsonio import read_json
from dpa_cli.workspace.layout import ADAPTER_CONFIG, ADAPTER_DIR, EXPORT_RECORD

ADAPTER_WEIGHTS = "adapter_model.safetensors"


def write_config(source: Path, dest: Path, dtype: torch.dtype | None) -> None:
    """The source's config, made to load as remote code, with the dtype the weights are written in."""
    path = Path(source) / "config.json"
    config: dict[str, Any] = read_json(path, hint="restore the stage's model folder", error=CheckpointError)
    dtype_name = dtype and str(dtype).removeprefix("torch.")
    write_json(Path(dest) / "config.json", remote_code_config(config, dtype_name, auto_map=EXPORT_AUTO_MAP))
    copy_model_code(dest)


def ensure_generation_config(dest: Path, fallbacks: list[Path]) -> None:
    """The stage's generation_config.json, else the workspace model's, else one made from the text config's
    special tokens; completed with the tokenizer's stop tokens, so a workspace upgraded before dpa wrote them
    still exports a model whose replies stop."""
    text = read_json(dest / "config.json").get("text_config") or {}
    write_generation_config(dest, fallbacks, text, tokenizer_folder=dest)


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
