"""Idefics3 and SmolVLM: a SigLIP-style ViT on image tiles, a pixel-shuffle connector, a Llama-style LM."""

from __future__ import annotations

from dpa_cli.families.base import Family, Role, layout

# The hub repos and transformers v5 use the same names.
_LAYOUT = layout(
    "v5", vision="model.vision_model", projector="model.connector", language_model="model.text_model", lm_head="lm_head"
)

IDEFICS3 = Family(
    name="idefics3",
    description="Idefics3ForConditionalGeneration: tiled ViT -> pixel-shuffle connector -> Llama",
    roles=frozenset({Role.PERCEIVER}),
    layouts=(_LAYOUT,),
    model_types=("idefics3",),
    image_token_keys=("image_token_id",),
)
SMOLVLM = Family(
    name="smolvlm",
    description="SmolVLMForConditionalGeneration: tiled ViT -> pixel-shuffle connector -> SmolLM2",
    roles=frozenset({Role.PERCEIVER}),
    layouts=(_LAYOUT,),
    model_types=("smolvlm",),
    image_token_keys=("image_token_id",),
)
