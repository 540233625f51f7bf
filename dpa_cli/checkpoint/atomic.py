"""Nothing half-written: files and folders are built beside their destination and renamed into place.

A killed process leaves at most a hidden `.NAME.dpa-tmp-PID` sibling, which the next run sweeps away;
the destination itself is either the old state or the new one.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

_TMP = ".dpa-tmp-"
_OLD = ".dpa-old-"


def fsync_path(path: Path) -> None:
    """Flush a file's data, or (for a folder) the renames inside it, to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_text_atomic(path: Path, text: str) -> None:
    """Replace `path` with `text` in one rename: readers see the old file or the new one, never half."""
    path = Path(path)
    sweep_stale(path)  # a temporary a killed writer left
    tmp = path.with_name(f".{path.name}{_TMP}{os.getpid()}")
    try:
        with open(tmp, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    fsync_path(path.parent)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def sweep_stale(dest: Path) -> list[Path]:
    """Remove temporaries of `dest` left by dead processes; restore a backup a crash left mid-swap."""
    removed = []
    for sibling in dest.parent.glob(f".{dest.name}{_TMP}*"):
        pid = sibling.name.rsplit("-", 1)[-1]
        if pid.isdigit() and _pid_alive(int(pid)) and int(pid) != os.getpid():
            continue
        shutil.rmtree(sibling) if sibling.is_dir() else sibling.unlink()
        removed.append(sibling)
    for backup in dest.parent.glob(f".{dest.name}{_OLD}*"):
        if not dest.exists():
            os.replace(backup, dest)  # killed between the two renames of a swap: keep the old state
        else:
            shutil.rmtree(backup)
            removed.append(backup)
    return removed


@contextlib.contextmanager
def staged_folder(dest: Path, replace: bool = False) -> Iterator[Path]:
    """Yield an empty temporary sibling of `dest`; on success it becomes `dest`, on any error it is removed.

    With `replace`, an existing `dest` is swapped out only after the new folder is complete.
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    sweep_stale(dest)
    if dest.exists() and not replace:
        raise FileExistsError(dest)
    tmp = dest.with_name(f".{dest.name}{_TMP}{os.getpid()}")
    tmp.mkdir()
    try:
        yield tmp
        replace_folder(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths in one step (Linux renameat2 RENAME_EXCHANGE); False where the system cannot."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP, errno.EPERM):
        return False
    raise OSError(code, os.strerror(code), str(b))


def replace_folder(tmp: Path, dest: Path) -> None:
    """Put the complete folder `tmp` in place of `dest` (existing or not); `dest` is never missing or half.

    An existing `dest` is swapped with `tmp` in one atomic exchange where the system has it; the old tree,
    now under `tmp`'s temporary name, is removed after (or swept by the next run if we are killed first).
    Elsewhere two renames with a backup that `sweep_stale` restores.
    """
    tmp, dest = Path(tmp), Path(dest)
    if not dest.exists():
        os.replace(tmp, dest)
    elif _exchange(tmp, dest):
        fsync_path(dest.parent)
        shutil.rmtree(tmp)
    else:
        backup = dest.with_name(f".{dest.name}{_OLD}{os.getpid()}")
        os.replace(dest, backup)
        os.replace(tmp, dest)
        shutil.rmtree(backup)
    fsync_path(dest.parent)


def check_replaceable(dest: Path, force: bool, ours: bool, noun: str, not_ours: str) -> None:
    """The overwrite rule every output folder keeps: an existing `dest` is replaced only with --force, and
    only when it is empty or something dpa wrote (`ours`; else the refusal `not_ours`), never a file."""
    from dpa_cli.errors import BadInputError

    if not dest.exists():
        return
    if not dest.is_dir():
        raise BadInputError(f"{dest} is a file, not {noun} folder", hint="choose another path with -o")
    if not force:
        raise BadInputError(f"{dest} already exists", hint="pass --force to replace it, or choose -o")
    if not ours and any(dest.iterdir()):
        raise BadInputError(not_ours, hint="choose another path with -o")
