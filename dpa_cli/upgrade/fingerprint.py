"""sha256 of every input file, recorded in dpa.yaml so a workspace says exactly what it was made from.

In the Hugging Face cache a weight file is a symlink to a blob named by its sha256, which we take as is;
other files are hashed, in a background thread while the surgery runs (hashlib releases the GIL).
"""

from __future__ import annotations

import re
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

from dpa_cli.checkpoint import sha256_file

_SHA256 = re.compile(r"^[0-9a-f]{64}$")


def file_sha256(path: Path) -> str:
    target = path.resolve()
    if path.is_symlink() and _SHA256.match(target.name) and target.parent.name == "blobs":
        return target.name
    return sha256_file(target)


def fingerprint_folder(folder: Path) -> dict[str, str]:
    """{file name relative to `folder`: sha256} for every regular file (hidden ones skipped)."""
    files = sorted(p for p in Path(folder).rglob("*") if p.is_file() and not p.name.startswith("."))
    return {str(p.relative_to(folder)): file_sha256(p) for p in files}


def fingerprint_in_background(folders: dict[str, Path]) -> tuple[ThreadPoolExecutor, dict[str, Future]]:
    """Start hashing each folder; the caller collects `future.result()` after the surgery."""
    pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="dpa-sha256")
    # One folder may play several roles (an official DPA checkpoint is target, perceiver and phi): hash it once.
    futures = {folder: pool.submit(fingerprint_folder, folder) for folder in dict.fromkeys(folders.values())}
    return pool, {role: futures[folder] for role, folder in folders.items()}
