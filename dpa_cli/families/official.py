"""The DPA paper's official remote-code formats whose configs name their parts by hub id (never run, never needed).

- `llava_baseline` (the perceiver; official `ms-swift/modelings/modeling_llava_baseline.py`, LB): a Qwen2Config
  with `vit_path` / `llm_path`; the skeleton is built from those two hub configs (LB:548-557), its weights are
  `model.vlm.visual.*`, `model.vlm.language_model.*`, `lm_head.weight`.
- `forward_visual_tokens_llava_arch` (the DPA model, DPA-4B-init / DPA-4B; official
  `modeling_forward_visual_tokens_llava_arch.py`, FVT): a `llava_baseline` perceiver, phi `linear_align_dim`
  and a stock Qwen3 `thinker` whose config is the hub's `thinker_name_or_path` (FVT:112-136).
The hub ids are resolved through the local Hugging Face cache only (dpa_cli.hub); a missing one is named.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import Any

from dpa_cli.errors import CheckpointError, ModelNotFoundError
from dpa_cli.families.base import Family, Role, layout
from dpa_cli.families.paper import (
    DEFAULT_MROPE,
    memory_names,
    rope_parameters,
    skeleton_config,
    skeleton_text,
    text_part,
)
from dpa_cli.jsonio import read_json

# Defaults of the official config classes, used when a config.json leaves the key out.
VIT_PATH, LLM_PATH, THINKER = "Qwen/Qwen2.5-VL-3B-Instruct", "Qwen/Qwen3-4B", "Qwen/Qwen3-4B"  # LB:523-524, FVT:54
QWEN2_ROPE_THETA = 10000.0  # transformers 4.57 Qwen2Config's default: LLaVABaselineConfig(Qwen2Config) inherits it
QWEN2_ROTARY_DIM = 4096 // 32  # its hidden_size // num_attention_heads defaults


@functools.lru_cache(maxsize=64)
def _cached_config(repo_id: str, cache: str) -> dict[str, Any]:
    from dpa_cli.hub import resolve_model

    path = resolve_model(repo_id, aliases={}).path / "config.json"
    return read_json(path, hint="re-download it", error=CheckpointError)


def hub_config(config: Mapping[str, Any], key: str, default: str) -> dict[str, Any]:
    """The config.json of the hub id `config[key]` names, from the local cache; a missing one is named by key."""
    from dpa_cli.hub import hub_cache_dir

    repo_id = config.get(key, default)
    if not isinstance(repo_id, str) or not repo_id:
        raise CheckpointError(f"config.json: {key} must name a hub id or a folder, not {repo_id!r}")
    try:
        return dict(_cached_config(repo_id, str(hub_cache_dir())))
    except ModelNotFoundError as err:
        raise ModelNotFoundError(f"config.json: {key} {repo_id!r}: {err.message}", hint=err.hint) from None


def _baseline_native(config: Mapping[str, Any]) -> dict[str, Any]:
    """The skeleton an official `llava_baseline` config builds: ViT and token ids from `vit_path`'s config, the LM
    from `llm_path`'s, RoPE theta and type from this config itself (LB:552-553), the sections from `vit_path`'s
    (LB:556-557). Its rotary dimension (head_dim, or width / heads) must be the LM's or the official code fails."""
    vlm, lm = hub_config(config, "vit_path", VIT_PATH), hub_config(config, "llm_path", LLM_PATH)
    rope = {k: v for k, v in rope_parameters(config).items() if k != "mrope_section"}
    rope.setdefault("rope_theta", QWEN2_ROPE_THETA)
    section = rope_parameters(text_part(vlm)).get("mrope_section") or DEFAULT_MROPE
    text = skeleton_text(lm, section, **rope)
    heads, width = config.get("num_attention_heads"), config.get("hidden_size")
    rotary = config.get("head_dim") or (width // heads if width and heads else QWEN2_ROTARY_DIM)
    if rotary != text["head_dim"]:
        raise CheckpointError(
            f"config.json: head_dim {rotary} (the perceiver's rotary size; hidden_size / num_attention_heads when "
            f"absent) is not the head_dim {text['head_dim']} of llm_path {config.get('llm_path', LLM_PATH)}",
            hint="the perceiver's RoPE is built from this config (official modeling_llava_baseline.py:552): fix it",
        )
    tie = bool(lm.get("tie_word_embeddings", False))
    return skeleton_config(vlm, text, tie)


LLAVA_BASELINE = Family(
    name="llava_baseline",
    description="The paper's perceiver, official format (remote code not run): the skeleton from vit_path + llm_path",
    # The perceiver; with llm_path Qwen3-4B, the baseline target as it trains (transcription sec. 1.2).
    roles=frozenset({Role.TARGET, Role.PERCEIVER}),
    layouts=(
        layout(
            "official",
            vision="model.vlm.visual",
            projector="model.vlm.visual.merger",
            language_model="model.vlm.language_model",
            lm_head="lm_head",
        ),
    ),
    model_types=("llava_baseline",),
    architectures=("LLaVABaselineModelForConditionalGeneration",),
    text_config_fn=lambda config: _baseline_native(config)["text_config"],
    vision_config_fn=lambda config: _baseline_native(config)["vision_config"],
    native_config=_baseline_native,
    # Its token ids are vit_path's (Qwen2.5-VL's, FVT:34-40): read from the native config (`native_config`).
    image_token_keys=("image_token_id",),
    marker_token_keys=("vision_start_token_id", "vision_end_token_id"),
    vision_fields={"hidden_size": ("hidden_size",), "num_layers": ("depth",), "patch_size": ("patch_size",)},
    vision_class="Qwen2_5_VisionTransformerPretrainedModel",
    auto_class=None,
    memory_names=memory_names,
    # The eval split writes it as pytorch_model.bin (Multimodal_eval/seperate_model_mlp_func.py:45).
    pickled_weights=True,
)


def thinker_config(config: Mapping[str, Any]) -> dict[str, Any]:
    """The thinker's config: the hub's `thinker_name_or_path` (FVT:120-121), a stock Qwen3 (1-D RoPE)."""
    return hub_config(config, "thinker_name_or_path", THINKER)


OFFICIAL_DPA = Family(
    name="forward_visual_tokens_llava_arch",
    description="An official DPA checkpoint (DPA-4B-init, DPA-4B; remote code not run): llava_baseline perceiver "
    "-> linear_align_dim -> Qwen3 thinker; `dpa upgrade` with no --perceiver makes it a workspace",
    roles=frozenset(),
    layouts=(
        layout(
            "official",
            perceiver="model.perceiver",
            projector="model.linear_align_dim",
            language_model="model.thinker.model",
            lm_head=("lm_head", "model.thinker.lm_head"),
        ),
    ),
    model_types=("forward_visual_tokens_llava_arch",),
    architectures=("ForwardVisualTokensArchForCausalLM",),
    text_config_fn=thinker_config,
    vision_config_key=None,
    image_token_keys=("image_token_id",),
    default_image_token_id=151655,  # FVT:64 sets it whatever the file says
    perceiver_config_key="perceiver_config",
    auto_class=None,
    pickled_weights=True,  # the training scripts save with --save_safetensors false (PT:60, SFT:60)
)
