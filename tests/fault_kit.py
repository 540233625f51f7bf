"""Fault injection: run `dpa` commands as child processes and SIGKILL them at seeded random moments.

Children are forked from a fork server that has already imported dpa, torch and transformers, so a kill
trial costs the command's own work, not ten seconds of interpreter start-up. Each child is still a
separate process running the real CLI entry point, killed by a real SIGKILL. `scripts/fault_trials.py`
runs the same trials with plain `python -m dpa_cli` subprocesses (`--subprocess`) and for longer.
"""

from __future__ import annotations

import hashlib
import multiprocessing
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

PRELOAD = [
    "dpa_cli.cli.app",
    "dpa_cli.upgrade.run",
    "dpa_cli.export.run",
    "dpa_cli.train.run",
    "dpa_cli.model",
    "transformers.models.llava_next.modeling_llava_next",
    "transformers.models.qwen3.modeling_qwen3",
    "transformers.models.qwen2_5_vl.modeling_qwen2_5_vl",
    "peft",
]
_CONTEXT = multiprocessing.get_context("forkserver")
_CONTEXT.set_forkserver_preload(PRELOAD)


def _child(args: list[str], log: str, file_size_limit: int | None = None) -> None:
    """The CLI entry point, with stdout and stderr in `log`; the exit code is the command's.

    `file_size_limit`: no file can grow past it (RLIMIT_FSIZE); writes beyond fail with EFBIG in Python, C++ and
    Rust writers alike, the way a full disk fails them with ENOSPC."""
    if file_size_limit is not None:
        import resource

        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (file_size_limit, file_size_limit))
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    from dpa_cli.cli.app import app

    try:
        app(args=args, prog_name="dpa")
    except SystemExit as done:
        os._exit(done.code if isinstance(done.code, int) else 1)
    os._exit(0)


@dataclass
class Outcome:
    """How a run ended: its exit code (-9 when killed), how long it ran, whether our kill landed."""

    code: int
    seconds: float
    killed: bool


class Runner:
    """Starts `dpa ARGS` as a child (forked from the fork server, or a fresh `python -m dpa_cli`)."""

    def __init__(self, log: Path, fresh_interpreter: bool = False, file_size_limit: int | None = None):
        self.log, self.fresh, self.file_size_limit = Path(log), fresh_interpreter, file_size_limit

    def start(self):
        if self.fresh:
            handle = open(self.log, "ab")
            cmd = [sys.executable, "-m", "dpa_cli", *self.args]
            return subprocess.Popen(cmd, stdout=handle, stderr=handle, start_new_session=True)
        proc = _CONTEXT.Process(target=_child, args=(self.args, str(self.log), self.file_size_limit))
        proc.start()
        return proc

    def run(self, args: list, kill_after: float | None = None, when=None, timeout: float = 600) -> Outcome:
        """Run to the end, or SIGKILL the process `kill_after` seconds after it started (if still running);
        with `when` (a predicate, polled), `kill_after` counts from the moment it first holds."""
        self.args = [str(a) for a in args]
        started = time.monotonic()
        proc = self.start()
        armed = started if when is None else None
        while _alive(proc) and time.monotonic() < started + timeout:
            if armed is None and when():
                armed = time.monotonic()
            if armed is not None and kill_after is not None and time.monotonic() >= armed + kill_after:
                break
            time.sleep(0.005)
        killed = _alive(proc)
        if killed:
            os.kill(proc.pid, signal.SIGKILL)
        code = _wait(proc)
        if killed and kill_after is None:
            raise TimeoutError(f"dpa {' '.join(self.args)} ran past {timeout} s")
        return Outcome(code, time.monotonic() - started, killed)


def _alive(proc) -> bool:
    return proc.poll() is None if isinstance(proc, subprocess.Popen) else proc.is_alive()


def _wait(proc) -> int:
    if isinstance(proc, subprocess.Popen):
        return proc.wait()
    proc.join()
    return proc.exitcode


def tree_hash(folder: Path, skip: tuple[str, ...] = ()) -> dict[str, str]:
    """{relative path: sha256} of every file under `folder` (hidden ones included), but for top-level
    entries whose names start with one of `skip`."""
    folder = Path(folder)
    if not folder.exists():
        return {}
    found = {}
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        name = path.relative_to(folder).as_posix()
        if not name.split("/")[0].startswith(skip) or not skip:
            found[name] = hashlib.sha256(path.read_bytes()).hexdigest()
    return found


def leftovers(folder: Path) -> list[str]:
    """Temporary siblings and staging folders that dpa writes through (none may outlive the next success)."""
    folder = Path(folder)
    names = [p.name for p in folder.parent.glob(f".{folder.name}.dpa-*")]
    for pattern in (".*.dpa-*", "*/.*.dpa-*", "stage*/.saving", "stage*/.*.tmp"):
        names += [p.relative_to(folder).as_posix() for p in folder.glob(pattern)] if folder.exists() else []
    return sorted(names)
