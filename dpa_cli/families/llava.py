"""LLaVA as transformers ships it (llava-hf/*): a CLIP or SigLIP ViT, a two-layer MLP projector, any text LM."""

from __future__ import annotations

from dpa_cli.families.base import LLAVA_COMPOSITION, Family, KeyLayout, Role, layout


def llava_layouts(*extra: str) -> tuple[KeyLayout, KeyLayout]:
    """The v5 in-memory names, and the hub names `save_pretrained` still writes and llava-hf repos hold.

    `extra` names loose parameters beside the three towers (LLaVA-NeXT's `image_newline`).
    """
    v5 = layout(
        "v5",
        vision="model.vision_tower",
        projector="model.multi_modal_projector",
        language_model="model.language_model",
        lm_head="lm_head",
        extra=tuple(f"model.{name}" for name in extra),
    )
    hub = layout(
        "hub",
        vision="vision_tower",  # real repos: vision_tower.vision_model.*; v5 saves vision_tower.* alike
        projector="multi_modal_projector",
        language_model="language_model.model",
        lm_head="language_model.lm_head",
        extra=extra,
    )
    return v5, hub


LLAVA = Family(
    name="llava",
    description="LlavaForConditionalGeneration: ViT -> 2-layer MLP -> LLM, one fixed-size image",
    roles=frozenset({Role.TARGET, Role.PERCEIVER}),
    composition=LLAVA_COMPOSITION,
    layouts=llava_layouts(),
    model_types=("llava",),  # original-repo LLaVA-1.5 also says "llava": llava_original is detected first
    projector_type_key="projector_hidden_act",
)
