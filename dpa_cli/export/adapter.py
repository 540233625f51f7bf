"""A PEFT LoRA adapter, read from its config and safetensors headers: which module each A/B pair adapts and how much.

Only what `W + scale * B @ A` merges exactly is accepted (plain LoRA on linear layers); anything else (DoRA,
LoRA biases, embedding adapters, `modules_to_save`) is refused by name, with `--keep-adapter` as the way out.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dpa_cli.checkpoint import CheckpointIndex, read_checkpoint_index
from dpa_cli.errors import CheckpointError
from dpa_cli.jsonio import read_json
from dpa_cli.workspace.layout import ADAPTER_CONFIG

# peft's save_pretrained: `base_model.model.<module in memory>.lora_A.weight` (the adapter name removed).
_LORA_KEY = re.compile(r"^base_model\.model\.(?P<module>.+)\.lora_(?P<which>[AB])\.weight$")
KEEP = "export with --keep-adapter to ship the adapter unmerged"
# Config fields whose non-default value changes what merging means; refused rather than merged wrongly.
_UNMERGEABLE = {
    "use_dora": "DoRA adapters",
    "lora_bias": "LoRA biases",
    "fan_in_fan_out": "fan_in_fan_out (Conv1D) adapters",
    "modules_to_save": "modules_to_save",
    "trainable_token_indices": "trainable token rows",
    "target_parameters": "adapters on parameters",
    "layer_replication": "layer replication",
}


@dataclass(frozen=True)
class LoraPair:
    """One adapted linear layer: `W += scale * B @ A`, with A `[r, in]` and B `[out, r]` read from the adapter."""

    module: str  # in-memory module name, e.g. model.language_model.layers.0.self_attn.q_proj
    a_key: str
    b_key: str
    scale: float
    shape: tuple[int, int]  # (out, in): the shape of the weight it adapts


def read_adapter_config(folder: Path) -> dict[str, Any]:
    path = Path(folder) / ADAPTER_CONFIG
    config = read_json(path, hint="restore the adapter folder", error=CheckpointError)
    if not isinstance(config, dict) or config.get("peft_type") != "LORA":
        kind = config.get("peft_type") if isinstance(config, dict) else None
        raise CheckpointError(f"{path}: a {kind or 'non-PEFT'} adapter, not LoRA; dpa merges LoRA only", hint=KEEP)
    for key, what in _UNMERGEABLE.items():
        if config.get(key):
            raise CheckpointError(f"{path}: {key} is set, and merging {what} is not supported", hint=KEEP)
    return config


def _alpha(config: dict[str, Any], module: str) -> float:
    """lora_alpha, or the alpha_pattern entry peft itself matched for this module."""
    pattern = config.get("alpha_pattern") or {}
    if not pattern:  # importing peft costs more than a whole merge's key matching
        return float(config["lora_alpha"])
    from peft.utils.other import get_pattern_key

    return float(pattern.get(get_pattern_key(pattern.keys(), module), config["lora_alpha"]))


def _pair(config: dict[str, Any], index: CheckpointIndex, module: str, keys: dict[str, str]) -> LoraPair:
    folder = index.folder
    if set(keys) != {"A", "B"}:
        missing = "lora_B" if "A" in keys else "lora_A"
        raise CheckpointError(f"{folder}: LoRA of {module} has no {missing} weight", hint="restore the adapter folder")
    a, b = index.tensors[keys["A"]].shape, index.tensors[keys["B"]].shape
    if len(a) != 2 or len(b) != 2 or a[0] != b[1]:
        raise CheckpointError(f"{folder}: LoRA of {module} has A {list(a)} and B {list(b)}, which do not multiply")
    rank = a[0]  # the stored shape is the truth, rank_pattern included
    alpha = _alpha(config, module)
    scale = alpha / (math.sqrt(rank) if config.get("use_rslora") else rank)
    return LoraPair(module, keys["A"], keys["B"], scale, (b[0], a[1]))


def lora_pairs(folder: Path) -> tuple[CheckpointIndex, list[LoraPair]]:
    """The adapter's tensor index and one pair per adapted module; any other tensor is refused by name."""
    config = read_adapter_config(folder)
    index = read_checkpoint_index(folder)
    grouped: dict[str, dict[str, str]] = {}
    for key in index.tensors:
        match = _LORA_KEY.match(key)
        if match is None:
            raise CheckpointError(
                f"{folder}: adapter tensor {key!r} is not the LoRA A/B weight of a linear layer; it cannot be merged",
                hint=KEEP,
            )
        grouped.setdefault(match["module"], {})[match["which"]] = key
    if not grouped:
        raise CheckpointError(f"{folder}: the adapter holds no LoRA weights", hint="restore the adapter folder")
    return index, [_pair(config, index, module, keys) for module, keys in grouped.items()]
