"""Peak memory of a block of work in this process: CUDA's allocator peak, or resident-set growth on CPU.

On CPU the resident set is sampled every 5 ms (`dpa_cli.bench.measure` uses this in its child processes too).
Freed heap memory is handed back to the OS first (glibc `malloc_trim`), so memory a previous run left in
the allocator's free lists is not silently reused and the growth is what this block needed.
"""

from __future__ import annotations

import ctypes
import gc
import os
import threading
import time
from typing import Any

_STATM = "/proc/self/statm"


def rss() -> int | None:
    """Resident bytes of this process, where /proc tells (Linux); None elsewhere."""
    try:
        with open(_STATM) as handle:
            return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return None


def _trim() -> None:
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass  # not glibc: growth may read low when freed memory is reused


class PeakMemory:
    """`with PeakMemory(device) as m: ...`, then `m.growth`: peak bytes above the start, or None if unknown."""

    def __init__(self, device: str):
        self.device, self.growth = device, None
        self._peak, self._running, self._thread = 0, False, None

    def __enter__(self) -> PeakMemory:
        if self.device == "cuda":
            import torch  # only here: the file-moving benches' child processes measure without torch

            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self._start = torch.cuda.memory_allocated()
            return self
        _trim()
        self._start = rss()
        if self._start is not None:
            self._peak, self._running = self._start, True
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def _sample(self) -> None:
        while self._running:
            self._peak = max(self._peak, rss() or 0)
            time.sleep(0.005)

    def __exit__(self, *exc: Any) -> None:
        if self.device == "cuda":
            import torch

            torch.cuda.synchronize()
            self.growth = torch.cuda.max_memory_allocated() - self._start
        elif self._thread is not None:
            self._running = False
            self._thread.join()
            self.growth = max(self._peak, rss() or 0) - self._start
