"""Synthetic checkpoints at any size, written in the real on-disk layout, for `dpa bench` and `dpa demo`.

The model is built on the meta device only to learn its tensor names and shapes; random weights are then
streamed into shards one tensor at a time, so a multi-gigabyte checkpoint costs no more memory than its
largest tensor.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from dpa_cli.checkpoint.naming import meta_model, meta_state
from dpa_cli.checkpoint.seeds import tensor_seed
from dpa_cli.checkpoint.writer import TensorSpec, write_sharded
from dpa_cli.defaults import SHARD_SIZE
from dpa_cli.synthetic.tokenizers import tiny_tokenizer


def text_config(hidden: int, layers: int, vocab: int, tie: bool = True, **extra: Any) -> dict[str, Any]:
    """A Qwen3 text config: the target family of the paper."""
    heads = max(1, hidden // 64)
    return {
        "model_type": "qwen3",
        "hidden_size": hidden,
        "intermediate_size": extra.pop("intermediate_size", 3 * hidden),
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": max(1, heads // 2),
        "head_dim": hidden // heads,
        "vocab_size": vocab,
        "max_position_embeddings": 4096,
        "tie_word_embeddings": tie,
        **extra,
    }


def llava_next_config(
    text: dict[str, Any], vit_hidden: int, vit_layers: int, image_size: int, patch: int, image_token_id: int
) -> dict[str, Any]:
    """A LLaVA-NeXT config (CLIP ViT, AnyRes on a 2x2 grid of `image_size` tiles) around `text`."""
    return {
        "model_type": "llava_next",
        "vision_config": {
            "model_type": "clip_vision_model",
            "hidden_size": vit_hidden,
            "intermediate_size": 4 * vit_hidden,
            "num_hidden_layers": vit_layers,
            "num_attention_heads": max(1, vit_hidden // 64),
            "image_size": image_size,
            "patch_size": patch,
            "projection_dim": vit_hidden,
        },
        "text_config": text,
        "image_token_index": image_token_id,
        "image_grid_pinpoints": [[image_size * a, image_size * b] for a in (1, 2) for b in (1, 2)],
        "vision_feature_layer": -2,
        "vision_feature_select_strategy": "default",
        "tie_word_embeddings": text["tie_word_embeddings"],
    }


def write_random_checkpoint(
    config: dict[str, Any],
    auto_class: str,
    folder: Path,
    seed: int = 0,
    dtype: torch.dtype = torch.bfloat16,
    shard_size: int = SHARD_SIZE,
    std: float = 0.02,
) -> Path:
    """config.json + random weights (norms at 1, like a fresh model) in safetensors shards under `folder`."""
    from transformers import AutoConfig

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    built = AutoConfig.for_model(**config)
    shapes = meta_state(meta_model(auto_class, built))
    specs = [TensorSpec(name, dtype, tuple(t.shape)) for name, t in shapes.items()]

    def produce(spec: TensorSpec) -> torch.Tensor:
        if "norm" in spec.name and len(spec.shape) == 1:
            return torch.ones(spec.shape, dtype=dtype)
        generator = torch.Generator().manual_seed(tensor_seed(seed, spec.name))
        return torch.empty(spec.shape, dtype=torch.float32).normal_(0.0, std, generator=generator).to(dtype)

    write_sharded(folder, specs, produce, shard_size)
    saved = built.to_dict()
    saved["architectures"] = [_class_name(auto_class, built)]
    saved["dtype"] = str(dtype).removeprefix("torch.")
    (folder / "config.json").write_text(json.dumps(saved, indent=2, sort_keys=True) + "\n")
    return folder


def _class_name(auto_class: str, config: Any) -> str:
    import transformers

    return getattr(transformers, auto_class)._model_mapping[type(config)].__name__


def save_llava_next_image_processor(folder: Path, config: dict[str, Any]) -> None:
    """The image processor and processor settings a LLaVA-NeXT checkpoint ships with (PIL backend)."""
    from transformers import LlavaNextImageProcessorPil

    size = config["vision_config"]["image_size"]
    LlavaNextImageProcessorPil(
        size={"shortest_edge": size},
        crop_size={"height": size, "width": size},
        image_grid_pinpoints=config["image_grid_pinpoints"],
    ).save_pretrained(folder)
    settings = {
        "processor_class": "LlavaNextProcessor",
        "patch_size": config["vision_config"]["patch_size"],
        "vision_feature_select_strategy": "default",
        "num_additional_image_tokens": 1,
    }
    (Path(folder) / "processor_config.json").write_text(json.dumps(settings, indent=2) + "\n")


def build_llava_next_target(
    folder: Path,
    text: dict[str, Any],
    vit_hidden: int = 256,
    vit_layers: int = 2,
    image_size: int = 56,
    patch: int = 14,
    shard_size: int = SHARD_SIZE,
    tokenizer: Any = None,
    dtype: torch.dtype = torch.bfloat16,
) -> Path:
    """A LLaVA-NeXT checkpoint with random weights, its tokenizer (Qwen3 template, `<image>`) and image processor."""
    tokenizer = tokenizer or tiny_tokenizer("qwen3_llava")
    config = llava_next_config(
        text, vit_hidden, vit_layers, image_size, patch, tokenizer.convert_tokens_to_ids("<image>")
    )
    write_random_checkpoint(config, "AutoModelForImageTextToText", folder, shard_size=shard_size, dtype=dtype)
    tokenizer.save_pretrained(folder)
    save_llava_next_image_processor(folder, config)
    write_stop_tokens(folder)
    return Path(folder)


def write_stop_tokens(folder: Path) -> None:
    """generation_config.json with the tokenizer's end of text and end of turn, as hub checkpoints ship it: a
    synthetic model's replies stop like a real one's instead of running to max_new_tokens."""
    from dpa_cli.checkpoint.side_files import write_generation_config

    write_generation_config(folder, [], {}, tokenizer_folder=Path(folder))


def build_text_lm(
    folder: Path,
    text: dict[str, Any],
    shard_size: int = SHARD_SIZE,
    tokenizer: Any = None,
    dtype: torch.dtype = torch.bfloat16,
) -> Path:
    """A Qwen3 causal LM with random weights and its tokenizer (which has `<|image_pad|>`)."""
    write_random_checkpoint(text, "AutoModelForCausalLM", folder, shard_size=shard_size, dtype=dtype)
    (tokenizer or tiny_tokenizer("qwen3")).save_pretrained(folder)
    write_stop_tokens(folder)
    return Path(folder)
