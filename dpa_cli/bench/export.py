"""`dpa bench export`: the streamed LoRA merge against `cp -r` of the same files, and its memory against the shard.

Input: the DPA model `dpa bench upgrade` builds (about 1.6 GB in bf16) and a rank-32 LoRA adapter on every
linear layer of its target LLM, written in PEFT's format. The merge runs in a fresh child process.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from dpa_cli.bench.measure import breakdown, copy_seconds, ratios, run_in_child
from dpa_cli.bench.upgrade import build_inputs
from dpa_cli.checkpoint import read_checkpoint_index
from dpa_cli.checkpoint.seeds import tensor_seed
from dpa_cli.checkpoint.sizes import parse_size
from dpa_cli.train.recipe import DEFAULT_LORA_TARGETS

RANK = 32
# The goals of issue 19, against the durable copy (`cp -r` + `sync`); memory growth under one output shard.
TARGETS = {"merge": {"time_over_cp_sync": 1.5, "rss_growth_over_shard": 1.0}}

_MERGE = """
from pathlib import Path
from dpa_cli.export.merge import export_weights
import dpa_cli.model, transformers, torch  # noqa: F401


def work(base, out, adapter, shard):
    Path(out).mkdir()
    written = export_weights(Path(base), Path(out), Path(adapter), shard_size=int(shard))
    return {"merged_modules": written["merged_modules"]}
"""


def write_adapter(base: Path, folder: Path, rank: int = RANK) -> int:
    """A PEFT LoRA adapter (A and B random, so the merge changes every adapted weight); returns its modules."""
    folder.mkdir(parents=True)
    pattern = re.compile(DEFAULT_LORA_TARGETS.removesuffix("$") + r"\.weight$")
    tensors, modules = {}, []
    for key, info in read_checkpoint_index(base).tensors.items():
        if not pattern.match(key):
            continue
        module = key.removesuffix(".weight")
        generator = torch.Generator().manual_seed(tensor_seed(0, module))
        out_features, in_features = info.shape
        tensors[f"base_model.model.{module}.lora_A.weight"] = torch.randn(rank, in_features, generator=generator) * 0.01
        tensors[f"base_model.model.{module}.lora_B.weight"] = (
            torch.randn(out_features, rank, generator=generator) * 0.01
        )
        modules.append(module)
    save_file(tensors, folder / "adapter_model.safetensors", metadata={"format": "pt"})
    config = {
        "peft_type": "LORA",
        "r": rank,
        "lora_alpha": rank,
        "lora_dropout": 0.0,
        "bias": "none",
        "target_modules": DEFAULT_LORA_TARGETS,
        "base_model_name_or_path": str(base),
        "task_type": None,
    }
    (folder / "adapter_config.json").write_text(json.dumps(config, indent=2))
    return len(modules)


def bench_export(
    workdir: Path, target_bytes: str | int = "1.7GB", shard: str | int = "500MB", repeats: int = 3
) -> dict[str, Any]:
    """Upgrade a synthetic target once (not measured), then per repeat: `cp -r` of the DPA model, and the merge."""
    from dpa_cli.upgrade.plan import Options
    from dpa_cli.upgrade.run import plan_upgrade, run_upgrade

    workdir, shard = Path(workdir), parse_size(shard)
    target, lm = build_inputs(workdir, parse_size(target_bytes), parse_size("200MB"))
    run_upgrade(
        plan_upgrade(str(target), f"vit=target,lm={lm}", Options(shard_size=shard)), workdir / "ws", verify_load=False
    )
    base = workdir / "ws" / "model"
    modules = write_adapter(base, workdir / "adapter")
    copy_seconds(base, workdir / "warm", sync=True)
    runs = []
    for i in range(repeats):
        out = workdir / f"export-{i}"
        merge = run_in_child(_MERGE, str(base), str(out), str(workdir / "adapter"), str(shard))
        merge["largest_shard"] = max(s.size_on_disk for s in read_checkpoint_index(out).shards.values())
        shutil.rmtree(out)
        runs.append(
            {
                "cp_s": copy_seconds(base, workdir / "copy", sync=False),
                "cp_sync_s": copy_seconds(base, workdir / "copy", sync=True),
                "merge": merge,
            }
        )
    return {
        "input_bytes": read_checkpoint_index(base).total_bytes,
        "output_shard_size": shard,
        "lora_modules": modules,
        "lora_rank": RANK,
        "repeats": repeats,
        "ratios": {"merge": ratios(runs, "merge")},
        "breakdown": {"merge": breakdown(runs, "merge")},
        "targets": TARGETS,
        "runs": runs,
    }
