"""Reading checkpoints: safetensors headers, the folder's tensor index, and lazy tensor reads.

Headers are parsed by hand so `inspect` never touches tensor bytes; data is read one shard at a time.
"""

from __future__ import annotations

import logging
import math
import os
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any, BinaryIO

from dpa_cli.checkpoint.hashing import sha256_file  # noqa: F401  re-exported: one place hashes files
from dpa_cli.errors import CheckpointError
from dpa_cli.jsonio import PARSE_ERRORS, parse_json, reason

if TYPE_CHECKING:  # torch costs seconds to import; `inspect` never needs it
    import torch

logger = logging.getLogger(__name__)

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
# The safetensors format caps the JSON header at 100 MB; a bigger length means a corrupt prefix.
MAX_HEADER_BYTES = 100_000_000
REDOWNLOAD = "re-download or re-save the checkpoint"

# Bits per element of every dtype the safetensors format defines (F4 and F6 pack below a byte).
DTYPE_BITS: dict[str, int] = {
    "BOOL": 8,
    "U8": 8,
    "I8": 8,
    "F8_E5M2": 8,
    "F8_E4M3": 8,
    "F8_E4M3FNUZ": 8,
    "F8_E5M2FNUZ": 8,
    "F8_E8M0": 8,
    "I16": 16,
    "U16": 16,
    "F16": 16,
    "BF16": 16,
    "I32": 32,
    "U32": 32,
    "F32": 32,
    "I64": 64,
    "U64": 64,
    "F64": 64,
    "C64": 64,
    "F4": 4,
    "F6_E2M3": 6,
    "F6_E3M2": 6,
}


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lives: `data_offsets` are relative to its file's data section."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    file: Path
    data_offsets: tuple[int, int]

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.data_offsets[1] - self.data_offsets[0]


@dataclass(frozen=True)
class FileSlice:
    """A byte range of a file: a tensor's data, to be copied verbatim without loading it."""

    path: Path
    offset: int
    nbytes: int


@dataclass(frozen=True)
class ShardInfo:
    """One safetensors file: how big its header says it is and how big it is on disk."""

    file: Path
    header_bytes: int  # the 8-byte length prefix plus the JSON header
    data_bytes: int  # end of the last tensor, as the header declares it
    size_on_disk: int
    metadata: dict[str, str]
    pickled: bool = False  # a weights-only torch file (checkpoint/pickled.py), not safetensors

    @property
    def expected_size(self) -> int:
        return self.header_bytes + self.data_bytes


@dataclass(frozen=True)
class CheckpointIndex:
    """Every tensor of a checkpoint folder, grouped by file in storage order, without the data."""

    folder: Path
    tensors: dict[str, TensorInfo]
    shards: dict[Path, ShardInfo]
    # The index file's "metadata" when sharded, else the files' own `__metadata__`.
    metadata: dict[str, Any]

    @property
    def files(self) -> list[Path]:
        return list(self.shards)

    @property
    def total_bytes(self) -> int:
        return sum(shard.size_on_disk for shard in self.shards.values())


def _fail(path: Path, what: str, hint: str = REDOWNLOAD) -> CheckpointError:
    return CheckpointError(f"{path}: {what}", hint=hint)


def _read_header_json(path: Path) -> tuple[dict[str, Any], int, int]:
    """The parsed header, its length, and the file size; reads only the header's bytes."""
    try:
        with path.open("rb") as handle:
            size = os.fstat(handle.fileno()).st_size
            if size < 8:
                raise _fail(path, f"only {size} bytes, too short to be a safetensors file")
            (length,) = struct.unpack("<Q", handle.read(8))
            if length > min(size - 8, MAX_HEADER_BYTES):
                raise _fail(path, f"header length {length} is impossible for a {size}-byte file")
            raw = handle.read(length)
    except OSError as err:
        hint = "check the path and its permissions"
        raise _fail(path, f"cannot read it ({err.strerror})", hint=hint) from None
    try:
        header = parse_json(raw.decode("utf-8"))
    except PARSE_ERRORS as err:
        raise _fail(path, f"header is not UTF-8 JSON ({reason(err)})") from None
    if not isinstance(header, dict):
        raise _fail(path, "header is not a JSON object")
    return header, 8 + length, size


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _parse_entry(path: Path, name: str, entry: Any) -> TensorInfo:
    """Validate one header entry: known dtype, sane shape, offsets spanning exactly its bytes."""
    if not isinstance(entry, dict) or not {"dtype", "shape", "data_offsets"} <= entry.keys():
        raise _fail(path, f"tensor {name!r} lacks dtype, shape or data_offsets")
    dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
    if dtype not in DTYPE_BITS:
        known = ", ".join(DTYPE_BITS)
        raise _fail(path, f"tensor {name!r} has unknown dtype {dtype!r} (known: {known})")
    if not isinstance(shape, list) or not all(_is_int(dim) for dim in shape):
        raise _fail(path, f"tensor {name!r} has a bad shape {shape!r}")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(map(_is_int, offsets))):
        raise _fail(path, f"tensor {name!r} has bad data_offsets {offsets!r}")
    info = TensorInfo(name, dtype, tuple(shape), path, (offsets[0], offsets[1]))
    bits = info.numel * DTYPE_BITS[dtype]
    if bits % 8 or info.nbytes != bits // 8:
        raise _fail(path, f"tensor {name!r} spans {info.nbytes} bytes but {dtype} {list(shape)} needs {bits / 8:g}")
    return info


def _check_layout(path: Path, infos: list[TensorInfo]) -> int:
    """Tensors, sorted by offset, must tile the data section with no overlap or gap; returns its length."""
    end = 0
    for info in infos:
        begin = info.data_offsets[0]
        if begin < end:
            raise _fail(path, f"tensor {info.name!r} overlaps the tensor stored before it")
        if begin > end:
            raise _fail(path, f"{begin - end} unused bytes before tensor {info.name!r}")
        end = info.data_offsets[1]
    return end


def read_shard(path: Path) -> tuple[ShardInfo, dict[str, TensorInfo]]:
    """Parse and validate one file's header; tensors come back in storage order."""
    header, header_bytes, size = _read_header_json(path)
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise _fail(path, "__metadata__ is not a map of strings")
    infos = sorted((_parse_entry(path, name, entry) for name, entry in header.items()), key=lambda i: i.data_offsets)
    data_bytes = _check_layout(path, infos)
    shard = ShardInfo(path, header_bytes, data_bytes, size, metadata)
    return shard, {info.name: info for info in infos}


def read_safetensors_header(path: Path) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    """Tensors and `__metadata__` of one safetensors file, from its header alone.

    A file whose data section is shorter than declared still parses: see `find_truncated_files`.
    """
    shard, tensors = read_shard(Path(path))
    return tensors, shard.metadata


def _unindexed_files(folder: Path) -> list[Path]:
    """`model.safetensors` when present (as transformers prefers), else every `*.safetensors`."""
    if (folder / SINGLE_FILE).is_file():
        return [folder / SINGLE_FILE]
    files = sorted(folder.glob("*.safetensors"))
    if files:
        return files
    pickled = sorted(p.name for p in [*folder.glob("pytorch_model*.bin"), *folder.glob("*.pt")])
    if pickled:
        raise CheckpointError(
            f"{folder}: only pickled weights ({', '.join(pickled)}); dpa reads safetensors only",
            hint="convert them to safetensors (load with transformers, then save_pretrained)",
        )
    raise CheckpointError(f"{folder}: no *.safetensors weights found", hint="pass a model folder")


def _read_weight_map(index_file: Path) -> tuple[dict[str, str], dict[str, Any]]:
    try:
        index = parse_json(index_file.read_bytes())
    except PARSE_ERRORS as err:
        raise _fail(index_file, reason(err)) from None
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise _fail(index_file, 'no "weight_map" from tensor names to shard files')
    for shard in set(weight_map.values()):
        # An index is data from the internet: never let it point outside its folder.
        if Path(shard).is_absolute() or ".." in Path(shard).parts:
            raise _fail(index_file, f"shard {shard!r} lies outside the checkpoint folder")
    metadata = index.get("metadata") or {}
    return weight_map, metadata if isinstance(metadata, dict) else {}


def _check_weight_map(index_file: Path, weight_map: dict[str, str], tensors: dict[str, TensorInfo]) -> None:
    """Every key the index lists must sit in the shard it names."""
    for name, shard in weight_map.items():
        info = tensors.get(name)
        if info is None:
            raise _fail(index_file, f"lists tensor {name!r} but shard {shard} does not hold it")
        if info.file != index_file.parent / shard:
            raise _fail(index_file, f"maps tensor {name!r} to {shard} but it is in {info.file.name}")
    unlisted = sorted(tensors.keys() - weight_map.keys())
    if unlisted:
        # They sit in a shard the index names, so keep them, but say the index is incomplete.
        logger.warning("%s: %d tensors not listed in the index, e.g. %r", index_file, len(unlisted), unlisted[0])


def _read_shards(files: list[Path]) -> tuple[dict[Path, ShardInfo], dict[str, TensorInfo]]:
    shards: dict[Path, ShardInfo] = {}
    tensors: dict[str, TensorInfo] = {}
    for path in files:
        if not path.is_file():
            raise _fail(path, "weight file is missing", hint="download the missing file again")
        shard, infos = read_shard(path)
        for name, info in infos.items():
            if name in tensors:
                raise _fail(path, f"tensor {name!r} is also stored in {tensors[name].file.name}")
            tensors[name] = info
        shards[path] = shard
    return shards, tensors


def read_checkpoint_index(folder: Path, pickled: bool = False) -> CheckpointIndex:
    """Index a folder's weights (one file, an indexed set of shards, or several plain files).

    `pickled`: the folder's family ships `pytorch_model*.bin` (the DPA paper's official formats); read them,
    weights-only, when the folder has no safetensors. Any other folder's pickles are refused unread.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise CheckpointError(f"no such folder: {folder}", hint="pass a model folder")
    if pickled and not any(folder.glob("*.safetensors")):
        from dpa_cli.checkpoint.pickled import pickled_files, pickled_index

        if files := pickled_files(folder):
            return pickled_index(folder, files)
    index_file = folder / INDEX_FILE
    if (folder / SINGLE_FILE).is_file() or not index_file.is_file():
        shards, tensors = _read_shards(_unindexed_files(folder))
        metadata: dict[str, Any] = {}
        for shard in shards.values():
            metadata.update(shard.metadata)
        return _with_tensors(CheckpointIndex(folder, tensors, shards, metadata), ", ".join(p.name for p in shards))
    weight_map, metadata = _read_weight_map(index_file)
    shards, tensors = _read_shards([folder / name for name in sorted(set(weight_map.values()))])
    _check_weight_map(index_file, weight_map, tensors)
    return _with_tensors(CheckpointIndex(folder, tensors, shards, metadata), INDEX_FILE)


def _with_tensors(index: CheckpointIndex, files: str) -> CheckpointIndex:
    """A checkpoint whose headers (or index) list no tensor at all is refused here, not met later as an empty
    plan (a `max()` of nothing, a model with every weight missing)."""
    if not index.tensors:
        raise _fail(index.folder, f"its weights hold no tensors ({files} list none)")
    return index


def find_truncated_files(index: CheckpointIndex) -> list[tuple[Path, int, int]]:
    """(file, expected_bytes, actual_bytes) for each file whose size disagrees with its header.

    Mostly interrupted downloads; trailing bytes are listed too, as safetensors refuses them alike.
    """
    return [
        (shard.file, shard.expected_size, shard.size_on_disk)
        for shard in index.shards.values()
        if shard.size_on_disk != shard.expected_size
    ]


def verify_data_size(shard: ShardInfo) -> None:
    """Raise unless the file on disk is exactly as long as its header declares."""
    actual = shard.file.stat().st_size
    if actual < shard.expected_size:
        what = f"truncated: {actual} bytes on disk, the header declares {shard.expected_size}"
        raise _fail(shard.file, what)
    if actual > shard.expected_size:
        raise _fail(shard.file, f"{actual - shard.expected_size} unexpected bytes after the last tensor")


def open_shard(path: Path) -> BinaryIO:
    """The one place shards are opened for reading (tests count the calls)."""
    return open(path, "rb")


class LazyTensorReader:
    """Reads tensors by name, keeping at most one shard open; use as a context manager.

    Tensors are read with plain file reads into fresh buffers (or one the caller reuses), not memory-mapped: a
    mapped shard's pages would stay resident while it is open, so peak memory would grow with the shard, not the
    tensor.
    """

    def __init__(self, index: CheckpointIndex):
        self.index = index
        self._file: Path | None = None
        self._handle: BinaryIO | None = None
        self._pickled: dict[str, torch.Tensor] | None = None

    def __enter__(self) -> LazyTensorReader:
        return self

    def __exit__(self, kind: type[BaseException] | None, err: BaseException | None, tb: TracebackType | None) -> None:
        self.close()

    @property
    def open_file(self) -> Path | None:
        """The one shard held open now, if any."""
        return self._file

    def close(self) -> None:
        if self._handle is not None:
            self._handle.close()
        self._file, self._handle, self._pickled = None, None, None

    def _open_pickled(self, path: Path) -> dict[str, torch.Tensor]:
        """A pickled shard's tensors, memory-mapped; like an open file, one shard at a time."""
        from dpa_cli.checkpoint.pickled import load_pickled

        if self._file != path or self._pickled is None:
            self.close()
            self._pickled = load_pickled(path)
            self._file = path
        return self._pickled

    def _open(self, path: Path) -> BinaryIO:
        if self._file != path or self._handle is None:
            self.close()
            # Check sizes first, so a short file is reported as truncated rather than as a failed read.
            verify_data_size(self.index.shards[path])
            logger.debug("opening shard %s", path)
            self._handle = open_shard(path)
            self._file = path
        return self._handle

    def get(self, name: str, out: torch.Tensor | None = None) -> torch.Tensor:
        """Tensor `name`, read into a new buffer, or into the first bytes of `out` (uint8, big enough: memory
        reused from one tensor to the next) and returned as a view of them."""
        import torch

        info = self.index.tensors.get(name)
        if info is None:
            raise CheckpointError(f"{self.index.folder}: no tensor named {name!r} in the checkpoint")
        if self.index.shards[info.file].pickled:
            tensor = self._open_pickled(info.file)[name]
            if out is None:
                return tensor.contiguous()
            return out[: info.nbytes].view(tensor.dtype).reshape(info.shape).copy_(tensor)
        handle = self._open(info.file)
        buffer = torch.empty(info.nbytes, dtype=torch.uint8) if out is None else out[: info.nbytes]
        handle.seek(self.index.shards[info.file].header_bytes + info.data_offsets[0])
        if handle.readinto(memoryview(buffer.numpy())) != info.nbytes:
            raise _fail(info.file, f"tensor {name!r} is cut short: the file changed while it was read")
        return buffer.view(torch_dtype(info.dtype)).reshape(info.shape)

    def slice(self, name: str) -> FileSlice | torch.Tensor:
        """Where tensor `name`'s bytes lie, after checking its shard is whole (for copies that skip torch); a
        pickled shard has no such byte range: its (memory-mapped) tensor instead."""
        info = self.index.tensors.get(name)
        if info is None:
            raise CheckpointError(f"{self.index.folder}: no tensor named {name!r} in the checkpoint")
        if self.index.shards[info.file].pickled:
            return self.get(name)
        self._open(info.file)
        return FileSlice(info.file, self.index.shards[info.file].header_bytes + info.data_offsets[0], info.nbytes)

    def __iter__(self) -> Iterator[str]:
        """Names grouped by file, in storage order, so each shard is opened once."""
        return iter(self.index.tensors)

    def items(self) -> Iterator[tuple[str, torch.Tensor]]:
        for name in self:
            yield name, self.get(name)


def torch_dtypes() -> dict[str, torch.dtype]:
    """safetensors dtype name -> torch dtype, for every format both know (torch imported on first use)."""
    import torch

    return {
        "F64": torch.float64,
        "F32": torch.float32,
        "F16": torch.float16,
        "BF16": torch.bfloat16,
        "I64": torch.int64,
        "I32": torch.int32,
        "I16": torch.int16,
        "I8": torch.int8,
        "U8": torch.uint8,
        "BOOL": torch.bool,
        "F8_E4M3": torch.float8_e4m3fn,
        "F8_E5M2": torch.float8_e5m2,
    }


def torch_dtype(name: str) -> torch.dtype:
    """The torch dtype of a safetensors dtype name; formats torch cannot hold are refused."""
    dtypes = torch_dtypes()
    if name not in dtypes:
        raise CheckpointError(f"tensors of dtype {name} cannot be read into torch by dpa")
    return dtypes[name]
