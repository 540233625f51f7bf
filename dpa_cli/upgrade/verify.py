"""After writing: every planned key, shape and dtype is on disk; then (when small enough) load and run it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from dpa_cli import loading
from dpa_cli.checkpoint import read_checkpoint_index
from dpa_cli.checkpoint.writer import SAFETENSORS_DTYPES
from dpa_cli.errors import DpaError
from dpa_cli.upgrade.plan import UpgradePlan

AUTO_VERIFY_BYTES = 2 * 10**9  # DESIGN: load automatically up to 2 GB on disk, else only with --verify-load


def check_written(plan: UpgradePlan, folder: Path) -> dict[str, Any]:
    """Reopen the written shards (headers only) and compare them with the plan, key by key."""
    index = read_checkpoint_index(folder)
    planned = {t.name: t for t in plan.tensors}
    problems = sorted(set(planned) ^ set(index.tensors))
    for name, info in index.tensors.items():
        want = planned.get(name)
        if want is not None and (info.shape != want.shape or info.dtype != SAFETENSORS_DTYPES[want.dtype]):
            problems.append(name)
    if problems:
        raise DpaError(
            f"{folder}: the written checkpoint differs from the plan at {problems[0]!r} ({len(problems)} keys)"
        )
    return {"keys": len(index.tensors), "shards": len(index.files), "bytes": index.total_bytes}


def load_and_run(folder: Path) -> dict[str, Any]:
    """Load the checkpoint as a user would (Auto classes, remote code) and run one forward on an image."""
    try:
        return _load_and_run(folder)
    except DpaError:
        raise
    except Exception as err:  # any failure here is ours, not the user's: say so in one line
        raise DpaError(
            f"the upgraded model failed its load-and-run check: {type(err).__name__}: {str(err).splitlines()[0]}",
            hint="nothing was written; please report this with `dpa upgrade --dry-run --json` output",
        ) from err


def _load_and_run(folder: Path) -> dict[str, Any]:
    import torch
    from PIL import Image
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()  # our own output says what is being checked
    model, info = loading.load_model(folder, output_loading_info=True, dtype=torch.float32)
    missing, unexpected = info["missing_keys"], info["unexpected_keys"]
    if missing or unexpected:
        raise DpaError(
            f"{folder}: loading left keys missing {sorted(missing)[:3]} / unexpected {sorted(unexpected)[:3]}"
        )
    processor = loading.load_processor(folder)
    image = Image.new("RGB", (64, 48), (120, 160, 200))
    prompt = "Describe the image."
    fusion = {"perceiver_text": [prompt]} if processor.early_fusion else {}  # early fusion: the turn's text first
    inputs = processor(images=[image], text=[f"{processor.image_token} {prompt}"], return_tensors="pt", **fusion)
    with torch.no_grad():
        logits = model.eval()(**inputs).logits
    if not torch.isfinite(logits).all():
        raise DpaError(f"{folder}: the upgraded model's forward gives non-finite logits")
    slots = torch.isin(inputs["input_ids"], torch.tensor(model.config.image_slot_token_ids))
    return {"loaded": True, "forward": "ok", "image_features": int(slots.sum())}
