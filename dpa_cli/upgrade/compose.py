"""The configs of an upgrade: a composed perceiver's VLM config, and the DPA config itself.

A composed perceiver (`vit=...,lm=...`) is a small VLM of the ViT source's own LLaVA family: its vision
tower and image settings (AnyRes tiling included), the small LM as text model, a fresh projector phi_p.
"""

from __future__ import annotations

from typing import Any

from dpa_cli.errors import BadInputError
from dpa_cli.upgrade.sources import Checkpoint
from dpa_cli.upgrade.tokens import Placeholder

COMPOSABLE_VIT_FAMILIES = ("llava", "llava_next", "llava_onevision")
# Fields that describe one saved checkpoint rather than the architecture.
_PROVENANCE = ("architectures", "auto_map", "_name_or_path", "transformers_version", "dtype", "torch_dtype")


def _architecture(config: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in config.items() if k not in _PROVENANCE}


def text_config(checkpoint: Checkpoint, vocab_size: int | None = None) -> dict[str, Any]:
    """A checkpoint's language-model config as a dict with its model_type and the effective tie flag."""
    config = _architecture(checkpoint.family.text_config(checkpoint.config))
    if "model_type" not in config:
        raise BadInputError(f"{checkpoint.path}/config.json: its text config names no model_type")
    top_tie = checkpoint.config.get("tie_word_embeddings")
    config["tie_word_embeddings"] = bool(config.get("tie_word_embeddings", top_tie or False) or top_tie)
    if vocab_size is not None:
        config["vocab_size"] = vocab_size
    return config


def composed_perceiver_config(vit: Checkpoint, lm: Checkpoint, image: Placeholder, vocab_size: int) -> dict[str, Any]:
    """The VLM config of `vit`'s family with `lm` as its text model and `image` as its image token."""
    if vit.family.name not in COMPOSABLE_VIT_FAMILIES:
        raise BadInputError(
            f"{vit.path}: composing a perceiver takes its ViT from a {'/'.join(COMPOSABLE_VIT_FAMILIES)} "
            f"checkpoint, but this is {vit.family.name}",
            hint="use an existing small VLM as --perceiver, or vit=<a LLaVA-family checkpoint>",
        )
    config = _architecture(vit.config)
    config.pop("image_token_index", None)
    small_lm = text_config(lm, vocab_size)
    # Only the perceiver's base model is kept (no LM head), so there is nothing to tie.
    small_lm["tie_word_embeddings"] = False
    config.update(text_config=small_lm, image_token_id=image.id, tie_word_embeddings=False)
    return config


def dpa_config(
    perceiver_config: dict[str, Any],
    target_text: dict[str, Any],
    image: Placeholder,
    perceiver_image: Placeholder,
    markers: list[int],
    options: Any,
    target_markers: list[int] | None = None,
) -> Any:
    """The DPAConfig of the upgraded model. `target_markers`: the target's start and end marker ids that are
    image slots with `image+markers` (dpa_cli.upgrade.encoding.target_markers)."""
    from dpa_cli.model import DPAConfig

    if options.feature_span == "image+markers" and not markers:
        paper = getattr(options, "encoding", "dpa") == "paper"
        raise BadInputError(
            f"{'--encoding paper' if paper else '--feature-span image+markers'}: this perceiver "
            f"({perceiver_config.get('model_type')}) has no image marker tokens",
            hint="use a Qwen-VL-family perceiver, or --encoding dpa" if paper else "use --feature-span image",
        )
    return DPAConfig(
        perceiver_config=perceiver_config,
        text_config=target_text,
        projector_type=options.projector,
        feature_span=options.feature_span,
        early_fusion=options.early_fusion,
        encoding=getattr(options, "encoding", "dpa"),
        target_marker_token_ids=list(target_markers or []),
        image_token_id=image.id,
        perceiver_image_token_id=perceiver_image.id,
        perceiver_marker_token_ids=markers,
        tie_word_embeddings=target_text["tie_word_embeddings"],
    )
