"""Text-only batches in distributed training: give the perceiver a stand-in image to run on, with zero weight.

Under ZeRO-3 the perceiver's weights are gathered collectively, and DDP expects gradients for every
trainable weight, so a process whose batch has no image must still run the perceiver, or the others hang.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

# Keys the processor gives per image batch; everything else of the stand-in is thrown away.
_TARGET_KEYS = ("input_ids", "attention_mask", "labels")


class KeepaliveCollator:
    """Wraps a collator: a batch without images gets the perceiver inputs of one small blank image."""

    def __init__(self, collator: Callable[[list[dict]], dict[str, torch.Tensor]], processor: Any):
        from PIL import Image

        self.collator = collator
        blank = processor(images=[Image.new("RGB", (32, 32), (127, 127, 127))], text=[processor.image_token],
                          return_tensors="pt")  # fmt: skip
        self.stand_in = {k: v for k, v in blank.items() if k not in _TARGET_KEYS}
        self.stand_ins = 0  # batches of this process that ran the perceiver on the stand-in (data workers: 0)

    def __call__(self, features: list[dict]) -> dict[str, Any]:
        batch = self.collator(features)
        if "pixel_values" not in batch:
            batch = {**batch, **self.stand_in, "perceiver_keepalive": True}
            self.stand_ins += 1
        return batch


def per_process(count: int) -> list[int]:
    """`count` of every process, by rank (a collective: every process calls it)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return [count]
    counts: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(counts, count)
    return [int(c) for c in counts]
