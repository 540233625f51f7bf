"""Checkpoints of the original LLaVA repositories (haotian-liu/LLaVA, LLaVA-NeXT): LlavaLlama / LlavaQwen.

transformers has no class for them. The text fields sit at the top of config.json, the ViT is named only
by hub id (`mm_vision_tower`) with its width in `mm_hidden_size`, and the weights nest the ViT twice
(`model.vision_tower.vision_tower.vision_model.*`). LLaVA-1.5 configs even say model_type "llava", so
this family is detected before `llava`, by architecture or by the `mm_vision_tower` key.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from typing import Any

from dpa_cli.families.base import Family, Role, layout, rename_keys

# The language model each original class wraps; its config fields are the top-level ones.
TEXT_MODEL_TYPES = {
    "LlavaLlamaForCausalLM": "llama",
    "LlavaQwenForCausalLM": "qwen2",
    "LlavaMistralForCausalLM": "mistral",
    "LlavaMixtralForCausalLM": "mixtral",
}
MODEL_TYPES = {"llava_llama": "llama", "llava_qwen": "qwen2", "llava_mistral": "mistral", "llava_mixtral": "mixtral"}
# LLaVA splices this id into input_ids where an image goes; it is never a vocabulary entry.
IMAGE_TOKEN_INDEX = -200


def _text_config(config: Mapping[str, Any]) -> dict[str, Any]:
    """The top-level config, with model_type set to that of the wrapped LM (llama, qwen2, ...)."""
    architectures = config.get("architectures") or ()
    from_arch = next((TEXT_MODEL_TYPES[a] for a in architectures if a in TEXT_MODEL_TYPES), None)
    model_type = from_arch or MODEL_TYPES.get(config.get("model_type"), "llama")
    return {**config, "model_type": model_type}


# Original key -> the name the equivalent transformers LLaVA(-NeXT) model holds in memory (v5 keeps no
# `vision_model.` level inside its CLIP / SigLIP towers; the MLP's Sequential indices 0 and 2 are linear_1/2).
_RENAMES = (
    (re.compile(r"^model\.(embed_tokens|layers|norm)\."), r"model.language_model.\1."),
    (re.compile(r"^model\.vision_tower\.vision_tower\.vision_model\."), "model.vision_tower."),
    (re.compile(r"^model\.mm_projector\.0\."), "model.multi_modal_projector.linear_1."),
    (re.compile(r"^model\.mm_projector\.2\."), "model.multi_modal_projector.linear_2."),
    (re.compile(r"^(lm_head\.weight|model\.image_newline)$"), r"\1"),
)


def _memory_names(config: Mapping[str, Any], keys: Iterable[str]) -> dict[str, str]:
    """Keys this family knows, renamed as transformers' LLaVA classes hold them; others are left out."""
    return rename_keys(keys, _RENAMES)


LLAVA_ORIGINAL = Family(
    name="llava_original",
    description="LlavaLlamaForCausalLM / LlavaQwenForCausalLM (original LLaVA repos), ViT config by hub id",
    roles=frozenset({Role.TARGET}),
    layouts=(
        layout(
            "original",
            vision="model.vision_tower",
            projector="model.mm_projector",
            language_model=("model.embed_tokens", "model.layers", "model.norm"),
            lm_head="lm_head",
            extra="model.image_newline",
        ),
    ),
    model_types=tuple(MODEL_TYPES),
    architectures=tuple(TEXT_MODEL_TYPES),
    config_markers=("mm_vision_tower",),
    text_config_fn=_text_config,
    vision_config_key=None,
    external_vision_key="mm_vision_tower",
    vision_width_key="mm_hidden_size",
    image_token_keys=(),
    default_image_token_id=IMAGE_TOKEN_INDEX,
    projector_type_key="mm_projector_type",
    auto_class=None,
    memory_names=_memory_names,
)
