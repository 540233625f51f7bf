"""The encoding preset of an upgrade (`--encoding dpa|paper`): the feature span it implies, the target markers
that become image slots, and what the paper encoding needs of both tokenizers, all checked before any write.

`paper` is the official DPA code's encoding (THUMAI-Lab/Deep-Pre-Alignment): Qwen ChatML, the perceiver reads
the user-turn frame before each image, and an image's N+2 perceiver states `<|vision_start|>`..`<|vision_end|>`
are written into the target's start, pad and end slots (FVT:474, 483-503).
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from dpa_cli.errors import BadInputError
from dpa_cli.upgrade.tokens import single_token_id

ENCODINGS = ("dpa", "paper")  # the same as dpa_cli.model.configuration_dpa.ENCODINGS
MARKERS = ("<|vision_start|>", "<|vision_end|>")  # official ids 151652 / 151653 (FVT:34-40), looked up by name
# Tokens the paper text is made of: ChatML turns (both sides), the think block (target side only).
TARGET_TOKENS = ("<|im_start|>", "<|im_end|>", "<think>", "</think>", *MARKERS)
PERCEIVER_TOKENS = ("<|im_start|>",)


def resolve_options(options: Any) -> Any:
    """The options with the feature span the encoding implies (`feature_span=None`: the encoding's own)."""
    if options.encoding not in ENCODINGS:
        raise BadInputError(f"--encoding {options.encoding!r} is not one of {', '.join(ENCODINGS)}")
    paper = options.encoding == "paper"
    span = options.feature_span or ("image+markers" if paper else "image")
    if paper and span != "image+markers":
        raise BadInputError(
            f"--encoding paper with --feature-span {span}: the paper encoding feeds the target the N+2 perceiver "
            "states <|vision_start|>..<|vision_end|> (image+markers)",
            hint="drop --feature-span, or use --encoding dpa",
        )
    return replace(options, feature_span=span)


def _missing(tokenizer: Any, tokens: tuple[str, ...]) -> list[str]:
    return [token for token in tokens if single_token_id(tokenizer, token) is None]


def check_paper(sources: Any, tokenizers: dict[str, Any]) -> None:
    """Refuse a pair the paper encoding cannot write: it is Qwen's ChatML and Qwen-VL's image markers."""
    perceiver = sources.perceiver or sources.vit  # a composed perceiver lays images out as its ViT source does
    if not perceiver.family.marker_token_ids(perceiver.config):
        kind = perceiver.family.name + ("" if sources.perceiver is not None else ", composed")
        raise BadInputError(
            f"--encoding paper: this perceiver ({kind}) has no image start/end marker tokens, whose states the "
            "paper feeds the target",
            hint="use a Qwen-VL-family perceiver (Qwen2.5-VL, or the paper's own), or --encoding dpa",
        )
    for role, tokens in (("target", TARGET_TOKENS), ("perceiver", PERCEIVER_TOKENS)):
        missing = _missing(tokenizers[role], tokens)
        if missing:
            raise BadInputError(
                f"--encoding paper: the {role} tokenizer lacks {', '.join(missing)} (the paper's text is Qwen "
                "ChatML with think blocks and <|vision_start|>/<|vision_end|> around each image)",
                hint="use Qwen tokenizers (Qwen3 target, Qwen2.5-VL perceiver), or --encoding dpa",
            )


def template_markers(tokenizer: Any, image_id: int) -> list[int]:
    """The two special tokens the target's chat template writes right around an image placeholder (Qwen's
    `<|vision_start|>`/`<|vision_end|>`), or none (LLaVA's `<image>\\n`, or a template that drops images)."""
    probe = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Hi"}]}]
    try:
        ids = tokenizer(tokenizer.apply_chat_template(probe, tokenize=False), add_special_tokens=False)["input_ids"]
    except Exception:  # noqa: BLE001  no template, or one that needs more than a user turn: no markers known
        return []
    if ids.count(image_id) != 1 or ids.index(image_id) in (0, len(ids) - 1):
        return []
    index = ids.index(image_id)
    around = [ids[index - 1], ids[index + 1]]
    specials = {i for i, token in tokenizer.added_tokens_decoder.items() if token.special}
    return around if all(i in specials for i in around) else []


def target_markers(sources: Any, tokenizers: dict[str, Any], options: Any, image_id: int) -> list[int]:
    """The target's start and end marker ids that become image slots, with `image+markers` only: the paper's by
    name; else those the target's template wraps each image in (with N+2 pads between them an image would take
    N+4 positions); none when it has none, and the N+2 features fill N+2 pads."""
    if options.feature_span != "image+markers":
        return []
    if options.encoding == "paper":
        check_paper(sources, tokenizers)
        return [single_token_id(tokenizers["target"], token) for token in MARKERS]
    return template_markers(tokenizers["target"], image_id)
