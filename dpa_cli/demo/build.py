"""The demo's starting models: a small LLaVA-NeXT-style target and a small text LM for the perceiver.

Random weights from configs (there is no model hub here), saved as real checkpoints with tokenizers
trained on the demo's own words, so the questions and answers are a few tokens each.
"""

from __future__ import annotations

from pathlib import Path

import torch

from dpa_cli.demo.shapes import corpus
from dpa_cli.synthetic.checkpoints import build_llava_next_target, build_text_lm, text_config
from dpa_cli.synthetic.tokenizers import CORPUS, tiny_tokenizer

VOCAB = 512  # enough BPE merges that each colour, shape and number is one token


def _text(hidden: int, layers: int, vocab: int) -> dict:
    return text_config(
        hidden,
        layers,
        vocab,
        tie=True,
        intermediate_size=2 * hidden,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=hidden // 4,
        max_position_embeddings=1024,
    )


def build_models(folder: Path) -> tuple[Path, Path]:
    """`target/`: CLIP-style ViT 64 x 2 on 28-pixel tiles + Qwen3 96 x 2; `small-lm/`: Qwen3 64 x 2."""
    words = CORPUS + corpus()
    target_tokenizer = tiny_tokenizer("qwen3_llava", words, VOCAB)
    target = build_llava_next_target(
        Path(folder) / "target",
        _text(96, 2, len(target_tokenizer)),
        vit_hidden=64,
        vit_layers=2,
        image_size=28,
        patch=14,
        tokenizer=target_tokenizer,
        dtype=torch.float32,
    )
    lm_tokenizer = tiny_tokenizer("qwen3", words, VOCAB)
    lm = build_text_lm(
        Path(folder) / "small-lm", _text(64, 2, len(lm_tokenizer)), tokenizer=lm_tokenizer, dtype=torch.float32
    )
    return target, lm
