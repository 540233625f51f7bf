"""Image placeholder tokens: the one a checkpoint already has, or one we choose (and add when needed).

Image slots are overwritten by features, so the placeholder's own embedding is never used; any token the
tokenizer keeps as a single piece works. A text LM target or a composed perceiver's LM may have none.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dpa_cli import loading
from dpa_cli.errors import CheckpointError

# In order of preference: LLaVA's, Qwen's (every Qwen2.5 / Qwen3 tokenizer carries it), Llama 3's spare.
CANDIDATES = ("<image>", "<|image_pad|>", "<|reserved_special_token_0|>")
ADDED_TOKEN = "<image>"
NEEDS_FILES = "the folder needs tokenizer.json or tokenizer_config.json + vocabulary files"


@dataclass(frozen=True)
class Placeholder:
    token: str
    id: int
    added: bool  # True when we added it to the tokenizer

    def as_dict(self) -> dict[str, Any]:
        return {"token": self.token, "id": self.id, "added": self.added}


def load_tokenizer(folder: Path) -> Any:
    """The checkpoint's tokenizer, with a clear error when its files are missing or broken."""
    from transformers.utils import logging as transformers_logging

    # The tokenizer loader reads config.json too, and warns about model types it does not know
    # (the original LLaVA's `llava_llama`); the tokenizer itself loads fine.
    verbosity = transformers_logging.get_verbosity()
    transformers_logging.set_verbosity_error()
    try:
        # Input checkpoints: never their code (only dpa's own, byte for byte). Any loader failure is the one-line
        # `FOLDER: cannot load its tokenizer (REASON)` of dpa_cli.loading, with this hint.
        return loading.load_tokenizer(folder, hint=NEEDS_FILES)
    finally:
        transformers_logging.set_verbosity(verbosity)


def single_token_id(tokenizer: Any, token: str) -> int | None:
    token_id = tokenizer.convert_tokens_to_ids(token)
    if token_id is None or token_id == tokenizer.unk_token_id or tokenizer.convert_ids_to_tokens(token_id) != token:
        return None
    return token_id


def existing_placeholder(tokenizer: Any, token_id: int, where: Path) -> Placeholder:
    """The placeholder a VLM's config names; it must be a real token of its tokenizer."""
    token = tokenizer.convert_ids_to_tokens(token_id) if 0 <= token_id < len(tokenizer) else None
    if token is None:
        raise CheckpointError(
            f"{where}: config.json names image token id {token_id}, which its tokenizer ({len(tokenizer)} "
            "tokens) does not have",
            hint="the tokenizer and the config come from different models",
        )
    return Placeholder(token, token_id, added=False)


def choose_placeholder(tokenizer: Any) -> Placeholder:
    """A token the tokenizer already has from CANDIDATES, else ADDED_TOKEN added as a special token."""
    for token in CANDIDATES:
        token_id = single_token_id(tokenizer, token)
        if token_id is not None:
            return Placeholder(token, token_id, added=False)
    # add_tokens keeps the tokenizer's other special tokens (add_special_tokens may replace that list).
    tokenizer.add_tokens([ADDED_TOKEN], special_tokens=True)
    return Placeholder(ADDED_TOKEN, tokenizer.convert_tokens_to_ids(ADDED_TOKEN), added=True)


# Tokens that are safe padding, most specific first; eos is the last resort (it is what Llama recipes use).
PAD_CANDIDATES = ("<|finetune_right_pad_id|>", "<|endoftext|>", "<pad>", "<unk>")


def ensure_pad_token(tokenizer: Any) -> str | None:
    """Give a tokenizer without a pad token one it already has; returns the token chosen, or None."""
    if tokenizer.pad_token is not None:
        return None
    for token in PAD_CANDIDATES:
        if single_token_id(tokenizer, token) is not None:
            tokenizer.pad_token = token
            return token
    if tokenizer.eos_token is None:
        raise CheckpointError(
            f"{tokenizer.name_or_path}: the tokenizer has neither a pad nor an end-of-sequence token",
            hint="set pad_token in its tokenizer_config.json",
        )
    tokenizer.pad_token = tokenizer.eos_token
    return tokenizer.eos_token
