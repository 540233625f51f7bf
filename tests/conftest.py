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
from tests.finished_stage import finished, stage_data  # noqa: E402,F401  (module fixtures: a trained stage 1)
from tests.tiny_export import tiny_export  # noqa: E402,F401  (session fixture: the serving and harness tests' export)

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


# (target, perceiver, extra upgrade arguments) of the workspaces the data tests share. The early-fusion one
# skips the upgrade's load check, which runs the processor without the user text early fusion needs.
DPA_WORKSPACES = {
    "next_qwen": ("llava_next", "qwen2_5_vl", ()),
    "llama3_qwen": ("llava_llama3", "qwen2_5_vl", ()),
    "next_composed": ("llava_next", "vit=target,lm=causal_lm_qwen3", ()),
    "next_qwen_early": ("llava_next", "qwen2_5_vl", ("--early-fusion",)),
}


@pytest.fixture(scope="session")
def dpa_workspace(tiny_checkpoint: TinyCheckpoint, tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Path]:
    """`dpa_workspace(name)` -> a real workspace made by `dpa upgrade` (names in DPA_WORKSPACES), built once
    per session and shared: never modify it."""
    from typer.testing import CliRunner

    from dpa_cli.cli.app import app

    root = tmp_path_factory.mktemp("workspaces")
    built: dict[str, Path] = {}

    def get(name: str) -> Path:
        if name not in built:
            target, perceiver, extra = DPA_WORKSPACES[name]
            if "lm=" in perceiver:
                perceiver = perceiver.replace("lm=causal_lm_qwen3", f"lm={tiny_checkpoint('causal_lm_qwen3')}")
            else:
                perceiver = str(tiny_checkpoint(perceiver))
            folder = root / name
            result = CliRunner().invoke(
                app,
                [
                    "upgrade",
                    str(tiny_checkpoint(target)),
                    "--perceiver",
                    perceiver,
                    "-o",
                    str(folder),
                    *extra,
                    "--json",
                ],
            )
            assert result.exit_code == 0, result.output
            built[name] = folder
        return built[name]

    return get


@pytest.fixture(scope="session")
def data_files(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder with `images/` (every kind of image file, see tests.fixtures.data), `clean.json`, `clean.jsonl`,
    `seeded.json` (one sample per problem kind), `chat/` (save_to_disk) and `chat.parquet/train.parquet`."""
    from tests.fixtures import data

    root = tmp_path_factory.mktemp("data")
    images = data.write_images(root)
    data.write_json(root / "clean.json", data.clean_samples())
    data.write_json(root / "clean.jsonl", data.clean_samples(), lines=True)
    data.write_json(root / "seeded.json", data.seeded_samples())
    data.write_chat_dataset(root / "chat", images)
    data.write_chat_dataset(root / "chat.parquet", images, kind="parquet")
    return root
