"""The five parts of a DPA model, as the recipe and the freeze policy name them, found from a parameter name.

`vit`, `phi_p` (the perceiver's own projector), `perceiver_lm` (its language blocks), `phi` (the alignment
projector) and `llm` (the target language model with its LM head).
"""

from __future__ import annotations

import re

from dpa_cli.families import Component, Family, detect_family

PARTS = ("vit", "phi_p", "perceiver_lm", "phi", "llm")
PHI_PREFIX = "model.multi_modal_projector."
PERCEIVER_PREFIX = "model.perceiver."
# PEFT wraps the model (`base_model.model.`) and its targets (`.base_layer`); names are read through them.
_PEFT = re.compile(r"^base_model\.model\.")
_PERCEIVER_PARTS = {Component.VISION: "vit", Component.PROJECTOR: "phi_p", Component.EXTRA: "phi_p"}


def perceiver_family(config) -> Family:
    """The family of a DPA model's perceiver, from its config (a DPAConfig or its dict)."""
    perceiver = config["perceiver_config"] if isinstance(config, dict) else config.perceiver_config.to_dict()
    return detect_family(perceiver)


def part_of(name: str, family: Family) -> str:
    """The part a parameter of a DPA model belongs to; `family` is the perceiver's."""
    name = _PEFT.sub("", name)
    if name.startswith(PHI_PREFIX):
        return "phi"
    if name.startswith(PERCEIVER_PREFIX):
        component = family.layout("v5").component_of("model." + name[len(PERCEIVER_PREFIX) :])
        return _PERCEIVER_PARTS.get(component, "perceiver_lm")
    return "llm"
