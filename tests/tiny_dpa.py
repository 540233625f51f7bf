"""Tiny DPA models and real perceiver inputs for the model tests.

The perceiver inputs come from the perceiver family's real image processor; the token sequences are laid
out the way that family's processor lays them out (`<|vision_start|> <|image_pad|>*N <|vision_end|>`).
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image
from transformers import Qwen2_5_VLConfig, Qwen3Config
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

from dpa_cli.model import DPAConfig, DPAForConditionalGeneration

PERCEIVER_IMAGE = 290
VISION_START = 291
VISION_END = 292
TARGET_IMAGE = 310
TARGET_VOCAB = 320


def qwen2_5_vl_perceiver_config() -> Qwen2_5_VLConfig:
    return Qwen2_5_VLConfig(
        text_config=dict(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            vocab_size=300,
            bos_token_id=0,
            eos_token_id=1,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 1, 1]},
        ),
        vision_config=dict(
            depth=2,
            hidden_size=32,
            intermediate_size=64,
            num_heads=4,
            out_hidden_size=32,
            patch_size=14,
            spatial_merge_size=2,
            temporal_patch_size=2,
            fullatt_block_indexes=[1],
            window_size=56,
        ),
        image_token_id=PERCEIVER_IMAGE,
        vision_start_token_id=VISION_START,
        vision_end_token_id=VISION_END,
        video_token_id=293,
    )


def qwen3_target_config(tie: bool = True) -> Qwen3Config:
    return Qwen3Config(
        hidden_size=48,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=12,
        vocab_size=TARGET_VOCAB,
        bos_token_id=0,
        eos_token_id=1,
        tie_word_embeddings=tie,
    )


def tiny_dpa(tie: bool = True, seed: int = 0, **config_overrides) -> DPAForConditionalGeneration:
    torch.manual_seed(seed)
    config = DPAConfig(
        perceiver_config=qwen2_5_vl_perceiver_config(),
        text_config=qwen3_target_config(tie),
        image_token_id=TARGET_IMAGE,
        perceiver_marker_token_ids=[VISION_START, VISION_END],
        **config_overrides,
    )
    return DPAForConditionalGeneration(config).eval()


def random_images(sizes: list[tuple[int, int]], seed: int = 0) -> list[Image.Image]:
    rng = np.random.RandomState(seed)
    return [Image.fromarray(rng.randint(0, 255, (h, w, 3), dtype=np.uint8)) for h, w in sizes]


def perceiver_inputs(images: list[Image.Image]) -> dict[str, torch.Tensor]:
    """One left-padded perceiver sequence per image, as the DPA processor feeds a Qwen2.5-VL perceiver."""
    processor = Qwen2VLImageProcessorPil(
        min_pixels=28 * 28, max_pixels=56 * 84, patch_size=14, merge_size=2, temporal_patch_size=2
    )
    encoded = processor(images=images, return_tensors="pt")
    counts = (encoded["image_grid_thw"].prod(-1) // 4).tolist()
    length = max(counts) + 2
    ids = torch.zeros(len(images), length, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, count in enumerate(counts):
        seq = [VISION_START] + [PERCEIVER_IMAGE] * count + [VISION_END]
        ids[row, length - len(seq) :] = torch.tensor(seq)
        mask[row, length - len(seq) :] = 1
    return {
        "pixel_values": encoded["pixel_values"],
        "image_grid_thw": encoded["image_grid_thw"],
        "perceiver_input_ids": ids,
        "perceiver_attention_mask": mask,
        "perceiver_mm_token_type_ids": (ids == PERCEIVER_IMAGE).int(),
    }


def feature_counts(inputs: dict[str, torch.Tensor], span: str = "image") -> list[int]:
    ids = inputs["perceiver_input_ids"]
    wanted = [PERCEIVER_IMAGE] + ([VISION_START, VISION_END] if span == "image+markers" else [])
    return torch.isin(ids, torch.tensor(wanted)).sum(-1).tolist()


def target_batch(texts: list[list[list[int]]], counts: list[int], left_pad: bool = False) -> dict[str, torch.Tensor]:
    """Build padded target ids: each sample is text chunks with one image's slots between two chunks."""
    rows, images = [], iter(counts)
    for chunks in texts:
        row: list[int] = list(chunks[0])
        for chunk in chunks[1:]:
            row += [TARGET_IMAGE] * next(images) + list(chunk)
        rows.append(row)
    length = max(len(r) for r in rows)
    ids = torch.full((len(rows), length), 2, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, row in enumerate(rows):
        span = slice(length - len(row), length) if left_pad else slice(0, len(row))
        ids[i, span] = torch.tensor(row)
        mask[i, span] = 1
    return {"input_ids": ids, "attention_mask": mask}
