"""Text-only batches in training: the perceiver still runs, on a stand-in image, with zero weight in the loss.

Under ZeRO-3 the perceiver's weights are gathered collectively, and DDP expects gradients for every
trainable weight, so a process whose batch has no image must still run the perceiver, or the others hang;
in stage 1 (only perceiver-side parts trainable) a text-only batch would otherwise have no gradient at all.

This lives on the training side, not in the shipped model: the collator hands the stand-in's perceiver
inputs under `perceiver_keepalive`, the trainer arms `PerceiverKeepalive` with them, and a hook runs the
perceiver where the model's forward would (after the text embeddings, before the target LLM), so every
process gathers the same weights in the same order.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from dpa_cli.data.encode import TARGET_KEYS  # the target's keys: the stand-in keeps only the perceiver's

KEEPALIVE = "perceiver_keepalive"  # the batch key of the stand-in's perceiver inputs


class KeepaliveCollator:
    """Wraps a collator: a batch without images gets the perceiver inputs of one small blank image."""

    def __init__(self, collator: Callable[[list[dict]], dict[str, torch.Tensor]], processor: Any):
        from PIL import Image

        self.collator = collator
        blank = processor(
            images=[Image.new("RGB", (32, 32), (127, 127, 127))], text=[processor.image_token], return_tensors="pt"
        )
        self.stand_in = {k: v for k, v in blank.items() if k not in TARGET_KEYS}
        self.stand_ins = 0  # batches of this process that ran the perceiver on the stand-in (data workers: 0)

    def __call__(self, features: list[dict]) -> dict[str, Any]:
        batch = self.collator(features)
        if "pixel_values" not in batch:
            batch = {**batch, KEEPALIVE: self.stand_in}
            self.stand_ins += 1
        return batch


class PerceiverKeepalive:
    """A hook on a DPA model's target LLM: when armed with a stand-in's perceiver inputs, the perceiver runs on
    them just before the LLM, and its output enters the LLM's input embeddings times zero (same values, a
    gradient path to every perceiver weight)."""

    def __init__(self, model: torch.nn.Module):
        dpa = next((m for m in model.modules() if type(m).__name__ == "DPAModel"), None)
        if dpa is None:
            raise TypeError(f"{type(model).__name__} holds no DPAModel")
        self.dpa, self.stand_in = dpa, None
        self.handle = dpa.language_model.register_forward_pre_hook(self._run, with_kwargs=True)

    def arm(self, stand_in: dict[str, torch.Tensor]) -> None:
        """Run the perceiver on `stand_in` in the next forward."""
        self.stand_in = stand_in

    def _run(self, module: torch.nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        stand_in, self.stand_in = self.stand_in, None
        if stand_in is None:
            return None
        features = self.dpa.get_image_features(**stand_in).pooler_output
        embeds = kwargs["inputs_embeds"]
        zero = 0.0 * sum(feature.sum() for feature in features)
        return args, {**kwargs, "inputs_embeds": embeds + zero.to(embeds.dtype)}


def per_process(count: int) -> list[int]:
    """`count` of every process, by rank (a collective: every process calls it)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return [count]
    counts: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(counts, count)
    return [int(c) for c in counts]
