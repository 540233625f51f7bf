"""Family adapters: detection from config.json and exact key classification, for every layout on disk."""

from __future__ import annotations

import importlib
import json
import pkgutil

import pytest

import dpa_cli.families as families
from dpa_cli.errors import UnknownFamilyError
from dpa_cli.families import FAMILIES, Component, Family, KeyLayout, Role, detect_family, get_family
from tests.factories import LAYOUTS, SPECS, read_keys

# (spec, layout) pairs that exist: hand-written checkpoints have one layout only.
CASES = [(name, layout) for name, spec in SPECS.items() for layout in LAYOUTS if spec.prefix or layout == "hub"]


def _config(folder):
    return json.loads((folder / "config.json").read_text())


@pytest.mark.parametrize(("name", "layout"), CASES)
def test_every_key_lands_in_exactly_one_component(tiny_checkpoint, name, layout):
    folder = tiny_checkpoint(name, layout=layout)
    family = detect_family(_config(folder))
    assert family.name == SPECS[name].family
    keys = list(read_keys(folder))
    split = family.split_keys(keys)
    assert split.unmapped == []
    assert sorted(k for part in split.components.values() for k in part) == sorted(keys)
    assert split.keys(Component.LANGUAGE_MODEL), "a language model is always there"


@pytest.mark.parametrize(
    ("name", "layout", "expected"),
    [
        ("llava", "hub", "hub"),
        ("llava", "save_pretrained", "hub"),
        ("llava", "v5", "v5"),
        ("llava_next", "hub", "hub"),
        ("llava_next", "v5", "v5"),
        ("qwen2_vl", "hub", "hub"),
        ("qwen2_5_vl", "v5", "v5"),
        ("qwen3_vl", "hub", "v5"),
        ("causal_lm_llama", "hub", "v5"),
        ("llava_original_qwen", "hub", "original"),
    ],
)
def test_the_layout_matching_the_names_on_disk_is_picked(tiny_checkpoint, name, layout, expected):
    folder = tiny_checkpoint(name, layout=layout)
    assert detect_family(_config(folder)).pick_layout(read_keys(folder)).name == expected


def test_a_projector_nested_in_the_vit_is_its_own_component():
    qwen = get_family("qwen3_vl")
    layout = qwen.layout("v5")
    assert layout.component_of("model.visual.merger.linear_fc1.weight") is Component.PROJECTOR
    assert layout.component_of("model.visual.deepstack_merger_list.0.norm.weight") is Component.PROJECTOR
    assert layout.component_of("model.visual.blocks.0.attn.qkv.weight") is Component.VISION
    assert layout.match("model.visual.merger.norm.bias") == (Component.PROJECTOR, "model.visual.merger")
    # Prefixes match whole path segments only.
    assert get_family("causal_lm").layout("v5").component_of("modelx.weight") is None


def test_foreign_and_mixed_keys_are_reported_not_skipped(tiny_checkpoint):
    keys = list(read_keys(tiny_checkpoint("llava_next")))
    split = get_family("llava_next").split_keys([*keys, "model.language_model.norm.weight", "stray.bias"])
    assert split.layout.name == "hub"
    assert split.unmapped == ["model.language_model.norm.weight", "stray.bias"]


def test_llava_1_5_original_configs_are_not_taken_for_llava_hf(tiny_checkpoint):
    config = _config(tiny_checkpoint("llava_v15"))
    assert config["model_type"] == "llava"
    assert detect_family(config).name == "llava_original"
    assert detect_family({"model_type": "llava", "architectures": ["LlavaForConditionalGeneration"]}).name == "llava"


@pytest.mark.parametrize(
    "config",
    [
        {"model_type": "mystery_vlm", "architectures": ["MysteryForConditionalGeneration"]},
        # gemma3 is in transformers' causal-LM mapping, but a VLM config is never a plain causal LM.
        {"model_type": "gemma3", "vision_config": {}, "text_config": {}},
    ],
)
def test_unknown_families_are_an_error_listing_the_known_ones(config):
    with pytest.raises(UnknownFamilyError) as caught:
        detect_family(config, where="some/config.json")
    assert "some/config.json" in caught.value.message and repr(config["model_type"]) in caught.value.message
    assert all(name in caught.value.hint for name in FAMILIES)


def test_roles_are_as_the_method_needs_them():
    targets = {name for name, f in FAMILIES.items() if Role.TARGET in f.roles}
    perceivers = {name for name, f in FAMILIES.items() if Role.PERCEIVER in f.roles}
    # The paper's skeleton, its official baseline target and perceiver formats: each can be either.
    paper = {"qwen2_5_vl_qwen3", "qwen_custom_vl_hw_new", "llava_baseline"}
    assert targets == {"llava", "llava_next", "llava_onevision", "llava_original", "causal_lm", *paper}
    assert perceivers == {
        "qwen2_vl",
        "qwen2_5_vl",
        "qwen3_vl",
        "llava",
        "llava_next",
        "llava_onevision",
        "idefics3",
        "smolvlm",
        *paper,
    }
    assert FAMILIES["dpa"].roles == FAMILIES["forward_visual_tokens_llava_arch"].roles == frozenset()
    assert list(FAMILIES)[-1] == "causal_lm", "the catch-all is detected last"


def test_every_declared_family_is_registered_under_its_name():
    declared = []
    for module in pkgutil.iter_modules(families.__path__):
        values = vars(importlib.import_module(f"dpa_cli.families.{module.name}")).values()
        declared += [v for v in values if isinstance(v, Family)]
    assert {f.name: f for f in declared} == FAMILIES


def test_token_ids_and_sub_configs_come_from_the_declared_keys(tiny_checkpoint):
    qwen = _config(tiny_checkpoint("qwen2_5_vl"))
    family = detect_family(qwen)
    assert family.image_token_id(qwen) == qwen["image_token_id"]
    assert family.marker_token_ids(qwen) == (qwen["vision_start_token_id"], qwen["vision_end_token_id"])
    assert family.text_config(qwen)["hidden_size"] == 32
    # Pre-2025 Qwen2-VL hub configs keep the text fields at the top level.
    flat = {"model_type": "qwen2_vl", "hidden_size": 1536, "num_hidden_layers": 28, "vision_config": {}}
    assert get_family("qwen2_vl").text_config(flat)["hidden_size"] == 1536
    original = _config(tiny_checkpoint("llava_original_qwen"))
    assert get_family("llava_original").text_config(original)["model_type"] == "qwen2"
    assert get_family("llava_original").image_token_id(original) == -200
    assert get_family("llava_original").vision_config(original) is None


def test_a_layout_refuses_ambiguous_prefixes():
    with pytest.raises(ValueError, match="repeated"):
        KeyLayout("bad", {Component.VISION: ("visual",), Component.PROJECTOR: ("visual",)})
    with pytest.raises(UnknownFamilyError, match="known families"):
        get_family("nope")


@pytest.fixture(scope="module")
def perceiver_configs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[dict, str]]:
    """{perceiver family: (a config.json of it, the model_type a DPA config records for it as perceiver)}: the tiny
    checkpoints', and the official formats' (whose hub ids resolve through a tiny local hub cache)."""
    from tests.factories import paper_hub_cache, tiny_config
    from tests.official_layouts import baseline_config, hw_config

    configs = {}
    for name, spec in SPECS.items():
        config = tiny_config(name)
        configs.setdefault(spec.family, config if isinstance(config, dict) else config.to_dict())
    configs.update(qwen_custom_vl_hw_new=hw_config(), llava_baseline=baseline_config())
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("HF_HUB_CACHE", str(paper_hub_cache(tmp_path_factory.mktemp("hub"))))
        native = {name: FAMILIES[name].native_config for name in configs}
        return {name: (c, (native[name](c) if native[name] else c)["model_type"]) for name, c in configs.items()}


@pytest.mark.parametrize("name", sorted(n for n, f in FAMILIES.items() if Role.PERCEIVER in f.roles))
def test_every_perceiver_family_has_every_fact_a_perceiver_needs(name, perceiver_configs):
    """A family that may be a perceiver declares all a perceiver needs: the ViT kept in every key layout, the
    processor's image rule for the model type its DPA config records (remote code, so the rule lives there),
    and, when its ViT composes perceivers, kept prefixes inside its ViT; adding a family without one fails here."""
    from dpa_cli.model.processing_dpa import PERCEIVER_FAMILIES

    family = FAMILIES[name]
    config, recorded = perceiver_configs[name]
    assert detect_family(config) is family
    for key_layout in family.layouts:
        assert key_layout.prefixes(Component.VISION), f"{name}/{key_layout.name}: no ViT to keep"
    assert recorded in PERCEIVER_FAMILIES, f"{name}: no processor rule for perceiver model_type {recorded!r}"
    if family.composition is not None:
        vit = family.layout("v5").prefixes(Component.VISION)
        for kept in family.composition.vit:
            assert any(kept.startswith(prefix) or prefix.startswith(kept) for prefix in vit), (name, kept)
        assert all(new.startswith("model.perceiver.") for new in family.composition.new)
