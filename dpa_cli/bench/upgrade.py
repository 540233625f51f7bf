"""`dpa bench upgrade`: surgery time against `cp -r` of the same input, and peak memory against the shard size.

Both sides run in one invocation on the same synthetic checkpoint: a LLaVA-NeXT target with a Qwen3 text
model sized to `target_bytes`, upgraded with a composed perceiver (its own ViT + a small Qwen3) by the `dpa upgrade`
command itself, in a child process that imports first what the command imports (timed apart), then runs it
(`bench/measure.py`).
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from dpa_cli.bench.measure import breakdown, copy_seconds, ratios, run_in_child
from dpa_cli.checkpoint import read_checkpoint_index
from dpa_cli.checkpoint.sizes import parse_size
from dpa_cli.synthetic.checkpoints import build_llava_next_target, build_text_lm, text_config

HIDDEN = 2048
VOCAB = 32768

# The command as a user runs it, in-process after the imports it makes anyway (they are timed before the work).
_UPGRADE = """
from dpa_cli.cli.app import app
import dpa_cli.model, dpa_cli.upgrade.run, transformers, torch  # noqa: F401


def work(target, perceiver, out, shard, dtype):
    args = ["upgrade", target, "--perceiver", perceiver, "-o", out, "--shard-size", shard, "--dtype", dtype,
            "--no-verify-load", "--json"]
    code = app(args, prog_name="dpa", standalone_mode=False)
    if code:
        raise SystemExit(f"dpa upgrade exited with {code}")
"""


def _widths(target_bytes: int) -> tuple[int, int]:
    """(hidden, vocab): HIDDEN x VOCAB from about 1 GB up; both halved below, until the embeddings and LM head take
    at most a third, so a small `--size` gives a small input (the smoke tests, `dpa bench all --quick`)."""
    hidden, vocab = HIDDEN, VOCAB
    while hidden > 256 and 2 * 2 * vocab * hidden > target_bytes / 3:
        hidden, vocab = hidden // 2, vocab // 2
    return hidden, vocab


def _layers_for(target_bytes: int, hidden: int, vocab: int) -> int:
    """Qwen3 blocks of width `hidden` (bf16) that, with embeddings and LM head, fill about `target_bytes`."""
    per_layer = 2 * (4 * hidden * hidden + 3 * hidden * 3 * hidden)
    embeddings = 2 * 2 * vocab * hidden
    return max(1, round((target_bytes - embeddings) / per_layer))


def build_inputs(workdir: Path, target_bytes: int, input_shard: int) -> tuple[Path, Path]:
    """A synthetic LLaVA-NeXT target of about `target_bytes` and a small Qwen3 LM, with tokenizers."""
    hidden, vocab = _widths(target_bytes)
    text = text_config(hidden, _layers_for(target_bytes, hidden, vocab), vocab, tie=False)
    target = build_llava_next_target(workdir / "target", text, shard_size=input_shard)
    lm = build_text_lm(workdir / "small-lm", text_config(min(512, hidden), 4, vocab), shard_size=input_shard)
    return target, lm


def _upgrade_run(target: Path, lm: Path, out: Path, shard: int, dtype: str) -> dict[str, Any]:
    run = run_in_child(_UPGRADE, str(target), f"vit=target,lm={lm}", str(out), str(shard), dtype)
    run["largest_shard"] = max(s.size_on_disk for s in read_checkpoint_index(out / "model").shards.values())
    shutil.rmtree(out)
    return run


def bench_upgrade(
    workdir: Path,
    target_bytes: str | int = "1.7GB",
    input_shard: str | int = "200MB",
    output_shard: str | int = "500MB",
    repeats: int = 3,
) -> dict[str, Any]:
    """Build the inputs, then per repeat: `cp -r` (with and without sync), the upgrade keeping the target's
    dtype (tensors copied in the kernel), and the upgrade casting to fp16 (every tensor loaded and cast)."""
    workdir = Path(workdir)
    target, lm = build_inputs(workdir, parse_size(target_bytes), parse_size(input_shard))
    shard = parse_size(output_shard)
    copy_seconds(target, workdir / "warm", sync=True)  # every side then reads the input from the page cache
    runs = []
    for i in range(repeats):
        runs.append(
            {
                "cp_s": copy_seconds(target, workdir / "copy", sync=False),
                "cp_sync_s": copy_seconds(target, workdir / "copy", sync=True),
                "keep_dtype": _upgrade_run(target, lm, workdir / f"ws-{i}", shard, "auto"),
                "cast_fp16": _upgrade_run(target, lm, workdir / f"ws-{i}", shard, "fp16"),
            }
        )
    return _report(runs, read_checkpoint_index(target).total_bytes, shard)


# The goals of issue 19, against the durable copy (`cp -r` + `sync`); memory growth under one output shard.
TARGETS = {
    "keep_dtype": {"time_over_cp_sync": 1.1, "end_to_end_net_over_cp_sync": 1.3, "rss_growth_over_shard": 1.0},
    "cast_fp16": {"time_over_cp_sync": 2.0, "rss_growth_over_shard": 1.0},
}
MODES = tuple(TARGETS)


def _report(runs: list[dict[str, Any]], input_bytes: int, shard: int) -> dict[str, Any]:
    return {
        "input_bytes": input_bytes,
        "output_shard_size": shard,
        "repeats": len(runs),
        "ratios": {mode: ratios(runs, mode) for mode in MODES},
        "breakdown": {mode: breakdown(runs, mode) for mode in MODES},
        "targets": TARGETS,
        "runs": runs,
    }
