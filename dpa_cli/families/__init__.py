"""Checkpoint families: an explicit registry from name to adapter, and detection from config.json.

Adding a family is one module declaring a `Family` plus one line in `FAMILIES`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from dpa_cli.errors import BadInputError, CheckpointError, UnknownFamilyError
from dpa_cli.families.base import Component, Family, KeyLayout, KeySplit, Role, count_layers
from dpa_cli.families.causal_lm import CAUSAL_LM, encoder_kind
from dpa_cli.families.config_check import config_schema
from dpa_cli.families.dpa import DPA
from dpa_cli.families.idefics3 import IDEFICS3, SMOLVLM
from dpa_cli.families.llava import LLAVA
from dpa_cli.families.llava_next import LLAVA_NEXT
from dpa_cli.families.llava_onevision import LLAVA_ONEVISION
from dpa_cli.families.llava_original import LLAVA_ORIGINAL
from dpa_cli.families.official import LLAVA_BASELINE, OFFICIAL_DPA
from dpa_cli.families.paper import PAPER_VL, QWEN_CUSTOM_VL_HW
from dpa_cli.families.qwen_vl import QWEN2_5_VL, QWEN2_VL, QWEN3_VL
from dpa_cli.schema import validate

# Detection tries these in order: the first whose rule matches wins.
FAMILIES: dict[str, Family] = {
    "dpa": DPA,
    "llava_original": LLAVA_ORIGINAL,  # before "llava": LLaVA-1.5 repos say model_type "llava" too
    "llava": LLAVA,
    "llava_next": LLAVA_NEXT,
    "llava_onevision": LLAVA_ONEVISION,
    "qwen2_vl": QWEN2_VL,
    "qwen2_5_vl_qwen3": PAPER_VL,  # before "qwen2_5_vl": it claims qwen2_5_vl configs whose text is Qwen3
    "qwen_custom_vl_hw_new": QWEN_CUSTOM_VL_HW,
    "llava_baseline": LLAVA_BASELINE,
    "forward_visual_tokens_llava_arch": OFFICIAL_DPA,
    "qwen2_5_vl": QWEN2_5_VL,
    "qwen3_vl": QWEN3_VL,
    "idefics3": IDEFICS3,
    "smolvlm": SMOLVLM,
    "causal_lm": CAUSAL_LM,  # last: it accepts any text model transformers knows
}


# The shape every config.json must have, built from what the families above read.
CONFIG_SCHEMA = config_schema(list(FAMILIES.values()))


def check_config(config: Any, where: str) -> dict[str, Any]:
    """`config` (a parsed config.json) when its sizes, sub-configs and token ids have usable types; else a
    `CheckpointError` naming the key path, e.g. `config.json: text_config.hidden_size must be a positive
    integer, not 'big'`."""
    hint = "fix the value in config.json (it must agree with the weights), or re-download the model"
    return validate(config, CONFIG_SCHEMA, where, hint=hint, error=CheckpointError)


def _known() -> str:
    return ", ".join(FAMILIES)


def detect_family(config: Mapping[str, Any], where: str = "config.json") -> Family:
    """The family of a parsed config.json; `where` names the file in the error."""
    for family in FAMILIES.values():
        if family.detect(config):
            return family
    model_type = config.get("model_type")
    encoder = encoder_kind(model_type)
    if encoder:
        raise UnknownFamilyError(
            f"{where}: model_type {model_type!r} is {encoder}, not a decoder-only causal LM",
            hint="dpa upgrades LLaVA-style VLMs and decoder-only LLMs (Qwen3, Llama, ...); pick one of those",
        )
    architectures = ", ".join(config.get("architectures") or ()) or "none"
    raise UnknownFamilyError(
        f"{where}: model_type {model_type!r} (architectures: {architectures}) is not a supported family",
        hint=f"known families: {_known()}",
    )


def native_config(family: Family, config: Mapping[str, Any], where: str) -> dict[str, Any]:
    """The config dpa builds a checkpoint of `family` from (`family.native_config`, else `config` itself). Hub ids
    the config names are read from the local cache; problems are named with `where` (the config.json's path)."""
    if family.native_config is None:
        return dict(config)
    return located(where, family.native_config, config)


def located(where: str, read: Callable[..., Any], *args: Any, within: str | None = None) -> Any:
    """`read(*args)`, with `config.json` in its error messages replaced by `where` (the file's path); `within`
    names the sub-config that was read (`config.json: vit_path ...` -> `WHERE: perceiver_config.vit_path ...`)."""
    try:
        return read(*args)
    except BadInputError as err:
        if not err.message.startswith("config.json"):
            raise
        rest = err.message[len("config.json") :]
        if within and rest.startswith(": "):
            rest = f": {within}.{rest[2:]}"
        raise type(err)(where + rest, hint=err.hint) from None


def get_family(name: str) -> Family:
    """The family registered under `name`; an unknown name is an error listing the known ones."""
    try:
        return FAMILIES[name]
    except KeyError:
        raise UnknownFamilyError(f"unknown family {name!r}", hint=f"known families: {_known()}") from None


__all__ = [
    "FAMILIES",
    "Component",
    "Family",
    "KeyLayout",
    "KeySplit",
    "Role",
    "check_config",
    "count_layers",
    "detect_family",
    "get_family",
    "located",
    "native_config",
]
