"""Shared measuring for the file-moving benches: work in a fresh child process, timed twice. From the outside,
end to end as a user waits for it (interpreter start and every import included); from the inside, the work
alone, after its imports (themselves timed: torch + transformers, then the rest), with its resident memory
sampled every 5 ms and its phases probed (`bench/phases.py`). Then the `cp -r` baselines it is compared with."""

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
started = time.perf_counter()
import torch, transformers
base = time.perf_counter()
{snippet}
from dpa_cli.bench.memory import PeakMemory
from dpa_cli.bench.phases import Phases
imported = time.perf_counter()
phases = Phases()
with PeakMemory("cpu") as memory:
    begun = time.perf_counter()
    extra = work(*sys.argv[1:]) or {{}}
    done = time.perf_counter()
print(json.dumps({{"rss_growth": memory.growth, "work_s": done - begun, "import_torch_transformers_s": base - started,
                  "import_rest_s": imported - base, "phases": phases.seconds, **extra}}))
import gc
gc.freeze()  # as `dpa`'s main() exits (cli/app.py)
"""


def run_in_child(snippet: str, *args: str) -> dict[str, Any]:
    """Run `snippet`'s `work(*args)` in a fresh interpreter; returns its seconds, peak RSS growth, import seconds
    (torch + transformers, then the rest the snippet imports), the phases' seconds, the snippet's extras, and
    `end_to_end_s`: the process's wall time from launch to exit."""
    started = time.perf_counter()
    child = subprocess.run(
        [sys.executable, "-c", _CHILD.format(snippet=snippet), *args], capture_output=True, text=True, check=True
    )
    seconds = time.perf_counter() - started
    return {**json.loads(child.stdout.strip().splitlines()[-1]), "end_to_end_s": seconds}


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
    """Over the repeats: the work against both copies; end to end against the durable copy, whole and net of
    the torch + transformers import; RSS growth against the largest written shard."""
    return {
        "time_over_cp": stats([r[mode]["work_s"] / r["cp_s"] for r in runs]),
        "time_over_cp_sync": stats([r[mode]["work_s"] / r["cp_sync_s"] for r in runs]),
        "end_to_end_over_cp_sync": stats([r[mode]["end_to_end_s"] / r["cp_sync_s"] for r in runs]),
        "end_to_end_net_over_cp_sync": stats(
            [(r[mode]["end_to_end_s"] - r[mode]["import_torch_transformers_s"]) / r["cp_sync_s"] for r in runs]
        ),
        "rss_growth_over_shard": stats([r[mode]["rss_growth"] / r[mode]["largest_shard"] for r in runs]),
    }


def breakdown(runs: list[dict[str, Any]], mode: str) -> dict[str, float]:
    """Median seconds per phase over the repeats, imports first, then the probes of `bench/phases.py`."""
    keys = {
        "import torch, transformers": "import_torch_transformers_s",
        "import the rest (transformers' model classes, dpa)": "import_rest_s",
        "work": "work_s",
    }
    medians = {label: stats([r[mode][key] for r in runs])["median"] for label, key in keys.items()}
    for label in runs[0][mode]["phases"]:
        medians[label] = stats([r[mode]["phases"].get(label, 0.0) for r in runs])["median"]
    outside = [r[mode]["end_to_end_s"] - sum(r[mode][key] for key in keys.values()) for r in runs]
    medians["interpreter start and exit, printing"] = stats(outside)["median"]
    medians["end to end (the process, launch to exit)"] = stats([r[mode]["end_to_end_s"] for r in runs])["median"]
    return medians
