"""Where the time of a streamed upgrade or merge goes: named library functions timed in the bench's child process.

Each probe wraps one module-level function (or method) for the run, adding its wall time to a label. Probes on the
main thread lie on the critical path; the background ones (hashing, fsync) report how busy their threads were,
which overlaps the main thread's work. Nothing in the library knows about this; only the bench's children load it.
"""

from __future__ import annotations

import functools
import importlib
import threading
import time
from typing import Any

# (label, "module:attribute") pairs: a function, or Class.method, looked up where its caller finds it.
CRITICAL = (
    ("plan", "dpa_cli.upgrade.run:plan_upgrade"),
    ("LoRA key matching (meta model)", "dpa_cli.export.merge:merge_targets"),
    ("weights (until every shard is hashed and fsynced)", "dpa_cli.upgrade.run:write_weights"),
    ("weights (until every shard is hashed and fsynced)", "dpa_cli.export.merge:write_sharded"),
    ("  write tensors (produce, copy, cast, write)", "dpa_cli.checkpoint.writer:_write_file"),
    ("    copy_file_range", "dpa_cli.checkpoint.copying:kernel_copy"),
    ("    casts through buffers", "dpa_cli.checkpoint.copying:ChunkBuffers.cast"),
    ("    waits for merged weights (made ahead by worker threads)", "dpa_cli.export.merge:_Merges.take"),
    ("config, model code, generation config", "dpa_cli.upgrade.run:write_model_files"),
    ("processor", "dpa_cli.upgrade.run:write_processor"),
    ("key / shape / dtype check", "dpa_cli.upgrade.run:check_written"),
    ("wait for input fingerprints", "dpa_cli.upgrade.fingerprint:InputHashes.result"),
    ("manifest", "dpa_cli.upgrade.run:write_manifest"),
    ("rename into place", "dpa_cli.checkpoint.atomic:replace_folder"),
)
BACKGROUND = (
    ("digest of the written files, from the page cache (thread)", "dpa_cli.checkpoint.hashing:hash_range"),
    ("digest of the inputs (thread)", "dpa_cli.upgrade.fingerprint:fingerprint_folder"),
    ("fsync per shard (thread)", "dpa_cli.checkpoint.writer:fsync_path"),
    ("read and merge the adapted weights (worker threads)", "dpa_cli.export.merge:_Merges._make"),
    ("  of which LoRA products", "dpa_cli.export.merge:merge_in_place"),
    ("  of which LoRA products", "dpa_cli.export.merge:merged"),
)


class Phases:
    """Install the probes; `seconds` holds the wall time per label (rounded), once the work is done."""

    def __init__(self) -> None:
        self.totals: dict[str, float] = {}
        self.lock = threading.Lock()
        for label, where in (*CRITICAL, *BACKGROUND):
            self._probe(label, where)

    def _probe(self, label: str, where: str) -> None:
        module_name, _, path = where.partition(":")
        try:
            owner: Any = importlib.import_module(module_name)
        except ImportError:
            return
        *parents, name = path.split(".")
        for parent in parents:
            owner = getattr(owner, parent)
        original = getattr(owner, name, None)
        if original is None:
            return

        @functools.wraps(original)
        def timed(*args: Any, **kwargs: Any) -> Any:
            started = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                with self.lock:
                    self.totals[label] = self.totals.get(label, 0.0) + time.perf_counter() - started

        setattr(owner, name, timed)

    @property
    def seconds(self) -> dict[str, float]:
        with self.lock:
            order = dict.fromkeys(label for label, _ in (*CRITICAL, *BACKGROUND))
            return {label: round(self.totals[label], 3) for label in order if label in self.totals}
