"""The configs of an upgrade: a composed perceiver's VLM config, and the DPA config itself.

A composed perceiver (`vit=...,lm=...`) is a small VLM of the ViT source's own family:
- from a LLaVA-family ViT, that family's VLM (its vision tower and image settings, AnyRes tiling included), the
  small LM as text model and a fresh projector phi_p;
- from a Qwen2.5-VL-family ViT, the DPA paper's skeleton (official `modeling_llava_baseline.py`, LB:542-572):
  the ViT and its merger (`ln_q` kept, the MLP fresh when the LM width differs, as LB:559-570 rebuilds it),
  Qwen3 blocks with their q/k norms, M-RoPE with the ViT source's `mrope_section` (LB:556-557).
"""

from __future__ import annotations

from typing import Any

from dpa_cli.errors import BadInputError
from dpa_cli.families import FAMILIES
from dpa_cli.families.base import Composition
from dpa_cli.families.paper import (
    DEFAULT_MROPE,
    PAPER_VL,
    TEXT_MODEL_TYPE,
    plain_qwen3,
    rope_parameters,
    skeleton_config,
    skeleton_text,
    text_part,
)
from dpa_cli.upgrade.sources import Checkpoint
from dpa_cli.upgrade.tokens import Placeholder

# Fields that describe one saved checkpoint rather than the architecture.
_PROVENANCE = ("architectures", "auto_map", "_name_or_path", "transformers_version", "dtype", "torch_dtype")


# The ViT families a perceiver is composed from (`--perceiver vit=...,lm=...`): those that declare how.
COMPOSABLE_VIT_FAMILIES = tuple(name for name, family in FAMILIES.items() if family.composition is not None)
PAPER_MARKERS = {"vision_start_token_id": "<|vision_start|>", "vision_end_token_id": "<|vision_end|>"}
PAPER_TOKENS = {**PAPER_MARKERS, "video_token_id": "<|video_pad|>"}


def composition(vit: Checkpoint) -> Composition:
    """The composition of `vit`'s family; any other ViT source is refused by name."""
    if vit.family.composition is None:
        raise BadInputError(
            f"{vit.path}: composing a perceiver takes its ViT from a {'/'.join(COMPOSABLE_VIT_FAMILIES)} "
            f"checkpoint, but this is {vit.disk_family.name}",
            hint="use an existing small VLM as --perceiver, or vit=<a LLaVA-family or Qwen2.5-VL checkpoint>",
        )
    return vit.family.composition


def pair_encoding(sources: Any) -> str:
    """The encoding an upgrade gets when --encoding is not given: `paper` for the paper's own pair (a perceiver of
    the paper's skeleton, existing or composed from a Qwen2.5-VL ViT, and a Qwen3 target LLM: the official DPA
    model's parts), the text the official code trains them on; `dpa` (the target's chat template) otherwise."""

    def qwen3(checkpoint: Checkpoint) -> bool:
        return text_config(checkpoint).get("model_type") == "qwen3"

    if sources.perceiver is not None:
        paper_perceiver = sources.perceiver.family is PAPER_VL
    else:
        paper_perceiver = composition(sources.vit).paper and qwen3(sources.lm)
    return "paper" if paper_perceiver and qwen3(sources.target) else "dpa"


def _architecture(config: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in config.items() if k not in _PROVENANCE}


def text_config(checkpoint: Checkpoint, vocab_size: int | None = None) -> dict[str, Any]:
    """A checkpoint's language-model config as a dict with its model_type and the effective tie flag."""
    config = _architecture(checkpoint.family.text_config(checkpoint.config))
    if config.get("model_type") == TEXT_MODEL_TYPE:
        config = plain_qwen3(config)
    if "model_type" not in config:
        raise BadInputError(f"{checkpoint.path}/config.json: its text config names no model_type")
    top_tie = checkpoint.config.get("tie_word_embeddings")
    config["tie_word_embeddings"] = bool(config.get("tie_word_embeddings", top_tie or False) or top_tie)
    if vocab_size is not None:
        config["vocab_size"] = vocab_size
    return config


def composed_perceiver_config(
    vit: Checkpoint, lm: Checkpoint, image: Placeholder, vocab_size: int, tokenizer: Any
) -> dict[str, Any]:
    """The VLM config of `vit`'s family with `lm` as its text model and `image` (a token of `tokenizer`, the
    small LM's) as its image token."""
    composition(vit)  # refuses a ViT source no composition is declared for
    small_lm = text_config(lm, vocab_size)
    # Only the perceiver's base model is kept (no LM head), so there is nothing to tie.
    small_lm["tie_word_embeddings"] = False
    if composition(vit).paper:
        return _paper_perceiver(vit, lm, small_lm, image, tokenizer)
    config = _architecture(vit.config)
    config.pop("image_token_index", None)
    config.update(text_config=small_lm, image_token_id=image.id, tie_word_embeddings=False)
    return config


def _paper_perceiver(
    vit: Checkpoint, lm: Checkpoint, small_lm: dict[str, Any], image: Placeholder, tokenizer: Any
) -> dict[str, Any]:
    """The paper skeleton: `vit`'s ViT and merger, `lm`'s Qwen3 blocks under `vit`'s M-RoPE sections."""
    if small_lm.get("model_type") != "qwen3":
        raise BadInputError(
            f"{lm.path}: a perceiver with a Qwen2.5-VL ViT takes Qwen3 blocks (the paper's skeleton), but lm= is "
            f"a {small_lm.get('model_type')} model",
            hint="pass a Qwen3 causal LM as lm= (e.g. Qwen/Qwen3-0.6B), or a LLaVA-family checkpoint as vit=",
        )
    section = rope_parameters(text_part(vit.config)).get("mrope_section") or DEFAULT_MROPE
    text = skeleton_text(small_lm, section)
    if 2 * sum(section) != text["head_dim"]:
        raise BadInputError(
            f"{vit.path}: its M-RoPE sections {list(section)} cover {2 * sum(section)} rotary dims, but lm= "
            f"{lm.path} has head_dim {text['head_dim']}",
            hint="pair a Qwen2.5-VL ViT with a Qwen3 LM of the same head_dim (both 128 in the paper's models)",
        )
    # The perceiver reads the small LM's tokenizer: its own ids for the image token and the markers.
    ids = {key: _token_id(tokenizer, token) for key, token in PAPER_TOKENS.items()}
    for key, token in PAPER_MARKERS.items():
        if ids[key] is None:
            raise BadInputError(
                f"{lm.path}: its tokenizer has no {token} token, which the paper perceiver wraps each image in",
                hint="pass a Qwen3 checkpoint with its own tokenizer as lm=",
            )
    vlm = {**vit.config, **{k: v for k, v in ids.items() if v is not None}, "image_token_id": image.id}
    return skeleton_config(vlm, text, tie=False)


def _token_id(tokenizer: Any, token: str) -> int | None:
    token_id = tokenizer.convert_tokens_to_ids(token)
    if token_id is None or token_id == tokenizer.unk_token_id or tokenizer.convert_ids_to_tokens(token_id) != token:
        return None
    return token_id


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
