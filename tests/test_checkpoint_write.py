"""Sharded safetensors writing and atomic commits of files and folders."""

from __future__ import annotations

import hashlib
import json
import os
import weakref
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from transformers import Qwen3Config, Qwen3ForCausalLM

from dpa_cli.checkpoint import LazyTensorReader, read_checkpoint_index
from dpa_cli.checkpoint.atomic import staged_folder, sweep_stale, write_text_atomic
from dpa_cli.checkpoint.writer import TensorSpec, parse_size, plan_shards, write_sharded
from dpa_cli.errors import BadInputError

TENSORS = {
    "a.weight": torch.randn(64, 32),
    "b.weight": torch.randn(16).to(torch.bfloat16),
    "c.mask": torch.tensor([True, False, True]),
    "d.ids": torch.arange(10, dtype=torch.int64),
    "e.scalar": torch.tensor(3.5, dtype=torch.float16),
}


def specs_of(tensors: dict[str, torch.Tensor]) -> list[TensorSpec]:
    return [TensorSpec(name, t.dtype, tuple(t.shape)) for name, t in tensors.items()]


def digest(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


@pytest.mark.parametrize(
    ("text", "expected"), [("5GB", 5 * 10**9), ("200MB", 2 * 10**8), ("2GiB", 2 * 2**30), ("1.5KB", 1500), (7, 7)]
)
def test_parse_size(text, expected):
    assert parse_size(text) == expected


@pytest.mark.parametrize("text", ["", "five GB", "-1GB", "0MB", "3 parsecs"])
def test_parse_size_refuses_junk(text):
    with pytest.raises(BadInputError, match="bad size"):
        parse_size(text)


def test_plan_fills_shards_in_order_and_isolates_big_tensors():
    specs = [TensorSpec(f"t{i}", torch.float32, (n,)) for i, n in enumerate([10, 10, 100, 5, 5])]
    shards = plan_shards(specs, max_shard_bytes=80)
    assert [[s.name for s in shard] for shard in shards] == [["t0", "t1"], ["t2"], ["t3", "t4"]]


def test_sharded_write_reads_back_exactly_with_index(tmp_path):
    files = write_sharded(tmp_path, specs_of(TENSORS), lambda s: TENSORS[s.name], max_shard_bytes=4096)
    assert [f.name for f in files] == ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in TENSORS.values())
    assert set(index["weight_map"]) == set(TENSORS)
    with LazyTensorReader(read_checkpoint_index(tmp_path)) as reader:
        for name, tensor in TENSORS.items():
            got = reader.get(name)
            assert got.dtype == tensor.dtype and torch.equal(got, tensor), name
    with safe_open(str(files[0]), framework="pt") as handle:
        assert handle.metadata() == {"format": "pt"}


def test_single_shard_is_model_safetensors_without_index(tmp_path):
    files = write_sharded(tmp_path, specs_of(TENSORS), lambda s: TENSORS[s.name], max_shard_bytes=10**9)
    assert [f.name for f in files] == ["model.safetensors"]
    assert not (tmp_path / "model.safetensors.index.json").exists()


def test_same_input_gives_byte_identical_files(tmp_path):
    for run in ("one", "two"):
        (tmp_path / run).mkdir()
        write_sharded(tmp_path / run, specs_of(TENSORS), lambda s: TENSORS[s.name], max_shard_bytes=4096)
    assert digest(tmp_path / "one") == digest(tmp_path / "two")


def test_at_most_one_produced_tensor_is_alive_at_a_time(tmp_path):
    alive = []

    def produce(spec):
        assert all(ref() is None for ref in alive), "an earlier tensor is still held"
        tensor = TENSORS[spec.name].clone()
        alive.append(weakref.ref(tensor))
        return tensor

    write_sharded(tmp_path, specs_of(TENSORS), produce, max_shard_bytes=10**9)
    assert len(alive) == len(TENSORS)


def test_produced_tensor_must_match_its_plan(tmp_path):
    with pytest.raises(ValueError, match="a.weight: produced"):
        write_sharded(tmp_path, specs_of(TENSORS), lambda s: torch.zeros(3), max_shard_bytes=10**9)


def test_transformers_loads_what_the_writer_wrote(tmp_path):
    config = Qwen3Config(
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=8,
        vocab_size=50,
        tie_word_embeddings=False,
    )
    model = Qwen3ForCausalLM(config)
    state = model.state_dict()
    config.save_pretrained(tmp_path)
    write_sharded(tmp_path, specs_of(state), lambda s: state[s.name], max_shard_bytes=2000)
    reloaded = Qwen3ForCausalLM.from_pretrained(tmp_path)
    for name, tensor in reloaded.state_dict().items():
        assert torch.equal(tensor, state[name]), name


def test_staged_folder_commits_only_on_success(tmp_path):
    dest = tmp_path / "ws"
    with staged_folder(dest) as tmp:
        (tmp / "file").write_text("new")
        assert not dest.exists()
    assert (dest / "file").read_text() == "new"
    assert [p.name for p in tmp_path.iterdir()] == ["ws"]


def test_staged_folder_leaves_previous_state_on_error(tmp_path):
    dest = tmp_path / "ws"
    dest.mkdir()
    (dest / "file").write_text("old")
    with pytest.raises(RuntimeError), staged_folder(dest, replace=True) as tmp:
        (tmp / "file").write_text("half")
        raise RuntimeError("killed mid-stream")
    assert (dest / "file").read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["ws"]


def test_staged_folder_refuses_or_replaces_an_existing_folder(tmp_path):
    dest = tmp_path / "ws"
    dest.mkdir()
    (dest / "stale").write_text("x")
    with pytest.raises(FileExistsError), staged_folder(dest):
        pass
    with staged_folder(dest, replace=True) as tmp:
        (tmp / "fresh").write_text("y")
    assert [p.name for p in dest.iterdir()] == ["fresh"]


def test_sweep_removes_dead_temporaries_and_restores_an_interrupted_swap(tmp_path):
    dest = tmp_path / "ws"
    dead_pid = 2**22 + 1  # above the default pid_max: no process has it
    (tmp_path / f".ws.dpa-tmp-{dead_pid}").mkdir()
    (tmp_path / f".ws.dpa-old-{dead_pid}").mkdir()
    (tmp_path / f".ws.dpa-old-{dead_pid}" / "kept").write_text("old state")
    sweep_stale(dest)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ws"]
    assert (dest / "kept").read_text() == "old state"


def test_write_text_atomic_keeps_the_old_file_when_the_rename_fails(tmp_path, monkeypatch):
    path = tmp_path / "dpa.yaml"
    write_text_atomic(path, "a: 1\n")
    assert path.read_text() == "a: 1\n"

    def broken_replace(src, dst):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", broken_replace)
    with pytest.raises(OSError, match="No space"):
        write_text_atomic(path, "a: 2\n")
    assert path.read_text() == "a: 1\n"
    assert [p.name for p in tmp_path.iterdir()] == ["dpa.yaml"]
