"""LLaVA-OneVision (llava-hf/llava-onevision-*): SigLIP ViT, AnyRes-max tiling, Qwen2 text model."""

from __future__ import annotations

from dpa_cli.families.base import LLAVA_COMPOSITION, Family, Role
from dpa_cli.families.llava import llava_layouts

LLAVA_ONEVISION = Family(
    name="llava_onevision",
    description="LlavaOnevisionForConditionalGeneration: SigLIP -> 2-layer MLP -> Qwen2, AnyRes-max tiles",
    roles=frozenset({Role.TARGET, Role.PERCEIVER}),
    composition=LLAVA_COMPOSITION,
    layouts=llava_layouts("image_newline"),
    model_types=("llava_onevision",),
    projector_type_key="projector_hidden_act",
)
