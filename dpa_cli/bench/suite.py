"""`dpa bench all`: every bench in one run, each on its own synthetic inputs, summarised in one table.

`quick` shrinks each to tiny-but-not-trivial inputs (a few minutes on 2 CPU cores in all): the figures then
show that every bench runs and roughly where the ratios lie, not the sizes the targets are stated for.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

# Each bench's arguments: (quick, full). Full is each command's own defaults.
SETTINGS = {
    "upgrade": ({"target_bytes": "200MB", "input_shard": "50MB", "output_shard": "100MB", "repeats": 1}, {}),
    "train": ({"repeats": 2, "batch": 1}, {}),
    "export": ({"target_bytes": "200MB", "shard": "100MB", "repeats": 1}, {}),
    "infer": ({"size": "quick", "max_new_tokens": 8, "repeats": 2}, {"size": "default"}),
}
BENCHES = tuple(SETTINGS)


def _infer(workdir: Path, size: str = "default", **options: Any) -> dict[str, Any]:
    from dpa_cli.bench.infer import bench_infer
    from dpa_cli.bench.pairs import build_pair

    return bench_infer(str(build_pair(workdir, size)), device="cpu", **options)


def _runner(name: str) -> Callable[..., dict[str, Any]]:
    if name == "upgrade":
        from dpa_cli.bench.upgrade import bench_upgrade as run
    elif name == "train":
        from dpa_cli.bench.train import bench_train as run
    elif name == "export":
        from dpa_cli.bench.export import bench_export as run
    else:
        run = _infer
    return run


def bench_all(
    workdir: Path, quick: bool = False, only: tuple[str, ...] = BENCHES, say: Callable[[str], None] = lambda _: None
) -> dict[str, Any]:
    """Run the benches named in `only` (in order), each in its own subfolder of `workdir`."""
    results, seconds = {}, {}
    for name in only:
        say(f"dpa bench {name}{' (quick)' if quick else ''} ...")
        folder = Path(workdir) / name
        folder.mkdir(parents=True)
        started = time.perf_counter()
        results[name] = _runner(name)(folder, **SETTINGS[name][0 if quick else 1])
        seconds[name] = round(time.perf_counter() - started, 1)
    return {"quick": quick, "benches": results, "seconds": seconds, "summary": summary(results)}


def _pair(figure: dict[str, float]) -> str:
    """min / median of the file benches' ratios, best / median of bench infer's: the fastest run first."""
    return f"{figure.get('min', figure.get('best')):.2f} / {figure['median']:.2f}"


FILE_RATIOS = {
    "time_over_cp_sync": "work / (cp -r + sync)",
    "end_to_end_net_over_cp_sync": "end to end - import torch, transformers / (cp -r + sync)",
    "rss_growth_over_shard": "RSS growth / output shard",
}


def _file_rows(bench: str, result: dict[str, Any]) -> list[dict[str, str]]:
    """The file benches' headline ratios per mode, each with its goal where issue 19 set one."""
    rows = []
    for mode, r in result["ratios"].items():
        goals = result["targets"].get(mode, {})
        for key, what in FILE_RATIOS.items():
            target = f"<= {goals[key]}" if key in goals else ""
            rows.append({"bench": bench, "ratio": f"{mode}: {what}", "value": _pair(r[key]), "target": target})
    return rows


def summary(results: dict[str, Any]) -> list[dict[str, str]]:
    """One row per headline ratio: which bench, what is compared, best / median, and the stated target."""
    rows = []
    for bench in ("upgrade", "export"):
        if bench in results:
            rows += _file_rows(bench, results[bench])
    if "train" in results:
        r = results["train"]
        rows.append(
            {
                "bench": "train",
                "ratio": "step time DPA / original",
                "value": _pair(r["time_ratio"]),
                "target": f"FLOP ratio {r['flop_ratio']:.3f}",
            }
        )
        rows.append(
            {
                "bench": "train",
                "ratio": "(time ratio) / (FLOP ratio)",
                "value": _pair(r["time_over_flop_ratio"]),
                "target": "<= 1.1",
            }
        )
    if "infer" in results:
        r = results["infer"]["ratios"]
        rows.append(
            {
                "bench": "infer",
                "ratio": "decode tokens/s DPA / original",
                "value": _pair(r["decode_tokens_per_s"]),
                "target": ">= 0.98 when the LLM dominates",
            }
        )
        rows.append(
            {
                "bench": "infer",
                "ratio": "prefill s/image DPA / original",
                "value": _pair(r["prefill_s_per_image"]),
                "target": f"FLOP ratio {r['flops_per_image']:.3f}",
            }
        )
    return rows
