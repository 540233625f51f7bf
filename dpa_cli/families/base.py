"""The family adapter protocol: how one kind of checkpoint is recognised and how its keys split into parts.

A family is a declaration (a frozen `Family`): the config keys that give its sub-configs and token ids, and
one or more `KeyLayout`s mapping each component (vision tower, projector, language model, LM head, extras)
to the safetensors key prefixes that hold it. Weight surgery copies or drops whole components, so every
key must land in exactly one component; keys that fit none are reported, never skipped.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from enum import Enum
from typing import Any


class Role(str, Enum):
    """What a checkpoint of this family can be in a DPA upgrade."""

    TARGET = "target"
    PERCEIVER = "perceiver"


class Component(str, Enum):
    """The parts surgery moves as wholes. `EXTRA` holds loose parameters such as LLaVA-NeXT's image_newline."""

    VISION = "vision"
    PROJECTOR = "projector"
    LANGUAGE_MODEL = "language_model"
    LM_HEAD = "lm_head"
    EXTRA = "extra"
    PERCEIVER = "perceiver"


# Logical field -> config keys to try in order (GPT-2 style configs say n_embd / n_layer).
TEXT_FIELDS: Mapping[str, tuple[str, ...]] = {
    "hidden_size": ("hidden_size", "n_embd", "d_model"),
    "num_layers": ("num_hidden_layers", "n_layer", "num_layers"),
    "vocab_size": ("vocab_size",),
}
VISION_FIELDS: Mapping[str, tuple[str, ...]] = {
    "hidden_size": ("hidden_size",),
    "num_layers": ("num_hidden_layers",),
    "image_size": ("image_size",),
    "patch_size": ("patch_size",),
}


def _matches(key: str, prefix: str) -> bool:
    """Prefixes name whole modules or parameters: `model.norm` matches `model.norm.weight`, not `model.normx`."""
    return key == prefix or key.startswith(prefix + ".")


@dataclass(frozen=True)
class KeyLayout:
    """One naming scheme of a family's weights: component -> key prefixes (no trailing dot).

    Within a layout a key belongs to the component of its longest matching prefix, so a projector nested
    in the vision tower (`visual.merger` inside `visual`) is still its own component.
    """

    name: str
    components: Mapping[Component, tuple[str, ...]]

    def __post_init__(self) -> None:
        seen: dict[str, Component] = {}
        for component, prefixes in self.components.items():
            for prefix in prefixes:
                if prefix in seen or prefix.endswith("."):
                    raise ValueError(f"layout {self.name!r}: prefix {prefix!r} is repeated or ends with a dot")
                seen[prefix] = component

    def match(self, key: str) -> tuple[Component, str] | None:
        """The component claiming `key` and the (longest) prefix that matched, or None.

        Surgery renames with it: `key[len(prefix):]` is the key inside the component.
        """
        best: tuple[Component, str] | None = None
        for component, prefixes in self.components.items():
            for prefix in prefixes:
                if (best is None or len(prefix) > len(best[1])) and _matches(key, prefix):
                    best = (component, prefix)
        return best

    def component_of(self, key: str) -> Component | None:
        found = self.match(key)
        return found[0] if found else None

    def prefixes(self, component: Component) -> tuple[str, ...]:
        return tuple(self.components.get(component, ()))


@dataclass(frozen=True)
class KeySplit:
    """A checkpoint's keys sorted into components under the layout that fits them best."""

    layout: KeyLayout
    components: dict[Component, list[str]]
    unmapped: list[str]

    def keys(self, component: Component) -> list[str]:
        return self.components.get(component, [])


@dataclass(frozen=True)
class Composition:
    """How a ViT source of a family composes a perceiver (`--perceiver vit=...,lm=...`): which of its tensors are
    kept (in-memory prefix -> DPA name) and which DPA tensors start fresh (phi_p; a kept part the small LM needs
    at another width). `paper`: the composition is the DPA paper's skeleton (Qwen3 blocks under M-RoPE)."""

    vit: Mapping[str, str]
    new: tuple[str, ...]
    paper: bool = False


LLAVA_COMPOSITION = Composition(
    {"model.vision_tower.": "model.perceiver.vision_tower."},
    ("model.perceiver.multi_modal_projector.", "model.perceiver.image_newline"),
)
PAPER_COMPOSITION = Composition(
    {"model.visual.": "model.perceiver.visual."}, ("model.perceiver.visual.merger.mlp.",), True
)


@dataclass(frozen=True, eq=False)
class Family:
    """One checkpoint family, declared as data. See the module docstring.

    Families are singletons in the registry: they compare and hash by identity.
    """

    name: str
    roles: frozenset[Role]
    layouts: tuple[KeyLayout, ...]
    description: str = ""
    # Detection: a config matches on any of these, unless `detector` replaces the rule.
    model_types: tuple[str, ...] = ()
    architectures: tuple[str, ...] = ()
    config_markers: tuple[str, ...] = ()
    detector: Callable[[Mapping[str, Any]], bool] | None = None
    # Sub-configs: None means "the top-level config is the text config" / "no ViT config in this file".
    text_config_key: str | None = "text_config"
    vision_config_key: str | None = "vision_config"
    text_fields: Mapping[str, tuple[str, ...]] = field(default_factory=lambda: dict(TEXT_FIELDS))
    vision_fields: Mapping[str, tuple[str, ...]] = field(default_factory=lambda: dict(VISION_FIELDS))
    # Hooks for a family whose text / vision config is not a plain sub-config (original LLaVA, official DPA formats).
    text_config_fn: Callable[[Mapping[str, Any]], dict[str, Any]] | None = None
    vision_config_fn: Callable[[Mapping[str, Any]], dict[str, Any] | None] | None = None
    # Families whose config.json transformers cannot build from (the DPA paper's remote-code formats, a qwen2_5_vl
    # config with Qwen3 text): the config of the model dpa builds instead, a config of a family dpa knows.
    native_config: Callable[[Mapping[str, Any]], dict[str, Any]] | None = None
    # What the weights say that the config does not (e.g. Qwen3 q/k norms under a Qwen2.5 config): a message, or None.
    weights_check: Callable[[Mapping[str, Any], Iterable[str]], str | None] | None = None
    # The official format saves pickles (`pytorch_model.bin`): read with weights_only=True, never unpickled freely.
    pickled_weights: bool = False
    # The ViT lives elsewhere (original LLaVA names it by hub id in this key) and its width in another.
    external_vision_key: str | None = None
    vision_width_key: str | None = None
    image_token_keys: tuple[str, ...] = ("image_token_id", "image_token_index")
    default_image_token_id: int | None = None
    marker_token_keys: tuple[str, ...] = ()
    projector_type_key: str | None = None
    # Where transformers' Auto mapping has no class for the ViT's model_type (Qwen2-VL's), name it here.
    vision_class: str | None = None
    # An upgraded checkpoint nests a whole VLM config here (DPA's perceiver); it is described recursively.
    perceiver_config_key: str | None = None
    # Surgery: the transformers Auto class that builds this checkpoint (on the meta device) so that keys are
    # renamed the way transformers renames them when loading; families transformers cannot build give
    # `memory_names` instead: (config, disk keys) -> {disk key: the equivalent transformers in-memory name}.
    auto_class: str | None = "AutoModelForImageTextToText"
    memory_names: Callable[[Mapping[str, Any], Iterable[str]], dict[str, str]] | None = None
    # Composition: how this family's ViT composes a perceiver with a text model; None: it cannot be the ViT source.
    composition: Composition | None = None

    # --- detection -------------------------------------------------------------------------------
    def detect(self, config: Mapping[str, Any]) -> bool:
        """Whether `config` (a parsed config.json) belongs to this family."""
        if self.detector is not None:
            return self.detector(config)
        architectures = set(config.get("architectures") or ())
        return (
            config.get("model_type") in self.model_types
            or bool(architectures & set(self.architectures))
            or any(marker in config for marker in self.config_markers)
        )

    # --- configs ---------------------------------------------------------------------------------
    def text_config(self, config: Mapping[str, Any]) -> dict[str, Any]:
        """The language model's config dict (the top-level dict for plain causal LMs)."""
        if self.text_config_fn is not None:
            return self.text_config_fn(config)
        if self.text_config_key is None:
            return dict(config)
        sub = config.get(self.text_config_key)
        if sub is None and any(key in config for key in self.text_fields.get("hidden_size", ())):
            # Older hub configs (Qwen2-VL, Qwen2.5-VL before 2025) keep the text fields at the top level.
            return dict(config)
        return dict(sub or {})

    def vision_config(self, config: Mapping[str, Any]) -> dict[str, Any] | None:
        """The vision tower's config dict, or None when this file does not hold one."""
        if self.vision_config_fn is not None:
            return self.vision_config_fn(config)
        if self.vision_config_key is None:
            return None
        return dict(config.get(self.vision_config_key) or {})

    def text_field(self, text_config: Mapping[str, Any], name: str) -> Any:
        return _first(text_config, self.text_fields.get(name, (name,)))

    def vision_field(self, vision_config: Mapping[str, Any], name: str) -> Any:
        return _first(vision_config, self.vision_fields.get(name, (name,)))

    def image_token_id(self, config: Mapping[str, Any]) -> int | None:
        """The id of the image placeholder token in this checkpoint's tokenizer."""
        found = _first(config, self.image_token_keys)
        return found if found is not None else self.default_image_token_id

    def marker_token_ids(self, config: Mapping[str, Any]) -> tuple[int, ...]:
        """Ids of the tokens wrapping each image (Qwen's <|vision_start|>, <|vision_end|>), in order."""
        return tuple(config[key] for key in self.marker_token_keys if config.get(key) is not None)

    # --- keys ------------------------------------------------------------------------------------
    def pick_layout(self, keys: Iterable[str]) -> KeyLayout:
        """The layout that classifies the most keys; on a tie, the one declared first."""
        keys = list(keys)
        scores = [sum(layout.component_of(k) is not None for k in keys) for layout in self.layouts]
        return self.layouts[scores.index(max(scores))]

    def split_keys(self, keys: Iterable[str], layout: KeyLayout | None = None) -> KeySplit:
        """Sort `keys` into components; keys no prefix claims go to `unmapped`."""
        keys = list(keys)
        layout = layout or self.pick_layout(keys)
        components: dict[Component, list[str]] = {}
        unmapped: list[str] = []
        for key in keys:
            component = layout.component_of(key)
            if component is None:
                unmapped.append(key)
            else:
                components.setdefault(component, []).append(key)
        return KeySplit(layout, components, unmapped)

    def layout(self, name: str) -> KeyLayout:
        for layout in self.layouts:
            if layout.name == name:
                return layout
        raise KeyError(f"family {self.name!r} has no layout {name!r}; it has {[x.name for x in self.layouts]}")


def _first(mapping: Mapping[str, Any], keys: Iterable[str]) -> Any:
    for key in keys:
        if mapping.get(key) is not None:
            return mapping[key]
    return None


_LAYER_INDEX = re.compile(r"(?:^|\.)(?:layers|blocks|h|layer)\.(\d+)\.")


def count_layers(keys: Iterable[str]) -> int:
    """Distinct block indices in `keys` (`...layers.N.` / `...blocks.N.`): the depth the weights hold."""
    return len({match.group(1) for key in keys if (match := _LAYER_INDEX.search(key))})


Renames = tuple[tuple[re.Pattern[str], str], ...]


def rename_keys(keys: Iterable[str], renames: Renames) -> dict[str, str]:
    """{key: its new name} by the first (pattern, replacement) that matches it; keys none matches are left out.
    Families transformers has no class for declare their weights' in-memory names this way."""
    names = {}
    for key in keys:
        for pattern, replacement in renames:
            if pattern.match(key):
                names[key] = pattern.sub(replacement, key, count=1)
                break
    return names


def layout(name: str, **components: tuple[str, ...] | str) -> KeyLayout:
    """Shorthand for declarations: `layout("hub", vision="visual", projector=("visual.merger",))`."""
    return KeyLayout(
        name, {Component(part): (p,) if isinstance(p, str) else tuple(p) for part, p in components.items()}
    )
