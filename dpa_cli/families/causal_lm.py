"""Plain text causal LMs (Qwen3, Llama, Mistral, ...): any model_type transformers maps to a *ForCausalLM.

Detected last: many VLM model types also appear in transformers' causal-LM mapping (gemma3, mllama),
so a config with a vision or text sub-config is never taken for a plain LM.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from dpa_cli.families.auto_names import auto_names
from dpa_cli.families.base import Family, Role, layout


def causal_lm_model_types() -> frozenset[str]:
    """Model types transformers can build a *ForCausalLM for."""
    return frozenset(auto_names("MODEL_FOR_CAUSAL_LM_MAPPING_NAMES"))


def encoder_kind(model_type: Any) -> str | None:
    """What an encoder model_type is ("an encoder (masked language model)"), or None for anything else.

    transformers maps BERT-like encoders and encoder-decoders to a *ForCausalLM too (a decoder bolted on for
    generation experiments), but their weights were trained bidirectionally: never a target LLM.
    """
    if not isinstance(model_type, str):
        return None
    if model_type in auto_names("MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES"):
        return "an encoder-decoder model"
    if model_type in auto_names("MODEL_FOR_MASKED_LM_MAPPING_NAMES"):
        return "an encoder (masked language model)"
    return None


def _is_text_causal_lm(config: Mapping[str, Any]) -> bool:
    if "vision_config" in config or "text_config" in config:
        return False
    model_type = config.get("model_type")
    return model_type in causal_lm_model_types() and encoder_kind(model_type) is None


CAUSAL_LM = Family(
    name="causal_lm",
    description="A text-only *ForCausalLM: the target LLM of a composed upgrade",
    roles=frozenset({Role.TARGET}),
    layouts=(
        layout("v5", language_model="model", lm_head="lm_head"),
        layout("gpt2", language_model="transformer", lm_head="lm_head"),
        layout("gpt_neox", language_model="gpt_neox", lm_head="embed_out"),
        layout("base", language_model=("embed_tokens", "layers", "norm")),  # a saved *Model, no head
    ),
    detector=_is_text_causal_lm,
    text_config_key=None,
    vision_config_key=None,
    image_token_keys=(),
    auto_class="AutoModelForCausalLM",
)
