"""The DPA paper's skeleton: Qwen2.5-VL's ViT with its merger sized to the LM width + Qwen3 blocks driven by M-RoPE.

dpa builds it as `qwen2_5_vl_qwen3` (dpa_cli/model/configuration_paper_dpa.py). Three spellings are read:
- dpa's own `qwen2_5_vl_qwen3`;
- the official baseline target `qwen_custom_vl_hw_new` (official `qwen_config_dir/modeling_qwen_custom_vl_hw.py`,
  never run: a Qwen2_5_VL config whose text_config is Qwen3-4B dressed as `qwen2_5_vl_text`);
- a stock `qwen2_5_vl` config whose text config is Qwen3 (transformers would silently build Qwen2.5 blocks:
  q/k/v bias, no q/k norm).
Their weights use Qwen2.5-VL's names, legacy (`visual.*`, `model.layers.*`) or v5 (`model.visual.*`,
`model.language_model.*`); `memory_names` maps both (and the official perceiver's `model.vlm.*`) to v5.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from typing import Any

from dpa_cli.families.base import PAPER_COMPOSITION, VISION_FIELDS, Family, Role, layout, rename_keys

# As in dpa_cli/model/configuration_paper_dpa.py (not imported: that pulls in torch, and `inspect` never needs it).
MODEL_TYPE = "qwen2_5_vl_qwen3"
TEXT_MODEL_TYPE = "qwen2_5_vl_qwen3_text"
OWN_CLASSES = {MODEL_TYPE: "Qwen2_5_VLQwen3Model", TEXT_MODEL_TYPE: "Qwen2_5_VLQwen3TextModel"}
TOKEN_KEYS = ("image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id")
# Qwen2.5-VL's sections for head_dim 128 (Qwen2_5_VLRotaryEmbedding's default; Qwen2.5-VL-3B's config says so).
DEFAULT_MROPE = [16, 24, 24]
# Keys that describe a saved file or a tokenizer, not the architecture; dropped when a config is rebuilt.
_NOT_ARCHITECTURE = (
    "architectures",
    "auto_map",
    "_name_or_path",
    "transformers_version",
    "torch_dtype",
    "dtype",
    "model_type",
    "image_token_id",
    "video_token_id",
    "vision_token_id",
    "rope_scaling",
    "rope_theta",
    "rope_parameters",
)


def text_part(config: Mapping[str, Any]) -> dict[str, Any]:
    """A VLM config's text fields: `text_config`, or the top level of older Qwen2.5-VL configs."""
    sub = config.get("text_config")
    return dict(sub) if isinstance(sub, Mapping) else dict(config)


def rope_parameters(text: Mapping[str, Any]) -> dict[str, Any]:
    """A text config's RoPE as v5 `rope_parameters`, from any spelling (`rope_parameters`, or `rope_theta` +
    `rope_scaling: {type: mrope|default, mrope_section}`); "mrope" is default frequencies recomposed per section."""
    rope = dict(text.get("rope_parameters") or text.get("rope_scaling") or {})
    kind = rope.pop("type", None)
    rope.setdefault("rope_type", kind or "default")
    if rope["rope_type"] == "mrope":
        rope["rope_type"] = "default"
    if "rope_theta" not in rope and text.get("rope_theta") is not None:
        rope["rope_theta"] = text["rope_theta"]
    return rope


def skeleton_text(lm: Mapping[str, Any], mrope_section: list[int], **rope: Any) -> dict[str, Any]:
    """A Qwen3 text config dict as the skeleton's text config: the same blocks, M-RoPE with `mrope_section`;
    `rope` overrides (the official perceiver takes theta from its own top-level config, LB:552-553)."""
    text = {k: v for k, v in lm.items() if k not in _NOT_ARCHITECTURE}
    if text.get("head_dim") is None and text.get("hidden_size") and text.get("num_attention_heads"):
        text["head_dim"] = text["hidden_size"] // text["num_attention_heads"]  # Qwen3's own fallback (no 128 default)
    text["rope_parameters"] = {**rope_parameters(lm), **rope, "mrope_section": list(mrope_section)}
    text["model_type"] = TEXT_MODEL_TYPE
    return text


def skeleton_config(vlm: Mapping[str, Any], text: dict[str, Any], tie: bool) -> dict[str, Any]:
    """The skeleton's config: `vlm`'s vision tower and token ids, `text` as the LM. The merger outputs the LM
    width: where that differs from `vlm`'s, it is the official "rebuilt merger" (LB:559-570), the stock
    Linear(4d, 4d) -> GELU -> Linear(4d, d_lm) at the new width, with fresh weights."""
    vision = {k: v for k, v in (vlm.get("vision_config") or {}).items() if k not in _NOT_ARCHITECTURE}
    vision.update(model_type="qwen2_5_vl_vision", out_hidden_size=text["hidden_size"])
    ids = {key: vlm[key] for key in TOKEN_KEYS if vlm.get(key) is not None}
    text = {**text, "tie_word_embeddings": tie}
    return {"model_type": MODEL_TYPE, "vision_config": vision, "text_config": text, "tie_word_embeddings": tie, **ids}


def plain_qwen3(text: Mapping[str, Any]) -> dict[str, Any]:
    """The skeleton's text config as a plain `qwen3` one: the LM of a target, which the DPA model drives with
    1-D positions as the official thinker (a stock Qwen3ForCausalLM, FVT:120-121). Text gets equal t/h/w rows
    under M-RoPE, which is 1-D RoPE exactly, so only image positions change."""
    rope = {k: v for k, v in rope_parameters(text).items() if k != "mrope_section"}
    return {**{k: v for k, v in text.items() if k != "rope_parameters"}, "model_type": "qwen3", "rope_parameters": rope}


def _tie(config: Mapping[str, Any], default: bool) -> bool:
    """The tie flag at the top, else in the text config (pre-v5 saves), else the format's default."""
    for source in (config, text_part(config)):
        if isinstance(source.get("tie_word_embeddings"), bool):
            return source["tie_word_embeddings"]
    return default


def _native(default_tie: bool):
    def native(config: Mapping[str, Any]) -> dict[str, Any]:
        if config.get("model_type") == MODEL_TYPE:
            return {k: v for k, v in config.items() if k != "architectures"}
        text = text_part(config)
        section = rope_parameters(text).get("mrope_section") or DEFAULT_MROPE
        return skeleton_config(config, skeleton_text(text, section), _tie(config, default_tie))

    return native


def is_qwen3_text(text: Mapping[str, Any]) -> bool:
    """Whether a text config describes Qwen3 blocks: says so, or its explicit head_dim does not split the width
    (Qwen2.5 configs have none; Qwen3-0.6B / 4B: 128 x 16 / 32 heads != 1024 / 2560)."""
    architectures = text.get("architectures") or ()
    if text.get("model_type") == "qwen3" or any(str(a).startswith("Qwen3") for a in architectures):
        return True
    sizes = [text.get(k) for k in ("head_dim", "num_attention_heads", "hidden_size")]
    return all(isinstance(v, int) for v in sizes) and sizes[0] * sizes[1] != sizes[2]


def _qwen2_5_vl_with_qwen3(config: Mapping[str, Any]) -> bool:
    return config.get("model_type") in (MODEL_TYPE, "qwen2_5_vl") and (
        config.get("model_type") == MODEL_TYPE or is_qwen3_text(text_part(config))
    )


def qwen3_blocks_under_qwen2_5(config: Mapping[str, Any], keys: Iterable[str]) -> str | None:
    """A stock qwen2_5_vl config over Qwen3 weights (q/k norms): transformers would build Qwen2.5 blocks."""
    found = next((key for key in keys if ".self_attn.q_norm." in key), None)
    if found is None:
        return None
    return (
        f"its language blocks hold Qwen3 q/k norms ({found}), but config.json describes Qwen2.5 blocks; "
        'set "model_type": "qwen3" in its text_config so dpa builds Qwen3 blocks with M-RoPE'
    )


_RENAMES = (
    (re.compile(r"^model\.vlm\.(visual|language_model)\."), r"model.\1."),  # official llava_baseline
    (re.compile(r"^model\.(visual|language_model)\."), r"model.\1."),  # v5 names
    (re.compile(r"^visual\."), "model.visual."),  # legacy Qwen2.5-VL names (official conversion mapping, HW:3531)
    (re.compile(r"^model\.(?=(?:embed_tokens|layers|norm)\.)"), "model.language_model."),
    (re.compile(r"^lm_head\.weight$"), "lm_head.weight"),
)


def memory_names(config: Mapping[str, Any], keys: Iterable[str]) -> dict[str, str]:
    """{disk key: the name `Qwen2_5_VLQwen3ForConditionalGeneration` holds it under}; other keys are left out."""
    return rename_keys(keys, _RENAMES)


SKELETON_LAYOUTS = (
    layout(
        "v5",
        vision="model.visual",
        projector="model.visual.merger",
        language_model="model.language_model",
        lm_head="lm_head",
    ),
    layout(
        "hub",
        vision="visual",
        projector="visual.merger",
        language_model=("model.embed_tokens", "model.layers", "model.norm"),
        lm_head="lm_head",
    ),
)
_SKELETON = dict(
    roles=frozenset({Role.TARGET, Role.PERCEIVER}),
    layouts=SKELETON_LAYOUTS,
    image_token_keys=("image_token_id",),
    marker_token_keys=("vision_start_token_id", "vision_end_token_id"),
    vision_fields={**VISION_FIELDS, "num_layers": ("depth",), "image_size": ()},
    vision_class="Qwen2_5_VisionTransformerPretrainedModel",
    auto_class=None,
    memory_names=memory_names,
)

PAPER_VL = Family(
    name="qwen2_5_vl_qwen3",
    description="The DPA paper's skeleton: Qwen2.5-VL ViT -> merger at the LM width -> Qwen3 blocks with M-RoPE",
    detector=_qwen2_5_vl_with_qwen3,
    text_config_fn=lambda config: _native(False)(config)["text_config"],
    native_config=_native(False),
    composition=PAPER_COMPOSITION,
    **_SKELETON,
)
QWEN_CUSTOM_VL_HW = Family(
    name="qwen_custom_vl_hw_new",
    description="The paper's baseline target, official format (remote code not run): the paper skeleton",
    model_types=("qwen_custom_vl_hw_new",),
    # The official config class ties the head unless told otherwise (HW:273); its saves drop the tied copy.
    text_config_fn=lambda config: _native(True)(config)["text_config"],
    native_config=_native(True),
    **_SKELETON,
)
