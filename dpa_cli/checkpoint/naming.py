"""Checkpoint keys -> the names a transformers model holds in memory, without loading any weights.

Hub checkpoints carry several generations of key names (llava-hf's `language_model.model.*`, Qwen2-VL's
`visual.*`) that transformers renames while loading. Rather than re-declaring those rules we ask
transformers: build the model on the meta device (no memory) and apply its own conversion mapping.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch

from dpa_cli.errors import CheckpointError
from dpa_cli.families import Family


def meta_model(auto_class: str, config: Any) -> torch.nn.Module:
    """The model `config` describes, built on the meta device: shapes and names, no memory."""
    import transformers

    with torch.device("meta"):
        return getattr(transformers, auto_class).from_config(config, trust_remote_code=False)  # config only


def meta_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter and buffer the checkpoint must provide, tied copies counted once."""
    state = model.state_dict()
    tied = getattr(model, "all_tied_weights_keys", None) or {}
    return {name: tensor for name, tensor in state.items() if name not in tied}


def rename_to_memory(model: torch.nn.Module, keys: Iterable[str], where: Path) -> dict[str, str]:
    """{checkpoint key: in-memory name} by transformers' load-time renaming rules for `model`.

    Keys that need a weight *conversion* (split / merged tensors, as in some MoE checkpoints) cannot be
    streamed one tensor at a time and are refused, naming the key.
    """
    keys = list(keys)
    state = model.state_dict()
    if all(key in state for key in keys):
        # Saved as the model holds them (what transformers 5 writes): each key names its own parameter, and
        # transformers' conversion table, which takes 0.2 s to build on first use, is not needed.
        return {key: key for key in keys}
    return renamed_by_transformers(model, keys, where, state)


def renamed_by_transformers(
    model: torch.nn.Module, keys: list[str], where: Path, state: dict[str, Any] | None = None
) -> dict[str, str]:
    """`rename_to_memory` through transformers' own conversion mapping, key by key."""
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import WeightConverter, rename_source_key

    conversions = get_model_conversion_mapping(model)
    renamings = [c for c in conversions if not isinstance(c, WeightConverter)]
    converters = [c for c in conversions if isinstance(c, WeightConverter)]
    state = model.state_dict() if state is None else state
    names = {}
    for key in keys:
        name, converted = rename_source_key(key, renamings, converters, model.base_model_prefix, state)
        if converted is not None:
            raise CheckpointError(
                f"{where}: tensor {key!r} needs a many-to-one weight conversion when loaded",
                hint="re-save the checkpoint with a recent transformers (save_pretrained), then upgrade that",
            )
        names[key] = name
    return names


def memory_names(family: Family, config: Mapping[str, Any], folder: Path, keys: Iterable[str]) -> dict[str, str]:
    """{checkpoint key: in-memory name} for a checkpoint of `family`; unknown keys map to themselves."""
    keys = list(keys)
    if family.memory_names is not None:
        return family.memory_names(config, keys)
    from dpa_cli import loading

    try:
        model = meta_model(family.auto_class, loading.load_config(folder))
    except (ValueError, TypeError, KeyError, AttributeError, ArithmeticError) as err:  # e.g. 0 ** -x of 0 heads
        raise CheckpointError(
            f"{folder}/config.json: transformers cannot build this model from it ({error_summary(err)})",
            hint="the config is damaged or from a newer transformers; check it with `dpa inspect`",
        ) from None
    return rename_to_memory(model, keys, folder)


def error_summary(err: Exception) -> str:
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    return lines[-1] if lines else type(err).__name__
