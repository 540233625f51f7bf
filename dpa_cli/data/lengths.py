"""Each training sample's length in target tokens (image slots included), known before training starts.

This version encodes every sample once (images decoded), which is exact but slow on large data; the cheap
version (text tokens counted once and cached, image feature counts from file headers) replaces it.
"""

from __future__ import annotations

from typing import Any


def sample_lengths(dataset: Any) -> list[int]:
    """Target tokens per sample of an `EncodedDataset`, as training feeds them (cut at max_length where training
    cuts); 0 for a sample that training skips (it is counted there, and takes no room in a packed row)."""
    lengths = []
    for index in range(len(dataset)):
        features = dataset.encode_or_skip(index)
        lengths.append(0 if features is None else len(features["input_ids"]))
    return lengths
