"""File digests at the speed of the page cache: input files, and what dpa writes (by a thread per output file,
while the writer moves on), read back through one small reused buffer each and hashed while it is in the CPU cache.

A digest is written `algorithm:hex`. dpa hashes with BLAKE3 (cryptographic, and 2.5x sha256 per core here, which
matters when a 64 GB upgrade hashes its inputs and its outputs); a bare 64-hex value is a sha256, as dpa wrote
before, and as a Hugging Face cache blob is named. Torch-free, so `dpa verify` and the input fingerprints of
`dpa upgrade` never import it.
"""

from __future__ import annotations

import hashlib
import os
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

# What a digest reads at a time: small enough to be hashed while it is still in the CPU cache (on this machine
# 1-4 MiB pieces hash at 3.5 GB/s, 16 MiB ones or a mapping of the page cache at 2.8).
PIECE = 2 << 20

ALGORITHM = "blake3"  # what dpa hashes new files with
ALGORITHMS = ("blake3", "sha256")  # what a recorded digest may name


def new_hash(algorithm: str = ALGORITHM) -> Any:
    """A fresh hash object (`update`, `hexdigest`); blake3's releases the GIL on large updates, as hashlib's does."""
    if algorithm == "blake3":
        from blake3 import blake3

        return blake3()
    return hashlib.new(algorithm)


def split_digest(value: str) -> tuple[str, str]:
    """(algorithm, hex) of a recorded digest; a bare hex value is a sha256 (records of older dpa versions)."""
    algorithm, _, hexdigest = value.rpartition(":")
    return algorithm or "sha256", hexdigest


def bytes_digest(data: bytes, algorithm: str = ALGORITHM) -> str:
    """`algorithm:hex` of bytes in memory (a small file dpa has just written from them)."""
    digest = new_hash(algorithm)
    digest.update(data)
    return f"{algorithm}:{digest.hexdigest()}"


def same_digest(a: str, b: str) -> bool:
    return split_digest(a) == split_digest(b)


class Cancelled(Exception):
    """Hashing was stopped because its result is no longer wanted (the run that asked for it failed)."""


def file_digest(path: Path, algorithm: str = ALGORITHM, stop: threading.Event | None = None) -> str:
    """`algorithm:hex` of a file. Plain reads, never a mapping: an input someone truncates meanwhile gives a wrong
    hash, not a SIGBUS. `stop`, when set, abandons the work with `Cancelled`."""
    return f"{algorithm}:{_hash_file(path, new_hash(algorithm), stop)}"


def sha256_file(path: Path, stop: threading.Event | None = None) -> str:
    """Bare hex SHA-256 of a file (for the fingerprints that must match another tool's: installed model code)."""
    return _hash_file(path, hashlib.sha256(), stop)


def _hash_file(path: Path, digest: Any, stop: threading.Event | None) -> str:
    buffer = memoryview(bytearray(PIECE))
    with Path(path).open("rb", buffering=0) as handle:
        while count := handle.readinto(buffer):
            if stop is not None and stop.is_set():
                raise Cancelled(str(path))
            digest.update(buffer[:count])
    return digest.hexdigest()


def hash_range(digest: Any, fd: int, offset: int, length: int, buffer: memoryview) -> None:
    """Feed bytes [offset, offset + length) of `fd` to `digest`, read through `buffer`."""
    end = offset + length
    while offset < end:
        count = os.preadv(fd, [buffer[: min(len(buffer), end - offset)]], offset)
        if count == 0:
            raise EOFError(f"file descriptor {fd} ended {end - offset} bytes early")
        digest.update(buffer[:count])
        offset += count


class FileDigest:
    """The digest of one output file, computed in its own thread from the page cache, range after range in order.

    The writer appends bytes (however it made them), then queues their range: nothing stays alive in our
    memory for the hash, the writer never waits for it, and the hash of one file may lag behind while the next
    file is written. The ranges are read through a descriptor of its own, so the writer may close its handle.
    """

    def __init__(self, path: Path, algorithm: str = ALGORITHM):
        self.algorithm = algorithm
        self.hash = new_hash(algorithm)
        self.buffer = memoryview(bytearray(PIECE))  # used by the one worker only
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="dpa-digest")  # one worker: FIFO, order kept
        self.fd = os.open(path, os.O_RDONLY)
        self.result: Future | None = None  # set by `finish`: the hex digest

    def update_range(self, offset: int, length: int) -> None:
        """Hash bytes [offset, offset + length) of the file, once written (flushed to the kernel)."""
        if length:
            self.pool.submit(hash_range, self.hash, self.fd, offset, length, self.buffer)

    def finish(self) -> Future:
        """`result`: a future of the `algorithm:hex` digest, once every queued range is hashed (the descriptor is
        closed then)."""

        def done() -> str:
            os.close(self.fd)
            return f"{self.algorithm}:{self.hash.hexdigest()}"

        self.result = self.pool.submit(done)
        self.pool.shutdown(wait=False)
        return self.result

    def abandon(self) -> None:
        """Instead of `finish`, when the write failed: drop what is queued, close the descriptor; never raises."""
        self.pool.shutdown(wait=True, cancel_futures=True)
        os.close(self.fd)
