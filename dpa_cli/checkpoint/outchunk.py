"""The buffer that bytes made in user space (casts, merged or new tensors, copies the kernel refused) are written
from: a memory file (memfd) mapped into the process, which the kernel then moves into the output file with
`sendfile`, page cache to page cache.

On the virtual machines dpa is measured on, `write()` from process memory into a new file runs at 0.8-2.1 s/GB
while `sendfile` of the same bytes from a memfd runs at 0.26 s/GB (docs/performance.md); on other machines the
two cost about the same, both one copy. Where there is no memfd, or `sendfile` cannot write the output, it is
plain memory and `write()`.

A producer may also make a tensor inside a chunk of its own (the merge reads and merges an adapted weight in one,
`export/merge.py`): the writer finds that chunk (`holding`) and sends the tensor's bytes from where they lie.
"""

from __future__ import annotations

import contextlib
import errno
import mmap
import os
import weakref
from typing import BinaryIO

import torch

# sendfile's answers when it cannot write to that output; the bytes then go through write().
_NO_SENDFILE = {errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP}

# Every open chunk by the address of its memory, so a tensor made in one is written from it (`holding`).
_OPEN: weakref.WeakValueDictionary[int, OutputChunk] = weakref.WeakValueDictionary()


class OutputChunk:
    """`tensor` (uint8, `size` bytes) to fill, and `emit` to append its first bytes to a file."""

    def __init__(self, size: int):
        self.fd: int | None = None
        self._map: mmap.mmap | None = None
        self.sending = False  # whether `emit` uses sendfile
        self.tensor: torch.Tensor | None = None
        try:
            self.fd = os.memfd_create("dpa-chunk", os.MFD_CLOEXEC)
            os.ftruncate(self.fd, size)
            self._map = mmap.mmap(self.fd, size)
            self.tensor = torch.frombuffer(self._map, dtype=torch.uint8)
            self.sending = True
        except (AttributeError, OSError):  # no memfd here (not Linux), or no room for one
            self.close()
            self.tensor = torch.empty(size, dtype=torch.uint8)
        _OPEN[self.tensor.data_ptr()] = self

    def emit(self, count: int, handle: BinaryIO, start: int = 0) -> None:
        """Append `count` bytes of `tensor` from byte `start` to `handle` at its position (its buffer flushed)."""
        handle.flush()
        sent, count = start, start + count
        if self.sending:
            try:
                while sent < count:
                    done = os.sendfile(handle.fileno(), self.fd, sent, count - sent)
                    if done == 0:
                        raise EOFError("the memory file ended early")
                    sent += done
            except OSError as err:
                if err.errno not in _NO_SENDFILE:
                    raise
                self.sending = False  # write() from the mapping for the rest of this write
        if sent < count:
            handle.write(memoryview(self.tensor[sent:count].numpy()))
            handle.flush()

    def close(self) -> None:
        if self.tensor is not None:
            _OPEN.pop(self.tensor.data_ptr(), None)
        self.tensor = None
        if self._map is not None:
            with contextlib.suppress(BufferError):  # a view still held: the mapping goes with it
                self._map.close()
        if self.fd is not None:
            os.close(self.fd)
        self.fd, self._map, self.sending = None, None, False


def holding(data: torch.Tensor) -> tuple[OutputChunk, int] | None:
    """The open chunk whose memory holds `data` (contiguous), and the byte where `data` starts in it; else None."""
    chunk = _OPEN.get(data.untyped_storage().data_ptr())
    if chunk is None or chunk.tensor is None or not data.is_contiguous():
        return None
    return chunk, data.data_ptr() - chunk.tensor.data_ptr()
