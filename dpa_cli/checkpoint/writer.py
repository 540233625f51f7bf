"""Writing checkpoints: tensors streamed into size-capped safetensors shards, Hugging Face names, an index.

Shards are planned from tensor specs before any data moves, so each header is written first and every
tensor is produced, written and freed one at a time: peak memory is one tensor (or a few chunks), not one
shard. Bytes that do not change are copied by the kernel, a run of consecutive tensors in one call
(`checkpoint/copying.py`). Each file's digest is computed while it is written, in a thread of its own, for
the manifests that `dpa verify` checks: no second pass over the files.
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import torch

from dpa_cli.checkpoint.atomic import fsync_path
from dpa_cli.checkpoint.copying import CastSlice, Streams, append, extend
from dpa_cli.checkpoint.hashing import FileDigest, bytes_digest
from dpa_cli.checkpoint.reader import INDEX_FILE, SINGLE_FILE, FileSlice, torch_dtypes
from dpa_cli.checkpoint.sizes import parse_size

__all__ = [
    "CastSlice",
    "FileSlice",
    "Producer",
    "TensorSpec",
    "parse_size",
    "plan_shards",
    "shard_names",
    "write_safetensors",
    "write_sharded",
]

SAFETENSORS_DTYPES: dict[torch.dtype, str] = {dtype: name for name, dtype in torch_dtypes().items()}


@dataclass(frozen=True)
class TensorSpec:
    """A tensor to be written: its final name, dtype and shape."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.numel * self.dtype.itemsize


# Given a planned tensor: its values; or a FileSlice to copy when the bytes are already right; or a CastSlice
# when they only need converting to the planned dtype.
Producer = Callable[[TensorSpec], torch.Tensor | FileSlice | CastSlice]


def plan_shards(specs: Iterable[TensorSpec], max_shard_bytes: int) -> list[list[TensorSpec]]:
    """Fill shards in order up to `max_shard_bytes`; a tensor bigger than that gets a shard of its own."""
    shards: list[list[TensorSpec]] = [[]]
    size = 0
    for spec in specs:
        if shards[-1] and size + spec.nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(spec)
        size += spec.nbytes
    return [shard for shard in shards if shard]


def shard_names(count: int) -> list[str]:
    """The names transformers gives: one `model.safetensors`, or `model-00001-of-00003.safetensors`..."""
    if count == 1:
        return [SINGLE_FILE]
    return [f"model-{i:05d}-of-{count:05d}.safetensors" for i in range(1, count + 1)]


def _header(specs: list[TensorSpec], metadata: dict[str, str]) -> bytes:
    entries: dict[str, object] = {"__metadata__": metadata} if metadata else {}
    offset = 0
    for spec in specs:
        entries[spec.name] = {
            "dtype": SAFETENSORS_DTYPES[spec.dtype],
            "shape": list(spec.shape),
            "data_offsets": [offset, offset + spec.nbytes],
        }
        offset += spec.nbytes
    raw = json.dumps(entries, separators=(",", ":")).encode()
    # The format pads the header with spaces so the data section starts 8-byte aligned.
    raw += b" " * (-(8 + len(raw)) % 8)
    return struct.pack("<Q", len(raw)) + raw


def _check(spec: TensorSpec, item: torch.Tensor | FileSlice | CastSlice) -> None:
    if isinstance(item, (FileSlice, CastSlice)):
        piece, dtype = (item, spec.dtype) if isinstance(item, FileSlice) else (item.piece, item.dtype)
        if piece.nbytes != spec.numel * dtype.itemsize:
            raise ValueError(f"{spec.name}: {piece.nbytes} bytes to copy, planned {spec.numel * dtype.itemsize}")
        return
    if tuple(item.shape) != spec.shape or item.dtype != spec.dtype:
        raise ValueError(
            f"{spec.name}: produced {item.dtype} {list(item.shape)}, planned {spec.dtype} {list(spec.shape)}"
        )


class _FileWriter:
    """One safetensors file being written: each produced piece appended in order, slices that continue one
    another merged into one kernel copy, every byte handed to the file's digest."""

    def __init__(self, handle: BinaryIO, digest: FileDigest, streams: Streams):
        self.handle, self.digest, self.streams = handle, digest, streams
        self.run: FileSlice | None = None  # bytes still to copy, grown while the next slice continues them

    def add(self, spec: TensorSpec, item: torch.Tensor | FileSlice | CastSlice) -> None:
        if isinstance(item, FileSlice):
            grown = extend(self.run, item)
            if grown is None:
                self.flush()
            self.run = grown or item
            return
        self.flush()
        if isinstance(item, CastSlice):
            self.streams.cast(item, spec.dtype, self.handle, self.digest)
            return
        self.streams.write(item, self.handle, self.digest)  # hashed from the file: freed as soon as written

    def flush(self) -> None:
        if self.run is not None:
            run, self.run = self.run, None
            self.streams.copy_run(run, self.handle, self.digest)


def _write_file(
    path: Path,
    specs: list[TensorSpec],
    produce: Producer,
    streams: Streams,
    metadata: dict[str, str] | None = None,
    on_bytes: Callable[[int], None] | None = None,
) -> FileDigest:
    """Write one safetensors file; the returned `FileDigest`'s `result` is the future of the file's digest."""
    with open(path, "wb") as handle:
        digest = FileDigest(path)
        try:
            append(handle, digest, memoryview(_header(specs, metadata or {"format": "pt"})))
            writer = _FileWriter(handle, digest, streams)
            for spec in specs:
                item = produce(spec)
                _check(spec, item)
                writer.add(spec, item)
                del item
                if on_bytes:
                    on_bytes(spec.nbytes)
            writer.flush()
            handle.flush()
        except BaseException:
            digest.abandon()
            raise
    digest.finish()
    return digest


def write_safetensors(
    path: Path,
    specs: list[TensorSpec],
    produce: Producer,
    metadata: dict[str, str] | None = None,
    on_bytes: Callable[[int], None] | None = None,
    sync: bool = True,
) -> str:
    """Write one safetensors file, asking `produce` for each tensor in turn; with `sync`, fsynced before returning.

    Returns the file's digest (`algorithm:hex`), computed from the bytes as they were written.
    """
    streams = Streams()
    try:
        hexdigest = _write_file(path, specs, produce, streams, metadata, on_bytes).result.result()
    finally:
        streams.close()
    if sync:
        fsync_path(path)
    return hexdigest


def write_sharded(
    folder: Path,
    specs: list[TensorSpec],
    produce: Producer,
    max_shard_bytes: int,
    on_bytes: Callable[[int], None] | None = None,
    digests: dict[str, str] | None = None,
) -> list[Path]:
    """Write all tensors into shards under `folder`, plus the index when there is more than one shard.

    `digests`, when given, receives {file name: digest} of every file written (computed while writing).
    """
    names = [spec.name for spec in specs]
    if len(set(names)) != len(names):
        duplicate = next(name for name in names if names.count(name) > 1)
        raise ValueError(f"tensor {duplicate!r} is planned twice")
    shards = plan_shards(specs, max_shard_bytes)
    files = [Path(folder) / name for name in shard_names(len(shards))]
    streams = Streams()
    hashing: list[FileDigest] = []
    # Each finished shard is hashed (its own thread) and flushed to disk (one fsync per shard, in the
    # background) while the next one is written; all are durable before this returns, and so before any
    # caller renames the folder into place.
    try:
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="dpa-fsync") as syncer:
            synced = []
            for path, shard in zip(files, shards):
                if len(hashing) >= 2:  # at most two files hashing at once: one being written, one finishing
                    hashing[-2].result.result()
                hashing.append(_write_file(path, shard, produce, streams, on_bytes=on_bytes))
                synced.append(syncer.submit(fsync_path, path))
            for done in synced:
                done.result()
    finally:
        streams.close()
    found = {path.name: digest.result.result() for path, digest in zip(files, hashing)}
    if len(files) > 1:
        weight_map = {spec.name: path.name for path, shard in zip(files, shards) for spec in shard}
        index = {
            "metadata": {
                "total_size": sum(spec.nbytes for spec in specs),
                "total_parameters": sum(spec.numel for spec in specs),
            },
            "weight_map": dict(sorted(weight_map.items())),
        }
        raw = (json.dumps(index, indent=2) + "\n").encode()
        (Path(folder) / INDEX_FILE).write_bytes(raw)
        found[INDEX_FILE] = bytes_digest(raw)
    if digests is not None:
        digests.update(found)
    return files
