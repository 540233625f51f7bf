"""Processor files and model inputs for the tiny checkpoints.

Saving writes what hub repos carry next to the weights (preprocessor_config.json, processor_config.json,
tokenizer, chat template). Processors whose class needs a torchvision video processor (Qwen-VL, OneVision,
SmolVLM) are saved as their parts, each of which loads on its own; `example_inputs` lays out the image
tokens the way those processors would.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import transformers as tf
from PIL import Image

PINPOINTS = [[28, 28], [28, 56], [56, 28], [56, 56]]  # AnyRes grid: multiples of the 28 px ViT input


def clip_images(size: int = 28) -> Any:
    return tf.CLIPImageProcessorPil(size={"shortest_edge": size}, crop_size={"height": size, "width": size})


def next_images() -> Any:
    return tf.LlavaNextImageProcessorPil(
        size={"shortest_edge": 28}, crop_size={"height": 28, "width": 28}, image_grid_pinpoints=PINPOINTS
    )


def _save_parts(folder: Path, tok: Any, image_processor: Any, processor: dict[str, Any] | None) -> None:
    """Image processor + tokenizer (+ chat template) + processor_config.json, for processors whose class
    cannot be built here (they need a torchvision video processor); every part still loads on its own."""
    image_processor.save_pretrained(folder)
    tok.save_pretrained(folder)
    if processor is not None:
        (folder / "processor_config.json").write_text(json.dumps(processor, indent=2) + "\n")


def llava_processor(cls_name: str, images_fn: Callable[[], Any]) -> Callable[[Path, Any, Any], None]:
    def save(folder: Path, tok: Any, config: Any) -> None:
        cls, images = getattr(tf, cls_name), images_fn()
        strategy = config.vision_feature_select_strategy
        proc = cls(
            images,
            tok,
            patch_size=config.vision_config.patch_size,
            vision_feature_select_strategy=strategy,
            num_additional_image_tokens=1,
            chat_template=tok.chat_template,
        )
        proc.save_pretrained(folder)
        images.save_pretrained(folder)  # hub repos also carry a standalone preprocessor_config.json

    return save


def onevision_processor(folder: Path, tok: Any, config: Any) -> None:
    images = tf.LlavaOnevisionImageProcessorPil(size={"height": 28, "width": 28}, image_grid_pinpoints=PINPOINTS)
    _save_parts(
        folder,
        tok,
        images,
        {
            "processor_class": "LlavaOnevisionProcessor",
            "num_image_tokens": 4,
            "vision_feature_select_strategy": "full",
            "image_token": "<image>",
            "video_token": "<video>",
        },
    )


def qwen_processor(processor_class: str, patch: int) -> Callable[[Path, Any, Any], None]:
    def save(folder: Path, tok: Any, config: Any) -> None:
        factor = patch * 2  # patch size x spatial merge size
        images = tf.Qwen2VLImageProcessorPil(
            patch_size=patch, merge_size=2, size={"shortest_edge": factor * factor, "longest_edge": 4 * factor * factor}
        )
        _save_parts(folder, tok, images, None)
        path = folder / "preprocessor_config.json"
        path.write_text(json.dumps({**json.loads(path.read_text()), "processor_class": processor_class}, indent=2))

    return save


def _idefics_images(cls: type) -> Any:
    return cls(size={"longest_edge": 112}, max_image_size={"longest_edge": 56})


def idefics3_processor(folder: Path, tok: Any, config: Any) -> None:
    images = _idefics_images(tf.Idefics3ImageProcessorPil)
    tf.Idefics3Processor(images, tok, image_seq_len=4, chat_template=tok.chat_template).save_pretrained(folder)
    images.save_pretrained(folder)


def smolvlm_processor(folder: Path, tok: Any, config: Any) -> None:
    # SmolVLMProcessor needs num2words and a video processor: save its parts and its processor_config.json.
    images = _idefics_images(tf.SmolVLMImageProcessorPil)
    _save_parts(folder, tok, images, {"processor_class": "SmolVLMProcessor", "image_seq_len": 4})


def tokenizer_only(folder: Path, tok: Any, config: Any) -> None:
    tok.save_pretrained(folder)


# --- inputs for one forward pass, built from the saved processor parts ----------------------------------
def example_image(width: int = 40, height: int = 30) -> Image.Image:
    """A small RGB gradient; odd sizes exercise resizing and tiling."""
    image = Image.new("RGB", (width, height))
    image.putdata([(7 * x % 256, 11 * y % 256, (x + y) % 256) for y in range(height) for x in range(width)])
    return image


def _prompt(tok: Any, with_image: bool = True) -> str:
    content = [{"type": "image"}] if with_image else []
    content.append({"type": "text", "text": "What is in the picture?"})
    return tok.apply_chat_template([{"role": "user", "content": content}], tokenize=False, add_generation_prompt=True)


def _expand(tok: Any, text: str, marker: str, count: int) -> dict[str, torch.Tensor]:
    """Tokenize with the image marker repeated `count` times (what the real processors do)."""
    ids = tok(text.replace(marker, marker * count), add_special_tokens=False, return_tensors="pt")
    return dict(ids)


def _with_processor(folder: Path, model: Any) -> dict[str, torch.Tensor]:
    processor = tf.AutoProcessor.from_pretrained(folder)
    return dict(processor(images=[example_image()], text=[_prompt(processor.tokenizer)], return_tensors="pt"))


def _onevision(folder: Path, model: Any) -> dict[str, torch.Tensor]:
    """LlavaOnevisionProcessor needs a torchvision video processor; count the features with the model."""
    tok = tf.AutoTokenizer.from_pretrained(folder)
    images = dict(tf.AutoImageProcessor.from_pretrained(folder)(images=[example_image()], return_tensors="pt"))
    with torch.no_grad():
        features = model.model.get_image_features(images["pixel_values"], images["image_sizes"]).pooler_output
    return {**_expand(tok, _prompt(tok), "<image>", sum(len(f) for f in features)), **images}


def _qwen(folder: Path, model: Any) -> dict[str, torch.Tensor]:
    """One <|image_pad|> per merged 2x2 patch group; mm_token_type_ids marks them for M-RoPE."""
    tok = tf.AutoTokenizer.from_pretrained(folder)
    images = dict(tf.AutoImageProcessor.from_pretrained(folder)(images=[example_image()], return_tensors="pt"))
    count = int(images["image_grid_thw"].prod()) // 4
    inputs = _expand(tok, _prompt(tok), "<|image_pad|>", count)
    inputs["mm_token_type_ids"] = (inputs["input_ids"] == model.config.image_token_id).int()
    return {**inputs, **images}


def _smolvlm(folder: Path, model: Any) -> dict[str, torch.Tensor]:
    """SmolVLMProcessor needs num2words; image_seq_len <image> tokens per tile (the model checks the count)."""
    tok = tf.AutoTokenizer.from_pretrained(folder)
    images = dict(tf.AutoImageProcessor.from_pretrained(folder)(images=[example_image()], return_tensors="pt"))
    tiles = int(images["pixel_attention_mask"].flatten(2).any(-1).sum())
    return {**_expand(tok, _prompt(tok), "<image>", 4 * tiles), **images}


def _text_only(folder: Path, model: Any) -> dict[str, torch.Tensor]:
    tok = tf.AutoTokenizer.from_pretrained(folder)
    return dict(tok(_prompt(tok, with_image=False), add_special_tokens=False, return_tensors="pt"))


_INPUTS = {
    "llava": _with_processor,
    "llava_next": _with_processor,
    "idefics3": _with_processor,
    "llava_onevision": _onevision,
    "qwen2_vl": _qwen,
    "qwen2_5_vl": _qwen,
    "qwen3_vl": _qwen,
    "qwen2_5_vl_qwen3": _qwen,
    "smolvlm": _smolvlm,
    "causal_lm": _text_only,
}


def example_inputs(family: str, folder: Path, model: Any) -> dict[str, torch.Tensor]:
    """Model inputs for one image + one question, built from the files saved in `folder`."""
    return _INPUTS[family](Path(folder), model)
