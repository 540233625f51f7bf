"""Checkpoints this tool writes: a DPA model (perceiver VLM -> alignment projector -> target LLM).

Already upgraded, so it is neither a target nor a perceiver. Its `perceiver_config` is a whole VLM config
of a known family, which `describe_model` describes recursively.
"""

from __future__ import annotations

from dpa_cli.families.base import Family, layout

DPA = Family(
    name="dpa",
    description="DPAForConditionalGeneration: perceiver VLM -> alignment projector phi -> target LLM",
    roles=frozenset(),
    layouts=(
        layout(
            "v5",
            perceiver="model.perceiver",
            projector="model.multi_modal_projector",
            language_model="model.language_model",
            lm_head="lm_head",
        ),
    ),
    model_types=("dpa",),
    architectures=("DPAForConditionalGeneration",),
    vision_config_key=None,
    image_token_keys=("image_token_id",),
    perceiver_config_key="perceiver_config",
)
