"""Where everything lives in a workspace: the one place that spells its folder and file names.

WORKSPACE/
  dpa.yaml                 the record (sources, plan, options, versions, stages done)
  model/                   the upgraded DPA model
  stageN/                  a stage's run: checkpoint-K/, metrics.jsonl, then its result:
    model/                 the trained weights (a LoRA stage: the base with the trained phi)
    adapter/               a LoRA stage's PEFT adapter, applied unmerged
  .stageN.restart/         a `--restart` building the stage anew beside the old one
  export/                  `dpa export`'s default output (dpa_export.json inside)
  .cache/                  sample-length caches of data whose own folder cannot take them
"""

from __future__ import annotations

from pathlib import Path

MANIFEST = "dpa.yaml"
MODEL_DIR = "model"
ADAPTER_DIR = "adapter"
ADAPTER_CONFIG = "adapter_config.json"
EXPORT_DIR = "export"
EXPORT_RECORD = "dpa_export.json"
METRICS_FILE = "metrics.jsonl"
CACHE_DIR = ".cache"  # sample-length caches of data whose own folder cannot take them
STAGES = (2, 1)  # newest first


def stage_name(stage: int) -> str:
    return f"stage{stage}"


def stage_dir(workspace: Path, stage: int) -> Path:
    return Path(workspace) / stage_name(stage)


def stage_model_dir(workspace: Path, stage: int) -> Path:
    return stage_dir(workspace, stage) / MODEL_DIR


def restart_dir(workspace: Path, stage: int) -> Path:
    """Where a `--restart` builds the stage anew while the old stage folder stays as it was."""
    return Path(workspace) / f".{stage_name(stage)}.restart"


def has_adapter(folder: Path) -> bool:
    return (Path(folder) / ADAPTER_CONFIG).is_file()


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The newest complete `checkpoint-K` of a stage's run (the trainer's staging leftovers never are)."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return None
    found = [p for p in run_dir.glob("checkpoint-*") if p.is_dir() and p.name.split("-")[-1].isdigit()]
    return max(found, key=lambda p: int(p.name.split("-")[-1]), default=None)
