"""A digest of every input file, recorded in dpa.yaml so a workspace says exactly what it was made from.

In the Hugging Face cache a weight file is a symlink to a blob named by its sha256, which we take as is
(`sha256:<name>`, comparable with the hub's own record); other files are hashed (BLAKE3) in a background
thread (it releases the GIL). `dpa upgrade` starts it as soon as the input folders are known, before the plan,
so on a machine with a spare core the hashing costs little wall time. The thread is a daemon and stops when
cancelled: a refusal or a failure never waits for it.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Iterable
from concurrent.futures import Future
from pathlib import Path

from dpa_cli.checkpoint.hashing import file_digest

_SHA256 = re.compile(r"^[0-9a-f]{64}$")


def input_digest(path: Path, stop: threading.Event | None = None) -> str:
    target = path.resolve()
    if path.is_symlink() and _SHA256.match(target.name) and target.parent.name == "blobs":
        return f"sha256:{target.name}"
    return file_digest(target, stop=stop)


def fingerprint_folder(folder: Path, stop: threading.Event | None = None) -> dict[str, str]:
    """{file name relative to `folder`: digest} for every regular file (hidden ones skipped)."""
    files = sorted(p for p in Path(folder).rglob("*") if p.is_file() and not p.name.startswith("."))
    return {str(p.relative_to(folder)): input_digest(p, stop) for p in files}


class InputHashes:
    """The fingerprints of an upgrade's input folders, each hashed once, in the background, from `start` on."""

    def __init__(self) -> None:
        self._futures: dict[Path, Future] = {}
        self._stop = threading.Event()

    def start(self, folders: Iterable[Path]) -> None:
        """Begin hashing every folder not begun yet, one after the other, in a daemon thread."""
        new = [f for f in dict.fromkeys(Path(f).resolve() for f in folders) if f not in self._futures]
        for folder in new:
            self._futures[folder] = Future()
        if new:
            threading.Thread(target=self._hash, args=(new,), name="dpa-fingerprint", daemon=True).start()

    def _hash(self, folders: list[Path]) -> None:
        for folder in folders:
            future = self._futures[folder]
            future.set_running_or_notify_cancel()
            try:
                future.set_result(fingerprint_folder(folder, self._stop))
            except BaseException as err:  # handed to whoever asks for the result
                future.set_exception(err)

    def result(self, folder: Path) -> dict[str, str]:
        """The fingerprint of `folder`, waiting for it (and starting it, if nobody did)."""
        self.start([folder])
        return self._futures[Path(folder).resolve()].result()

    def cancel(self) -> None:
        """Stop hashing (the result is no longer wanted); results already computed stay."""
        self._stop.set()
