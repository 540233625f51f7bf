"""The typed check of a checkpoint's config.json, run once where every config.json is read (`read_config`).

What is checked comes from the family declarations (the width, depth and vocabulary keys each family reads,
its sub-config and token-id keys) plus the shape fields transformers builds the model from. A size must be a
positive integer (a layer count may be 0), a sub-config a JSON object, a token id an integer; a field dpa
itself reads may not be null either. The same rules apply at the top level and inside every sub-config
(a DPA model's perceiver_config nests a whole VLM config), so `text_config.hidden_size: "big"` is named by
its path instead of failing as a traceback deep inside the upgrade.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from dpa_cli.errors import CheckpointError
from dpa_cli.families.base import Family
from dpa_cli.schema import Bool, Context, Int, ListOf, Record, Spec, Str, show

LAYER_COUNTS = ("num_hidden_layers", "n_layer", "num_layers", "depth")
# Shapes transformers builds layers from; optional (real configs say `head_dim: null`), but never wrong.
BUILD_SIZES = (
    "intermediate_size",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "num_heads",
    "out_hidden_size",
    "max_position_embeddings",
    "image_seq_length",
    "num_channels",
    "in_channels",
    "spatial_merge_size",
    "temporal_patch_size",
    "projection_dim",
    "window_size",
    "scale_factor",
    "num_position_embeddings",
)
TOKEN_LISTS = ("perceiver_marker_token_ids", "target_marker_token_ids")
EXTRA_TOKENS = ("video_token_id", "video_token_index", "perceiver_image_token_id")
GENERATION_TOKENS = ("bos_token_id", "eos_token_id", "pad_token_id")


@dataclass(frozen=True)
class Size(Spec):
    """A positive integer (or >= 0 for layer counts)."""

    minimum: int = 1
    nullable: bool = False

    def problem(self, value: Any, ctx: Context) -> str | None:
        if isinstance(value, int) and not isinstance(value, bool) and value >= self.minimum:
            return None
        what = "a positive integer" if self.minimum == 1 else f"an integer >= {self.minimum}"
        return f"must be {what}{' or null' if self.nullable else ''}, not {show(value)}"


@dataclass(frozen=True)
class TokenIds(Spec):
    """One token id or a list of them (`eos_token_id: [1, 2]`)."""

    nullable: bool = True

    def problem(self, value: Any, ctx: Context) -> str | None:
        items = value if isinstance(value, list) else [value]
        if all(isinstance(v, int) and not isinstance(v, bool) for v in items):
            return None
        return f"must be a token id (an integer) or a list of them, not {show(value)}"


def _read_fields(families: list[Family]) -> tuple[set[str], set[str], set[str], set[str]]:
    """(size keys, sub-config keys, token-id keys, text keys) the family declarations read."""
    sizes, subs, tokens = set(), set(), set()
    for family in families:
        for names in (*family.text_fields.values(), *family.vision_fields.values()):
            sizes.update(names)
        sizes.update(k for k in (family.vision_width_key,) if k)
        subs.update(k for k in (family.text_config_key, family.vision_config_key, family.perceiver_config_key) if k)
        tokens.update((*family.image_token_keys, *family.marker_token_keys))
    texts = {"model_type"} | {f.external_vision_key for f in families if f.external_vision_key}
    return sizes, subs, tokens, texts


def config_schema(families: list[Family]) -> Record:
    """The shape of a config.json for these families; sub-configs follow the same shape (recursively)."""
    sizes, subs, tokens, texts = _read_fields(families)
    fields: dict[str, Spec] = {}
    for name in BUILD_SIZES:  # read by transformers only: null means its default
        fields[name] = Size(nullable=True)
    for name in sizes:  # read by dpa: null is as wrong as "big"
        fields[name] = Size(minimum=0 if name in LAYER_COUNTS else 1)
    for name in (*tokens, *EXTRA_TOKENS):  # dpa looks these up in the tokenizer: never negative
        fields[name] = Int(minimum=0, nullable=True)
    for name in GENERATION_TOKENS:
        fields[name] = TokenIds()
    for name in TOKEN_LISTS:
        fields[name] = ListOf(Int(minimum=0), nullable=True)
    for name in texts:
        fields[name] = Str(nullable=True)
    fields["architectures"] = ListOf(Str(), nullable=True)
    fields["tie_word_embeddings"] = Bool(nullable=True)
    schema = Record(fields)
    for name in subs:
        fields[name] = schema  # a sub-config is a config: the same rules, all the way down
    return schema


def _transformers_words(err: Exception) -> tuple[str | None, str]:
    """(the field transformers names, what it says) from one of its config validation errors."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()] or [type(err).__name__]
    said = re.sub(r"^(TypeError|ValueError): ", "", lines[-1])
    named = re.search(r"[Ff]ield '(\w+)'", lines[0]) or re.search(r"`(\w+)`", said)  # a class validator's words
    said = re.sub(r"^Field '\w+' ", "", said)
    return (named.group(1) if named else None), said


# The language model's fields the surgery reads itself; transformers would fill in defaults that fit no weights.
UPGRADE_NEEDS = ("hidden_size", "vocab_size")


def _require_text_fields(config: Mapping[str, Any], family: Family, where: str) -> None:
    key = family.text_config_key if family.text_config_fn is None else None
    text = family.text_config(config)
    nested = key is not None and isinstance(config.get(key), Mapping)
    for name in UPGRADE_NEEDS:
        if family.text_field(text, name) is None:
            path = f"{key}.{name}" if nested else key if key and not text else name
            raise CheckpointError(f"{where}: {path} is missing", hint="restore config.json, or re-download the model")


def check_with_transformers(config: Mapping[str, Any], family: Family, where: str) -> None:
    """Build transformers' own config classes from `config` (no weights): whatever their validators refuse
    (a null `tie_word_embeddings`, 0 layers with 2 `layer_types`, ...) is named here by key path, before the
    tokenizer, the plan or the surgery meet it as a traceback. Sub-configs are built first, to say which."""
    from huggingface_hub.errors import StrictDataclassError
    from transformers import CONFIG_MAPPING

    _require_text_fields(config, family, where)
    parts = [
        (key, config[key])
        for key in (family.text_config_key, family.vision_config_key)
        if key and isinstance(config.get(key), Mapping)
    ]
    parts.append(("", family.text_config(config) if family.text_config_fn else config))
    for prefix, part in parts:
        kind = part.get("model_type")
        if kind not in CONFIG_MAPPING:
            continue  # a model_type transformers does not know: detection or the load says so
        try:
            CONFIG_MAPPING[kind](**{k: v for k, v in part.items() if k != "model_type"})
        except (StrictDataclassError, ValueError, TypeError, KeyError, AttributeError, ArithmeticError) as err:
            name, said = _transformers_words(err)
            path = ".".join(p for p in (prefix, name) if p) or "the config"
            raise CheckpointError(
                f"{where}: {path}: transformers refuses it ({said})",
                hint="fix the value in config.json, or re-download the model",
            ) from None
