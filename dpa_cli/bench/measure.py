"""Shared measuring for the file-moving benches: work timed in a fresh child process with its resident memory
sampled every 5 ms, and the `cp -r` baselines it is compared with."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

# `work(*argv)` is defined by the caller's snippet; imports happen before the clock and the memory baseline.
_CHILD = """
import json, sys, time
{snippet}
from dpa_cli.bench.memory import PeakMemory

with PeakMemory("cpu") as memory:
    started = time.perf_counter()
    extra = work(*sys.argv[1:]) or {{}}
    done = time.perf_counter()
print(json.dumps({{"rss_growth": memory.growth, "work_s": done - started, **extra}}))
"""


def run_in_child(snippet: str, *args: str) -> dict[str, Any]:
    """Run `snippet`'s `work(*args)` in a fresh interpreter; returns its seconds, peak RSS growth, extras."""
    child = subprocess.run([sys.executable, "-c", _CHILD.format(snippet=snippet), *args],
                           capture_output=True, text=True, check=True)  # fmt: skip
    return json.loads(child.stdout.strip().splitlines()[-1])


def copy_seconds(source: Path, dest: Path, sync: bool) -> float:
    """`cp -r`, optionally followed by `sync` of the copied files (a copy as durable as dpa's writes)."""
    started = time.perf_counter()
    subprocess.run(["cp", "-r", str(source), str(dest)], check=True)
    if sync:
        subprocess.run(["sync", *map(str, sorted(dest.iterdir()))], check=True)
    seconds = time.perf_counter() - started
    shutil.rmtree(dest)
    return seconds


def stats(values: list[float]) -> dict[str, float]:
    values = sorted(values)
    return {"min": round(values[0], 3), "median": round(values[len(values) // 2], 3)}


def ratios(runs: list[dict[str, Any]], mode: str) -> dict[str, dict[str, float]]:
    """Time against both copies and RSS growth against the largest written shard, over the repeats."""
    return {
        "time_over_cp": stats([r[mode]["work_s"] / r["cp_s"] for r in runs]),
        "time_over_cp_sync": stats([r[mode]["work_s"] / r["cp_sync_s"] for r in runs]),
        "rss_growth_over_shard": stats([r[mode]["rss_growth"] / r[mode]["largest_shard"] for r in runs]),
    }
