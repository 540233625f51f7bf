"""LLaVA-NeXT (llava-hf/llava-v1.6-*, LLaVA-NeXT-style Qwen3 models): LLaVA plus AnyRes tiling and image_newline."""

from __future__ import annotations

from dpa_cli.families.base import LLAVA_COMPOSITION, Family, Role
from dpa_cli.families.llava import llava_layouts

LLAVA_NEXT = Family(
    name="llava_next",
    description="LlavaNextForConditionalGeneration: ViT -> 2-layer MLP -> LLM, AnyRes tiles + image_newline",
    roles=frozenset({Role.TARGET, Role.PERCEIVER}),
    composition=LLAVA_COMPOSITION,
    layouts=llava_layouts("image_newline"),
    model_types=("llava_next",),
    projector_type_key="projector_hidden_act",
)
