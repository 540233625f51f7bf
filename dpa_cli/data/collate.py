"""Batches for the DPA model: target sequences padded on the right, perceiver inputs joined in image order.

Per-image inputs are concatenated along their first dimension in sample order, so image `i` of the batch is the
`i`-th perceiver sequence, as the model expects. Any other dimension is padded to the batch's largest with
zeros (LLaVA-NeXT's patch dimension, Idefics3's tiles and their pixel mask: what their processors do for a
batch); perceiver token sequences are padded with the perceiver's pad token on its tokenizer's side.
Nothing is sorted: the order is the sampler's. `length_grouped_indices` gives a sampler that groups lengths.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from typing import Any

import torch

from dpa_cli.data.encode import IGNORE_INDEX, META_KEYS, TARGET_KEYS

PERCEIVER_TOKEN_KEYS = ("perceiver_input_ids", "perceiver_attention_mask", "perceiver_mm_token_type_ids")


def _as_tensor(value: Any) -> torch.Tensor:
    return value if isinstance(value, torch.Tensor) else torch.as_tensor(value)


def _pad_to(tensor: torch.Tensor, shape: list[int], value: int | float, left: bool = False) -> torch.Tensor:
    """`tensor` padded with `value` to `shape` (dimensions 1 and up), at the end, or at the start of the last."""
    if list(tensor.shape[1:]) == shape:
        return tensor
    pad: list[int] = []
    for have, want in zip(reversed(tensor.shape[1:]), reversed(shape)):
        pad += [want - have, 0] if left and not pad else [0, want - have]
    if tensor.dtype == torch.bool:  # constant padding is not implemented for bool tensors
        return torch.nn.functional.pad(tensor.to(torch.uint8), pad, value=int(value)).bool()
    return torch.nn.functional.pad(tensor, pad, value=value)


class DPACollator:
    """`features` (from SampleEncoder) -> the DPA model's forward kwargs, as tensors.

    Target `input_ids` / `attention_mask` / `labels` are padded on the right (pad token, 0, -100), optionally to
    a multiple of `pad_to_multiple_of`. A batch without images has no perceiver keys. With `sample_ids=True`
    the batch also carries `sample_ids` (a list of str), which the trainer pops to name samples in errors.
    """

    def __init__(self, processor: Any, pad_to_multiple_of: int | None = None, sample_ids: bool = False):
        tokenizer, perceiver = processor.tokenizer, processor.perceiver_tokenizer
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.perceiver_pad_id = perceiver.pad_token_id if perceiver.pad_token_id is not None else 0
        self.perceiver_left = getattr(perceiver, "padding_side", "right") == "left"
        self.pad_to_multiple_of = pad_to_multiple_of
        self.sample_ids = sample_ids

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, Any]:
        batch = self._target(features)
        keys = [k for f in features for k in f if k not in TARGET_KEYS and k not in META_KEYS]
        for key in dict.fromkeys(keys):
            parts = [_as_tensor(f[key]) for f in features if key in f]
            batch[key] = self._join(key, parts)
        if self.sample_ids:
            batch["sample_ids"] = [str(f.get("sample_id", "?")) for f in features]
        return batch

    def _target(self, features: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        length = max(len(f["input_ids"]) for f in features)
        if self.pad_to_multiple_of:
            length = -(-length // self.pad_to_multiple_of) * self.pad_to_multiple_of
        batch = {}
        for key, value in (("input_ids", self.pad_id), ("attention_mask", 0), ("labels", IGNORE_INDEX)):
            rows = [_as_tensor(f[key]).long() for f in features]
            batch[key] = torch.stack([_pad_to(row.unsqueeze(0), [length], value)[0] for row in rows])
        return batch

    def _join(self, key: str, parts: list[torch.Tensor]) -> torch.Tensor:
        shape = [max(p.shape[d] for p in parts) for d in range(1, parts[0].dim())]
        if key in PERCEIVER_TOKEN_KEYS:
            value = self.perceiver_pad_id if key == "perceiver_input_ids" else 0
            return torch.cat([_pad_to(p, shape, value, left=self.perceiver_left) for p in parts])
        return torch.cat([_pad_to(p, shape, 0) for p in parts])


def length_grouped_indices(lengths: list[int], batch_size: int, seed: int) -> list[int]:
    """A permutation in which each run of `batch_size` indices has similar lengths (less padding), still random.

    Shuffle, cut into mega-batches of 50 batches, sort each by length (longest first), and shuffle the batches
    except that the batch holding the longest sample comes first (an out-of-memory shows at step 1).
    """
    if not lengths:
        return []
    rng = random.Random(seed)
    order = list(range(len(lengths)))
    rng.shuffle(order)
    mega = batch_size * 50
    chunks = [sorted(order[i : i + mega], key=lambda j: -lengths[j]) for i in range(0, len(order), mega)]
    batches = [chunk[i : i + batch_size] for chunk in chunks for i in range(0, len(chunk), batch_size)]
    longest = max(range(len(batches)), key=lambda b: lengths[batches[b][0]])
    first = batches.pop(longest)
    rng.shuffle(batches)
    return [index for batch in [first, *batches] for index in batch]


class LengthGroupedSampler(torch.utils.data.Sampler):
    """Samples `length_grouped_indices(lengths, batch_size, seed + epoch)`; call `set_epoch` between epochs."""

    def __init__(self, lengths: list[int], batch_size: int, seed: int = 0):
        self.lengths, self.batch_size, self.seed, self.epoch = list(lengths), batch_size, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.lengths)

    def __iter__(self) -> Iterator[int]:
        return iter(length_grouped_indices(self.lengths, self.batch_size, self.seed + self.epoch))
