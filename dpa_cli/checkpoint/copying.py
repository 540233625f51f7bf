"""Moving tensor bytes into an output file at the speed of the page cache.

Unchanged bytes go through the kernel (`copy_file_range`, as `cp` does: one call per run of consecutive
tensors, a shared extent where the file system can), casts and tensors through two reused chunk buffers (no
allocation per tensor, converted by torch's vectorised `copy_`, handed to the kernel by `OutputChunk`; a tensor
made in an output chunk of its own is handed over from there, not copied), and
every range written is queued to the file's `FileDigest`, which hashes it from the page cache.
"""

from __future__ import annotations

import contextlib
import errno
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import torch

from dpa_cli.checkpoint.hashing import FileDigest
from dpa_cli.checkpoint.outchunk import OutputChunk, holding
from dpa_cli.checkpoint.reader import FileSlice

# Where copy_file_range cannot work (across file systems, old kernels), bytes go through user space.
_NO_COPY_RANGE = {errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP}
# The chunk buffers' size: big enough that the per-call overhead vanishes, small enough to barely show in RSS.
CHUNK = 16 << 20


@dataclass(frozen=True)
class CastSlice:
    """A tensor's bytes in a file (`piece`, holding `dtype`), converted elementwise to the planned dtype while
    they are written: chunk by chunk, so memory stays a few chunks whatever the tensor's size."""

    piece: FileSlice
    dtype: torch.dtype


def extend(run: FileSlice | None, piece: FileSlice) -> FileSlice | None:
    """`run` grown by `piece` when `piece` starts where `run` ends in the same file, else None."""
    if run is None or run.path != piece.path or run.offset + run.nbytes != piece.offset:
        return None
    return FileSlice(run.path, run.offset, run.nbytes + piece.nbytes)


def segments(src: int, dst: int, count: int, block: int) -> list[int]:
    """Lengths to copy in turn: the whole range, or head / aligned body / tail when source and destination
    offsets agree within a file-system block. Only then can the kernel share the body's extents (a reflink on
    btrfs or XFS) instead of copying it; elsewhere it copies either way."""
    head = -dst % block
    if (src - dst) % block or count < head + block:
        return [count]
    body = (count - head) // block * block
    return [n for n in (head, body, count - head - body) if n]


def kernel_copy(src: int, dst: int, offset: int, count: int) -> int:
    """Copy `count` bytes from `offset` in `src` to `dst`'s position with copy_file_range; returns how many the
    kernel copied, fewer than `count` where it cannot (the caller copies the rest itself)."""
    copied = 0
    try:
        block = os.fstat(dst).st_blksize
        for length in segments(offset, os.lseek(dst, 0, os.SEEK_CUR), count, block):
            while length:
                done = os.copy_file_range(src, dst, length, offset + copied)
                if done == 0:
                    raise EOFError(f"file descriptor {src} ended early")
                copied, length = copied + done, length - done
    except (AttributeError, OSError) as err:  # AttributeError: no copy_file_range on this platform
        if isinstance(err, OSError) and err.errno not in _NO_COPY_RANGE:
            raise
    return copied


class Sources:
    """The source file read from now, kept open between pieces (pieces come in storage order)."""

    def __init__(self) -> None:
        self.path: Path | None = None
        self.handle: BinaryIO | None = None

    def fd(self, path: Path) -> int:
        if path != self.path or self.handle is None:
            self.close()
            self.handle, self.path = open(path, "rb", buffering=0), path
        return self.handle.fileno()

    def close(self) -> None:
        if self.handle is not None:
            self.handle.close()
        self.path, self.handle = None, None


@contextlib.contextmanager
def one_torch_thread() -> Iterator[None]:
    """Convert on this thread alone. A cast is bound by memory, not arithmetic (one thread converts 4 GB/s here,
    two 4.5), and torch's other intra-op threads spin between chunks on the core the digest thread needs: on
    2 cores the cast of 1 GB with its digest took 1.8-2.6 s with two threads, 0.9-1.3 s with one."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def emit(chunk: OutputChunk, start: int, count: int, handle: BinaryIO, digest: FileDigest) -> None:
    """Append `count` bytes of `chunk` from byte `start` to `handle`, and queue their range for hashing."""
    handle.flush()
    position = os.lseek(handle.fileno(), 0, os.SEEK_CUR)
    chunk.emit(count, handle, start)
    digest.update_range(position, count)


def _pread_into(fd: int, view: memoryview, offset: int) -> None:
    got = 0
    while got < len(view):
        count = os.preadv(fd, [view[got:]], offset + got)
        if count == 0:
            raise EOFError(f"file descriptor {fd} ended {len(view) - got} bytes early")
        got += count


class ChunkBuffers:
    """Reused memory for bytes that pass through user space: a chunk read from the source, and the chunk written
    (`OutputChunk`). Each written chunk is queued for hashing by range (read back from the page cache), so it is
    free again at once."""

    def __init__(self) -> None:
        self.source = torch.empty(CHUNK, dtype=torch.uint8)
        self.output = OutputChunk(CHUNK)

    def _emit(self, count: int, handle: BinaryIO, digest: FileDigest) -> None:
        emit(self.output, 0, count, handle, digest)

    def copy(self, src: int, offset: int, count: int, handle: BinaryIO, digest: FileDigest) -> None:
        """Copy bytes verbatim through user space (where the kernel cannot copy them)."""
        for start in range(0, count, CHUNK):
            size = min(CHUNK, count - start)
            _pread_into(src, memoryview(self.output.tensor[:size].numpy()), offset + start)
            self._emit(size, handle, digest)

    def cast(self, src: int, item: CastSlice, dtype: torch.dtype, handle: BinaryIO, digest: FileDigest) -> None:
        """Write `item`'s values converted to `dtype`, element for element as `tensor.to(dtype)` converts."""
        size_in, size_out = item.dtype.itemsize, dtype.itemsize
        per_chunk = CHUNK // max(size_in, size_out)
        total = item.piece.nbytes // size_in
        with one_torch_thread():
            for first in range(0, total, per_chunk):
                count = min(per_chunk, total - first)
                raw = self.source[: count * size_in]
                _pread_into(src, memoryview(raw.numpy()), item.piece.offset + first * size_in)
                self.output.tensor[: count * size_out].view(dtype).copy_(raw.view(item.dtype))
                self._emit(count * size_out, handle, digest)

    def write(self, data: torch.Tensor, handle: BinaryIO, digest: FileDigest) -> None:
        """Write a tensor's bytes (`data`, flat uint8), a chunk at a time through the output chunk."""
        for start in range(0, data.numel(), CHUNK):
            size = min(CHUNK, data.numel() - start)
            self.output.tensor[:size].copy_(data[start : start + size])
            self._emit(size, handle, digest)

    def close(self) -> None:
        self.output.close()


def append(handle: BinaryIO, digest: FileDigest, data: memoryview) -> None:
    """Write small `data` (a header) at the end of `handle` and queue its range for hashing (flushed first: the
    hash reads the file, not our buffer)."""
    handle.flush()
    start = os.lseek(handle.fileno(), 0, os.SEEK_CUR)
    handle.write(data)
    handle.flush()
    digest.update_range(start, data.nbytes)


class Streams:
    """What every file of one write shares: the source file open now and, once a byte passes through user
    space, the chunk buffers (never allocated when the kernel copies everything)."""

    def __init__(self) -> None:
        self.sources = Sources()
        self._buffers: ChunkBuffers | None = None

    @property
    def buffers(self) -> ChunkBuffers:
        if self._buffers is None:
            self._buffers = ChunkBuffers()
        return self._buffers

    def copy_run(self, run: FileSlice, handle: BinaryIO, digest: FileDigest) -> None:
        """Append `run` (consecutive tensors of one source file) to `handle`: one kernel copy where it can, the
        copied range hashed from the page cache it was written to; what the kernel refused goes through buffers."""
        handle.flush()  # the raw descriptor must be at the buffered position
        dst = handle.fileno()
        start = os.lseek(dst, 0, os.SEEK_CUR)
        src = self.sources.fd(run.path)
        copied = kernel_copy(src, dst, run.offset, run.nbytes)
        if copied:
            digest.update_range(start, copied)
        if copied < run.nbytes:
            self.buffers.copy(src, run.offset + copied, run.nbytes - copied, handle, digest)

    def cast(self, item: CastSlice, dtype: torch.dtype, handle: BinaryIO, digest: FileDigest) -> None:
        self.buffers.cast(self.sources.fd(item.piece.path), item, dtype, handle, digest)

    def write(self, tensor: torch.Tensor, handle: BinaryIO, digest: FileDigest) -> None:
        """A tensor made in an output chunk (`outchunk.holding`) goes to the file from there in one call; any
        other passes through the chunk buffers."""
        data = tensor.detach().contiguous().reshape(-1).view(torch.uint8)
        held = holding(data)
        if held is None:
            self.buffers.write(data, handle, digest)
        elif data.numel():
            emit(held[0], held[1], data.numel(), handle, digest)

    def close(self) -> None:
        self.sources.close()
        if self._buffers is not None:
            self._buffers.close()
