"""What the vLLM model needs to know about an export, as plain functions (no vLLM import; tested on CPU).

vLLM runs DPA as two parts: the perceiver (a whole small VLM, kept as its transformers module) and phi in the
multimodal encoder step, once per image; the target LLM as vLLM's own implementation of its family. These
functions say which vLLM class serves the target, where every tensor of the export goes, how many placeholder
tokens an image takes (what DPAProcessor writes), and how the processor's outputs split per image.

vLLM's side is transcribed from vLLM 0.34.0 (the `vllm-0.34.0` wheel, vllm/model_executor/models/):
registry.py `_TEXT_GENERATION_MODELS` (architecture names), llama.py and qwen2.py
`LlamaModel.hf_to_vllm_mapper` / `Qwen2Model.hf_to_vllm_mapper` (`orig_to_new_stacked`: q/k/v into
`qkv_proj`, gate/up into `gate_up_proj`), llama.py `LlamaForCausalLM` (`model.*`, `lm_head`, the head tied to
`model.embed_tokens` when `tie_word_embeddings`), qwen3.py `Qwen3Attention` (`q_norm`, `k_norm`), qwen2.py
`Qwen2Attention` (q/k/v bias), llava.py `hf_to_vllm_mapper` (a VLM's `model.language_model.` prefix becomes
`language_model.model.`, `lm_head.` becomes `language_model.lm_head.`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from dpa_cli.checkpoint.side_files import ARCHITECTURE  # the export's architectures[0]: the name vLLM registers

# The target LLM's model_type -> vLLM's causal-LM architecture serving it (registry.py, _TEXT_GENERATION_MODELS).
TARGET_ARCHITECTURES = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
}

# Export tensor prefix -> the vLLM DPA model's module (llava.py's mapping; the perceiver and phi sit in the
# model's `encoder`, the part vLLM runs in its multimodal encoder step).
PREFIXES = {
    "model.perceiver.": "encoder.perceiver.",
    "model.multi_modal_projector.": "encoder.multi_modal_projector.",
    "model.language_model.": "language_model.model.",
    "lm_head.": "language_model.lm_head.",
}
# Inside vLLM's Llama/Qwen decoder layers (orig_to_new_stacked): HF weight -> (vLLM parameter, shard id).
STACKED = {
    ".q_proj": (".qkv_proj", "q"),
    ".k_proj": (".qkv_proj", "k"),
    ".v_proj": (".qkv_proj", "v"),
    ".gate_proj": (".gate_up_proj", 0),
    ".up_proj": (".gate_up_proj", 1),
}


class UnservableError(ValueError):
    """The export holds something the vLLM plugin cannot serve (a target family, a tensor it cannot place)."""


def _get(config: Any, key: str, default: Any = None) -> Any:
    return config.get(key, default) if isinstance(config, Mapping) else getattr(config, key, default)


def _as_dict(config: Any) -> dict[str, Any]:
    return dict(config) if isinstance(config, Mapping) else config.to_dict()


def check_servable(config: Any) -> str:
    """The target's vLLM architecture, when the plugin serves this export as transformers runs it: the image slots
    must be the image token alone (feature_span `image`: one slot per feature, which is what vLLM's placeholders
    are) and the perceiver must read the image without the user's text (no early fusion: vLLM's encoder step
    sees images only)."""
    span, fused = _get(config, "feature_span", "image"), _get(config, "early_fusion", False)
    if span != "image" or fused:
        what = f"feature_span {span!r}" if span != "image" else "early fusion"
        raise UnservableError(
            f"the vLLM plugin serves feature_span 'image' without early fusion, and this export has {what}"
        )
    return target_architecture(config)


def target_architecture(config: Any) -> str:
    """The vLLM architecture that serves the export's target LLM (from a config dict or a DPAConfig)."""
    model_type = _get(_get(config, "text_config") or {}, "model_type")
    if model_type not in TARGET_ARCHITECTURES:
        known = ", ".join(sorted(TARGET_ARCHITECTURES))
        raise UnservableError(f"the target LLM's model_type {model_type!r} has no vLLM mapping here (known: {known})")
    return TARGET_ARCHITECTURES[model_type]


def target_hf_config(config: Any) -> dict[str, Any]:
    """The target's text config as vLLM's causal-LM class reads it: its own fields, the tie the DPA config
    carries (DPAConfig copies a tied text config's flag up, and the export may be tied at the top only), and the
    architecture that picks the class."""
    text = _as_dict(_get(config, "text_config"))
    tied = bool(_get(config, "tie_word_embeddings", False) or text.get("tie_word_embeddings", False))
    return {**text, "architectures": [target_architecture(config)], "tie_word_embeddings": tied}


def vllm_weight_name(name: str) -> tuple[str, str | int | None]:
    """Where the export's tensor `name` loads in the vLLM model: (parameter name, shard id or None)."""
    for prefix, new in PREFIXES.items():
        if name.startswith(prefix):
            mapped = new + name[len(prefix) :]
            break
    else:
        raise UnservableError(f"tensor {name!r} is in no part the vLLM model knows ({', '.join(PREFIXES)})")
    if not mapped.startswith("language_model."):
        return mapped, None
    for old, (new, shard) in STACKED.items():
        if f"{old}." in mapped:
            return mapped.replace(f"{old}.", f"{new}.", 1), shard
    return mapped, None


def vllm_llm_parameters(config: Any) -> dict[str, set[str | int | None]]:
    """The parameters of vLLM's target LLM inside the DPA model (`language_model.*`), each with the shard ids it
    is loaded from: what `vllm_weight_name` must produce from the export's target tensors, no more, no less."""
    text = target_hf_config(config)
    kind = text["model_type"]
    qkv_bias = kind == "qwen2" or bool(text.get("attention_bias"))
    params: dict[str, set[str | int | None]] = {
        "language_model.model.embed_tokens.weight": {None},
        "language_model.model.norm.weight": {None},
    }
    if not text["tie_word_embeddings"]:
        params["language_model.lm_head.weight"] = {None}
    for layer in range(text["num_hidden_layers"]):
        block = f"language_model.model.layers.{layer}."
        params[block + "self_attn.qkv_proj.weight"] = {"q", "k", "v"}
        if qkv_bias:
            params[block + "self_attn.qkv_proj.bias"] = {"q", "k", "v"}
        params[block + "self_attn.o_proj.weight"] = {None}
        if kind == "qwen3":
            params[block + "self_attn.q_norm.weight"] = {None}
            params[block + "self_attn.k_norm.weight"] = {None}
        params[block + "mlp.gate_up_proj.weight"] = {0, 1}
        params[block + "mlp.down_proj.weight"] = {None}
        params[block + "input_layernorm.weight"] = {None}
        params[block + "post_attention_layernorm.weight"] = {None}
    return params


# --- the processor's side ------------------------------------------------------------------------------------
def image_feature_counts(processor: Any, images: list[Any]) -> list[int]:
    """Per image, the number of target placeholder slots DPAProcessor writes for it: its perceiver features."""
    inputs = processor(images=list(images), text=[processor.image_token * len(images)], return_tensors="pt")
    return processor.feature_counts(inputs)


def largest_image_size(processor: Any) -> tuple[int, int]:
    """(width, height) of an image that gets the most features, for vLLM's memory profiling: the largest
    any-resolution grid, Qwen-VL's pixel cap as a square, else the image processor's largest size."""
    image_processor = processor.image_processor
    pinpoints = getattr(image_processor, "image_grid_pinpoints", None)
    if pinpoints:
        height, width = max(pinpoints, key=lambda hw: hw[0] * hw[1])
        return int(width), int(height)
    size = getattr(image_processor, "size", None) or {}
    if hasattr(image_processor, "temporal_patch_size"):  # Qwen-VL: `size` holds pixel counts (min/max_pixels)
        side = int(math.isqrt(int(size.get("longest_edge") or getattr(image_processor, "max_pixels", 0) or 0)))
        if side:
            return side, side
    if size.get("longest_edge"):
        return int(size["longest_edge"]), int(size["longest_edge"])
    if size.get("height") and size.get("width"):
        return int(size["width"]), int(size["height"])
    pixels = getattr(image_processor, "max_pixels", None) or size.get("max_pixels")
    if pixels:
        side = int(math.isqrt(int(pixels)))
        return side, side
    if size.get("shortest_edge"):
        return int(size["shortest_edge"]), int(size["shortest_edge"])
    raise UnservableError(f"cannot tell the largest image size of {type(image_processor).__name__}")


TEXT_FIELDS = ("input_ids", "attention_mask")


def field_sizes(inputs: Mapping[str, Any], num_images: int) -> dict[str, list[int] | None]:
    """How each image field of the processor's output splits per image: None where the first dimension is the
    image (vLLM's `batched`), else the rows of each image (`flat_from_sizes`: Qwen-VL's patches, one row per
    patch, `image_grid_thw` rows each)."""
    layout: dict[str, list[int] | None] = {}
    grid = inputs.get("image_grid_thw")
    for key, value in inputs.items():
        if key in TEXT_FIELDS or not hasattr(value, "shape"):
            continue
        if grid is not None and key == "pixel_values":
            layout[key] = [int(n) for n in grid.prod(-1).tolist()]
        elif value.shape[0] == num_images:
            layout[key] = None
        else:
            raise UnservableError(f"processor output {key!r} of shape {tuple(value.shape)} does not split by image")
    return layout


def image_inputs(inputs: Mapping[str, Any], layout: Mapping[str, list[int] | None], index: int) -> dict[str, Any]:
    """Image `index`'s own inputs (a batch of one), its perceiver sequence without the padding other images
    forced on it: what the perceiver reads for that image alone. `layout` is field_sizes'."""
    one: dict[str, Any] = {}
    for key, sizes in layout.items():
        value = inputs[key]
        if sizes is None:  # vLLM hands a batched field over stacked, or as a list when the images' shapes differ
            one[key] = value[index][None] if isinstance(value, (list, tuple)) else value[index : index + 1]
        else:
            if isinstance(value, (list, tuple)):
                import torch

                value = torch.cat(list(value))
            start = sum(sizes[:index])
            one[key] = value[start : start + sizes[index]]
    mask = one.get("perceiver_attention_mask")
    if mask is not None:
        keep = mask[0].bool()
        for key in [k for k in one if k.startswith("perceiver_")]:
            if one[key].dim() == 2 and one[key].shape[1] == keep.shape[0]:
                one[key] = one[key][:, keep]
    return one


__all__ = [
    "ARCHITECTURE",
    "PREFIXES",
    "STACKED",
    "TARGET_ARCHITECTURES",
    "UnservableError",
    "field_sizes",
    "image_feature_counts",
    "image_inputs",
    "largest_image_size",
    "check_servable",
    "target_architecture",
    "target_hf_config",
    "vllm_llm_parameters",
    "vllm_weight_name",
]
