"""Seeds for tensors made from nothing (a fresh projector, synthetic weights): the same seed gives the same bytes."""

from __future__ import annotations

import hashlib


def tensor_seed(seed: int, name: str) -> int:
    """A seed per tensor: the same `--seed` gives the same bytes whatever order tensors are written in."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{name}".encode()).digest()[:8], "little")
