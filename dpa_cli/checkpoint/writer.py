"""Writing checkpoints: tensors streamed into size-capped safetensors shards, Hugging Face names, an index.

Shards are planned from tensor specs before any data moves, so each header is written first and every
tensor is produced, written and freed one at a time: peak memory is one tensor, not one shard.
Each file's sha256 is computed while it is written (in a background thread), for the manifests that
`dpa verify` checks: no second read pass from disk.
"""

from __future__ import annotations

import errno
import hashlib
import json
import math
import os
import re
import struct
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Union

import torch

from dpa_cli.checkpoint.atomic import fsync_path
from dpa_cli.checkpoint.reader import INDEX_FILE, SINGLE_FILE, FileSlice, torch_dtypes
from dpa_cli.errors import BadInputError

SAFETENSORS_DTYPES: dict[torch.dtype, str] = {dtype: name for name, dtype in torch_dtypes().items()}

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B|B)?\s*$", re.IGNORECASE)
_UNITS = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12}
_UNITS |= {"KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_size(text: str | int) -> int:
    """`"5GB"` -> 5_000_000_000 (decimal units as in transformers; `GiB` for binary), ints pass through."""
    if isinstance(text, int):
        return text
    match = _SIZE.match(text)
    if not match or float(match.group(1)) <= 0:
        raise BadInputError(f"bad size {text!r}", hint="write it like 200MB, 5GB or 2GiB")
    return int(float(match.group(1)) * _UNITS[(match.group(2) or "B").upper()])


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


# Where copy_file_range cannot work (across file systems, old kernels), bytes go through user space.
_NO_COPY_RANGE = {errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP}


class _StreamDigest:
    """sha256 of a file as it is written, hashed in a background thread (hashlib releases the GIL).

    One piece is hashed while the next is produced; each piece stays alive until its turn, so order holds
    and at most two tensors are in memory.
    """

    def __init__(self, pool: ThreadPoolExecutor):
        self.hash, self.pool, self.pending = hashlib.sha256(), pool, None

    def _submit(self, fn: Callable, *args) -> None:
        self.wait()
        self.pending = self.pool.submit(fn, *args)

    def update(self, data) -> None:
        self._submit(self.hash.update, data)

    def update_range(self, fd: int, offset: int, length: int) -> None:
        """Bytes the kernel copied (never in our memory): read back from the page cache they were just written to."""
        self._submit(_hash_range, self.hash, fd, offset, length)

    def wait(self) -> None:
        pending, self.pending = self.pending, None
        if pending is not None:
            pending.result()

    def hexdigest(self) -> str:
        self.wait()
        return self.hash.hexdigest()


def _hash_range(digest, fd: int, offset: int, length: int) -> None:
    while length:
        chunk = os.pread(fd, min(length, 8 << 20), offset)
        if not chunk:
            raise EOFError(f"file descriptor {fd} ended early")
        digest.update(chunk)
        offset, length = offset + len(chunk), length - len(chunk)


def _copy_slice(piece: FileSlice, handle: BinaryIO, digest: _StreamDigest) -> None:
    """Copy in the kernel (copy_file_range, as `cp` does); fall back to chunked reads where unsupported."""
    handle.flush()  # the raw descriptor must be at the buffered position
    start = os.lseek(handle.fileno(), 0, os.SEEK_CUR)
    with open(piece.path, "rb") as source:
        offset, left = piece.offset, piece.nbytes
        try:
            while left:
                copied = os.copy_file_range(source.fileno(), handle.fileno(), left, offset)
                if copied == 0:
                    raise EOFError(f"{piece.path} ended early")
                offset, left = offset + copied, left - copied
        except (AttributeError, OSError) as err:
            if isinstance(err, OSError) and err.errno not in _NO_COPY_RANGE:
                raise
            source.seek(offset)
            if offset > piece.offset:  # part went through the kernel before it gave up
                digest.update_range(handle.fileno(), start, offset - piece.offset)
            while left:
                chunk = source.read(min(left, 8 << 20))
                if not chunk:
                    raise EOFError(f"{piece.path} ended early") from None
                handle.write(chunk)
                digest.update(chunk)
                left -= len(chunk)
            return
    digest.update_range(handle.fileno(), start, piece.nbytes)


# Given a planned tensor, returns its values, or a FileSlice to copy when the bytes are already right.
Producer = Callable[[TensorSpec], Union[torch.Tensor, FileSlice]]


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


def _check(spec: TensorSpec, tensor: torch.Tensor | FileSlice) -> None:
    if isinstance(tensor, FileSlice):
        if tensor.nbytes != spec.nbytes:
            raise ValueError(f"{spec.name}: {tensor.nbytes} bytes to copy, planned {spec.nbytes}")
        return
    if tuple(tensor.shape) != spec.shape or tensor.dtype != spec.dtype:
        raise ValueError(
            f"{spec.name}: produced {tensor.dtype} {list(tensor.shape)}, planned {spec.dtype} {list(spec.shape)}"
        )


def write_safetensors(
    path: Path,
    specs: list[TensorSpec],
    produce: Producer,
    metadata: dict[str, str] | None = None,
    on_bytes: Callable[[int], None] | None = None,
    sync: bool = True,
) -> str:
    """Write one safetensors file, asking `produce` for each tensor in turn; with `sync`, fsynced before returning.

    Returns the file's sha256 (hex), computed from the bytes as they were written.
    """
    # Opened for reading too: bytes the kernel copied are hashed by reading them back (from the page cache).
    with open(path, "w+b") as handle, ThreadPoolExecutor(1, thread_name_prefix="dpa-sha256") as pool:
        digest = _StreamDigest(pool)
        header = _header(specs, metadata or {"format": "pt"})
        handle.write(header)
        digest.update(header)
        for spec in specs:
            tensor = produce(spec)
            _check(spec, tensor)
            if isinstance(tensor, FileSlice):
                _copy_slice(tensor, handle, digest)
            else:  # write the tensor's own memory: no bytes copy of the whole tensor
                data = tensor.detach().contiguous().reshape(-1).view(torch.uint8).numpy().data
                handle.write(data)
                digest.update(data)
            if on_bytes:
                on_bytes(spec.nbytes)
            del tensor
        handle.flush()
        hexdigest = digest.hexdigest()  # before the file closes: kernel-copied ranges are read back from it
        if sync:
            os.fsync(handle.fileno())
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

    `digests`, when given, receives {file name: sha256} of every file written (computed while writing).
    """
    names = [spec.name for spec in specs]
    if len(set(names)) != len(names):
        duplicate = next(name for name in names if names.count(name) > 1)
        raise ValueError(f"tensor {duplicate!r} is planned twice")
    shards = plan_shards(specs, max_shard_bytes)
    files = [Path(folder) / name for name in shard_names(len(shards))]
    # Each finished shard is flushed to disk in the background while the next one is written; all are
    # durable before this returns (and so before any caller renames the folder into place).
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="dpa-fsync") as syncer:
        pending = []
        found: dict[str, str] = {}
        for path, shard in zip(files, shards):
            found[path.name] = write_safetensors(path, shard, produce, on_bytes=on_bytes, sync=False)
            pending.append(syncer.submit(fsync_path, path))
        for done in pending:
            done.result()
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
        found[INDEX_FILE] = hashlib.sha256(raw).hexdigest()
    if digests is not None:
        digests.update(found)
    return files
