"""Session fixtures: tiny checkpoints of every family, built once per test session; never any network."""

from __future__ import annotations

import os

# Set before huggingface_hub / transformers are imported by any test module: nothing reaches the hub.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from collections.abc import Callable  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

from tests.factories import build  # noqa: E402

TinyCheckpoint = Callable[..., Path]


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> TinyCheckpoint:
    """`tiny_checkpoint(name, layout="hub", sharded=False)` -> folder of the tiny checkpoint `name`
    (see tests.factories.SPECS), built on first use and shared by the session: never modify it, copy
    it with `tests.factories.copy_checkpoint` first."""
    root = tmp_path_factory.mktemp("tiny")
    built: dict[tuple[str, str, bool], Path] = {}

    def get(name: str, layout: str = "hub", sharded: bool = False) -> Path:
        key = (name, layout, sharded)
        if key not in built:
            folder = root / f"{name}-{layout}{'-sharded' if sharded else ''}"
            built[key] = build(name, folder, layout=layout, max_shard_size="20KB" if sharded else "5GB")
        return built[key]

    return get
