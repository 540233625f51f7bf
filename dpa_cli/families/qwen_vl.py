"""Qwen2-VL, Qwen2.5-VL and Qwen3-VL: a dynamic-resolution ViT whose merger is the projector, M-RoPE LLM.

The merger (and Qwen3-VL's deepstack mergers) sits inside the ViT module but is the projector for surgery:
the longest-prefix rule puts `visual.merger.*` in the projector and the rest of `visual.*` in the ViT.
"""

from __future__ import annotations

from dpa_cli.families.base import PAPER_COMPOSITION, VISION_FIELDS, Family, KeyLayout, Role, layout
from dpa_cli.families.paper import qwen3_blocks_under_qwen2_5

_MARKERS = ("vision_start_token_id", "vision_end_token_id")


def _v5(*mergers: str) -> KeyLayout:
    return layout(
        "v5",
        vision="model.visual",
        projector=tuple(f"model.visual.{m}" for m in mergers),
        language_model="model.language_model",
        lm_head="lm_head",
    )


def _hub(*mergers: str) -> KeyLayout:
    """Qwen2-VL / Qwen2.5-VL repos (and v5's `save_pretrained`) keep the pre-v5 names."""
    return layout(
        "hub",
        vision="visual",
        projector=tuple(f"visual.{m}" for m in mergers),
        language_model=("model.embed_tokens", "model.layers", "model.norm"),
        lm_head="lm_head",
    )


def _qwen(name: str, description: str, layouts: tuple[KeyLayout, ...], **fields) -> Family:
    return Family(
        name=name,
        description=description,
        roles=frozenset({Role.PERCEIVER}),
        layouts=layouts,
        model_types=(name,),
        image_token_keys=("image_token_id",),
        marker_token_keys=_MARKERS,
        **fields,
    )


QWEN2_VL = _qwen(
    "qwen2_vl",
    "Qwen2VLForConditionalGeneration: ViT (embed_dim wide) -> patch merger -> Qwen2 with M-RoPE",
    (_v5("merger"), _hub("merger")),
    # Qwen2-VL's vision `hidden_size` is the merger's output width; the ViT's own width is `embed_dim`.
    vision_fields={**VISION_FIELDS, "hidden_size": ("embed_dim",), "num_layers": ("depth",), "image_size": ()},
    vision_class="Qwen2VisionTransformerPretrainedModel",
)
QWEN2_5_VL = _qwen(
    "qwen2_5_vl",
    "Qwen2_5_VLForConditionalGeneration: windowed ViT -> patch merger -> Qwen2.5 with M-RoPE",
    (_v5("merger"), _hub("merger")),
    vision_fields={**VISION_FIELDS, "num_layers": ("depth",), "image_size": ()},
    # A qwen2_5_vl config whose text config says Qwen3 is the paper skeleton (families/paper.py); one that does not,
    # over Qwen3 weights, would silently become Qwen2.5 blocks: refused by name.
    weights_check=qwen3_blocks_under_qwen2_5,
    composition=PAPER_COMPOSITION,  # its ViT + a Qwen3 LM: the paper's perceiver
)
QWEN3_VL = _qwen(
    "qwen3_vl",
    "Qwen3VLForConditionalGeneration: ViT -> merger + deepstack mergers -> Qwen3 with interleaved M-RoPE",
    # Qwen3-VL repos already use the v5 names.
    (_v5("merger", "deepstack_merger_list"),),
    vision_fields={**VISION_FIELDS, "num_layers": ("depth",), "image_size": ()},
)
