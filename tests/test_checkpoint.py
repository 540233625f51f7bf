"""Checkpoint reading: headers without data, folder indexes, lazy one-shard-at-a-time reads."""

from __future__ import annotations

import hashlib
import json
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import dpa_cli.checkpoint.reader as checkpoint
from dpa_cli.checkpoint import (
    LazyTensorReader,
    find_truncated_files,
    read_checkpoint_index,
    read_safetensors_header,
    sha256_file,
)
from dpa_cli.errors import CheckpointError

TENSORS = {
    "model.embed_tokens.weight": torch.randn(8, 4),
    "model.norm.weight": torch.randn(4, dtype=torch.float64).to(torch.bfloat16),
    "model.layers.0.mlp.up_proj.weight": torch.randn(6, 4, dtype=torch.float16),
    "lm_head.weight": torch.randn(8, 4),
    "position_ids": torch.arange(5),
    "scalar": torch.tensor(3.0),
}
SHARDS = {  # HF shard names, two tensors each
    "model-00001-of-00003.safetensors": ["model.embed_tokens.weight", "model.norm.weight"],
    "model-00002-of-00003.safetensors": ["model.layers.0.mlp.up_proj.weight", "position_ids"],
    "model-00003-of-00003.safetensors": ["lm_head.weight", "scalar"],
}


def write_sharded(folder: Path) -> Path:
    """A sharded checkpoint laid out as save_pretrained writes it: shards plus index.json."""
    folder.mkdir(parents=True, exist_ok=True)
    weight_map = {}
    for shard, names in SHARDS.items():
        save_file({name: TENSORS[name] for name in names}, folder / shard, metadata={"format": "pt"})
        weight_map.update({name: shard for name in names})
    total = sum(t.numel() * t.element_size() for t in TENSORS.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / checkpoint.INDEX_FILE).write_text(json.dumps(index))
    return folder


def write_raw(path: Path, header: object, data: bytes = b"", length: int | None = None) -> Path:
    """A safetensors-shaped file with an arbitrary header, to build each corruption."""
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    size = len(raw) if length is None else length
    path.write_bytes(struct.pack("<Q", size) + raw + data)
    return path


def truncate(path: Path, drop: int) -> None:
    with path.open("r+b") as handle:
        handle.truncate(path.stat().st_size - drop)


@pytest.fixture
def single(tmp_path: Path) -> Path:
    save_file(TENSORS, tmp_path / "model.safetensors", metadata={"format": "pt"})
    return tmp_path


@pytest.fixture
def sharded(tmp_path: Path) -> Path:
    return write_sharded(tmp_path / "sharded")


# --- headers ---------------------------------------------------------------


def test_header_gives_shapes_dtypes_and_metadata(single: Path) -> None:
    tensors, metadata = read_safetensors_header(single / "model.safetensors")
    assert metadata == {"format": "pt"}
    assert set(tensors) == set(TENSORS)
    embed = tensors["model.embed_tokens.weight"]
    assert (embed.dtype, embed.shape, embed.numel, embed.nbytes) == ("F32", (8, 4), 32, 128)
    assert tensors["model.norm.weight"].dtype == "BF16"
    assert tensors["model.layers.0.mlp.up_proj.weight"].dtype == "F16"
    assert tensors["position_ids"].dtype == "I64"
    assert tensors["scalar"].shape == () and tensors["scalar"].numel == 1
    assert embed.file == single / "model.safetensors"


def test_header_reading_never_needs_the_tensor_data(single: Path) -> None:
    path = single / "model.safetensors"
    expected, _ = read_safetensors_header(path)
    header_len = 8 + struct.unpack("<Q", path.read_bytes()[:8])[0]
    truncate(path, path.stat().st_size - header_len)  # keep the header, drop every tensor byte
    assert read_safetensors_header(path)[0] == expected


def test_header_tensors_come_in_storage_order(single: Path) -> None:
    tensors, _ = read_safetensors_header(single / "model.safetensors")
    offsets = [info.data_offsets for info in tensors.values()]
    assert offsets == sorted(offsets) and offsets[0][0] == 0


GOOD = {"t": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}
CORRUPT_HEADERS = {
    "short file": (b"\x01\x02", None, "too short"),
    "length beyond file": (b"{}", 1000, "impossible"),
    "length over 100 MB": (b"{}", 200_000_000, "impossible"),
    "not utf-8": (b"\xff\xfe\xfd", None, "not UTF-8 JSON"),
    "not json": (b"{nope", None, "not UTF-8 JSON"),
    "not an object": (b"[1, 2]", None, "not a JSON object"),
    "missing dtype": ({"t": {"shape": [2], "data_offsets": [0, 8]}}, None, "'t' lacks dtype"),
    "unknown dtype": ({"t": {"dtype": "F128", "shape": [2], "data_offsets": [0, 8]}}, None, "unknown dtype"),
    "bad shape": ({"t": {"dtype": "F32", "shape": [-2], "data_offsets": [0, 8]}}, None, "bad shape"),
    "wrong span": ({"t": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}, None, "spans 8 bytes"),
    "overlap": ({**GOOD, "u": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}, None, "'u' overlaps"),
    "gap": ({"t": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}, None, "unused bytes before"),
    "bad metadata": ({**GOOD, "__metadata__": {"format": 1}}, None, "__metadata__"),
}


@pytest.mark.parametrize("case", CORRUPT_HEADERS)
def test_corrupt_header_is_a_checkpoint_error_naming_the_file(tmp_path: Path, case: str) -> None:
    header, length, words = CORRUPT_HEADERS[case]
    path = tmp_path / "bad.safetensors"
    if case == "short file":
        path.write_bytes(header)
    else:
        write_raw(path, header, data=bytes(16), length=length)
    with pytest.raises(CheckpointError) as err:
        read_safetensors_header(path)
    assert str(path) in err.value.message and words in err.value.message
    assert "\n" not in err.value.message and err.value.hint


def test_unreadable_file_is_a_checkpoint_error(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="cannot read it"):
        read_safetensors_header(tmp_path / "absent.safetensors")


# --- folder index ----------------------------------------------------------


def test_single_file_index(single: Path) -> None:
    index = read_checkpoint_index(single)
    assert index.files == [single / "model.safetensors"]
    assert set(index.tensors) == set(TENSORS)
    assert index.total_bytes == (single / "model.safetensors").stat().st_size
    assert index.metadata == {"format": "pt"}


def test_sharded_index(sharded: Path) -> None:
    index = read_checkpoint_index(sharded)
    assert index.files == [sharded / name for name in SHARDS]
    assert set(index.tensors) == set(TENSORS)
    for shard, names in SHARDS.items():
        assert all(index.tensors[name].file == sharded / shard for name in names)
    assert index.total_bytes == sum((sharded / name).stat().st_size for name in SHARDS)
    assert index.metadata["total_size"] == sum(info.nbytes for info in index.tensors.values())


def test_tensor_order_is_grouped_by_file(sharded: Path) -> None:
    files = [info.file for info in read_checkpoint_index(sharded).tensors.values()]
    assert files == sorted(files)


def test_unindexed_safetensors_files_are_all_read(sharded: Path) -> None:
    (sharded / checkpoint.INDEX_FILE).unlink()
    index = read_checkpoint_index(sharded)
    assert set(index.tensors) == set(TENSORS) and len(index.files) == 3


def test_model_safetensors_wins_over_other_files(single: Path) -> None:
    save_file({"extra": torch.zeros(1)}, single / "adapter_model.safetensors")
    assert "extra" not in read_checkpoint_index(single).tensors


def expect_error(folder: Path, *words: str) -> CheckpointError:
    with pytest.raises(CheckpointError) as err:
        read_checkpoint_index(folder)
    for word in words:
        assert word in err.value.message, err.value.message
    assert "\n" not in err.value.message
    return err.value


def test_missing_folder(tmp_path: Path) -> None:
    expect_error(tmp_path / "nowhere", "no such folder", "nowhere")


def test_only_pickled_weights_are_refused_without_unpickling(tmp_path: Path) -> None:
    (tmp_path / "pytorch_model.bin").write_bytes(b"not even a pickle")
    err = expect_error(tmp_path, "only pickled weights", "pytorch_model.bin", str(tmp_path))
    assert "safetensors" in err.hint


def test_folder_without_weights(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("{}")
    expect_error(tmp_path, "no *.safetensors", str(tmp_path))


def test_corrupt_index_json(sharded: Path) -> None:
    (sharded / checkpoint.INDEX_FILE).write_text("{ not json")
    expect_error(sharded, checkpoint.INDEX_FILE, "not valid JSON")


def test_index_without_weight_map(sharded: Path) -> None:
    (sharded / checkpoint.INDEX_FILE).write_text('{"metadata": {}}')
    expect_error(sharded, checkpoint.INDEX_FILE, "weight_map")


def rewrite_index(folder: Path, edit: dict[str, str]) -> None:
    path = folder / checkpoint.INDEX_FILE
    index = json.loads(path.read_text())
    index["weight_map"].update(edit)
    path.write_text(json.dumps(index))


def test_index_pointing_outside_the_folder(sharded: Path) -> None:
    rewrite_index(sharded, {"scalar": "../elsewhere.safetensors"})
    expect_error(sharded, "outside the checkpoint folder")


def test_shard_listed_but_absent(sharded: Path) -> None:
    (sharded / "model-00002-of-00003.safetensors").unlink()
    expect_error(sharded, "model-00002-of-00003.safetensors", "missing")


def test_key_listed_but_not_in_its_shard(sharded: Path) -> None:
    rewrite_index(sharded, {"ghost.weight": "model-00001-of-00003.safetensors"})
    expect_error(sharded, checkpoint.INDEX_FILE, "'ghost.weight'", "does not hold it")


def test_key_mapped_to_the_wrong_shard(sharded: Path) -> None:
    rewrite_index(sharded, {"scalar": "model-00001-of-00003.safetensors"})
    expect_error(sharded, "'scalar'", "model-00001-of-00003.safetensors", "model-00003-of-00003.safetensors")


def test_duplicate_key_across_shards(sharded: Path) -> None:
    first = sharded / "model-00001-of-00003.safetensors"
    save_file({"scalar": torch.tensor(2.0), **{n: TENSORS[n] for n in SHARDS[first.name]}}, first)
    expect_error(sharded, "'scalar'", "also stored in")


def test_unlisted_shard_key_is_kept_and_reported(sharded: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = sharded / "model-00003-of-00003.safetensors"
    save_file({"extra": torch.zeros(2), **{n: TENSORS[n] for n in SHARDS[path.name]}}, path)
    assert "extra" in read_checkpoint_index(sharded).tensors
    assert "not listed in the index" in caplog.text


def test_corrupt_shard_header_names_the_shard(sharded: Path) -> None:
    write_raw(sharded / "model-00002-of-00003.safetensors", b"{garbage")
    expect_error(sharded, "model-00002-of-00003.safetensors", "not UTF-8 JSON")


# --- truncation ------------------------------------------------------------


def test_truncated_data_indexes_but_is_reported(sharded: Path) -> None:
    shard = sharded / "model-00002-of-00003.safetensors"
    size = shard.stat().st_size
    truncate(shard, 10)
    index = read_checkpoint_index(sharded)
    assert set(index.tensors) == set(TENSORS)
    assert find_truncated_files(index) == [(shard, size, size - 10)]


def test_trailing_bytes_are_reported_too(single: Path) -> None:
    path = single / "model.safetensors"
    size = path.stat().st_size
    with path.open("ab") as handle:
        handle.write(b"junk")
    assert find_truncated_files(read_checkpoint_index(single)) == [(path, size, size + 4)]


def test_intact_checkpoint_has_no_truncated_files(sharded: Path) -> None:
    assert find_truncated_files(read_checkpoint_index(sharded)) == []


# --- lazy reading ----------------------------------------------------------


@pytest.mark.parametrize("layout", ["single", "sharded"])
def test_reader_returns_the_saved_tensors(layout: str, request: pytest.FixtureRequest) -> None:
    index = read_checkpoint_index(request.getfixturevalue(layout))
    with LazyTensorReader(index) as reader:
        loaded = dict(reader.items())
    assert loaded.keys() == TENSORS.keys()
    for name, tensor in TENSORS.items():
        assert loaded[name].dtype == tensor.dtype and torch.equal(loaded[name], tensor), name


def test_reader_holds_one_shard_at_a_time(sharded: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    opened: list[str] = []
    live = {"now": 0, "max": 0}
    real_open = checkpoint.open_shard

    class CountingHandle:
        def __init__(self, path: Path):
            opened.append(Path(path).name)
            live["now"] += 1
            live["max"] = max(live["max"], live["now"])
            self.inner = real_open(path)

        def __getattr__(self, name: str) -> object:
            return getattr(self.inner, name)

        def close(self) -> None:
            live["now"] -= 1
            self.inner.close()

    monkeypatch.setattr(checkpoint, "open_shard", CountingHandle)
    index = read_checkpoint_index(sharded)
    with LazyTensorReader(index) as reader:
        for name in reader:
            reader.get(name)
            assert reader.open_file == index.tensors[name].file
    assert opened == list(SHARDS)  # each shard opened once, in order
    assert live == {"now": 0, "max": 1}
    assert reader.open_file is None


def test_reader_refuses_truncated_shard_naming_it(sharded: Path) -> None:
    index = read_checkpoint_index(sharded)
    shard = sharded / "model-00003-of-00003.safetensors"
    truncate(shard, 4)
    with LazyTensorReader(index) as reader:
        assert torch.equal(reader.get("position_ids"), TENSORS["position_ids"])  # other shards still read
        with pytest.raises(CheckpointError, match="truncated") as err:
            reader.get("lm_head.weight")
    assert str(shard) in err.value.message


def test_reader_unknown_tensor_is_a_checkpoint_error(single: Path) -> None:
    with LazyTensorReader(read_checkpoint_index(single)) as reader:
        with pytest.raises(CheckpointError, match="'nope'"):
            reader.get("nope")


def test_file_digests_stream_in_pieces(tmp_path: Path, monkeypatch) -> None:
    from blake3 import blake3

    from dpa_cli.checkpoint import hashing

    path = tmp_path / "blob"
    data = bytes(range(256)) * 100
    path.write_bytes(data)
    monkeypatch.setattr(hashing, "PIECE", 7)  # many pieces, the last one short
    assert sha256_file(path) == hashlib.sha256(data).hexdigest()
    assert hashing.file_digest(path) == "blake3:" + blake3(data).hexdigest()
    assert hashing.file_digest(path, "sha256") == "sha256:" + hashlib.sha256(data).hexdigest()
