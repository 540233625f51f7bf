"""`dpa analyze modality-gap`: how far apart image and text tokens are in every layer of the target LLM.

Each model reads the same image-text pairs; the hidden states of its language model (`output_hidden_states`,
index 0 = the input embeddings, the last = after the final norm) are split into image positions
(`input_ids == image_token_id`, after the processor expanded each image to its features) and text positions
(every other attended token except special tokens), and summarised per layer (dpa_cli.analyze.gap_stats).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from dpa_cli.analyze.gap_stats import LayerStats
from dpa_cli.analyze.pairs import Pair, load_pairs, pair_inputs
from dpa_cli.errors import BadInputError, DpaError

log = logging.getLogger(__name__)
Progress = Callable[[str, int, int], None]  # (model role, pairs done, pairs in all)


def image_token_id(model: Any) -> int:
    config = model.config
    for name in ("image_token_id", "image_token_index"):
        value = getattr(config, name, None)
        if value is not None:
            return int(value)
    raise BadInputError(
        f"{config.model_type} model: its config names no image token (image_token_id)",
        hint="the analysis needs a vision-language model whose text holds image-token slots",
    )


def _masks(inputs: Any, image_id: int, special_ids: list[int], pair_id: str) -> tuple[Any, Any]:
    import torch

    ids = inputs["input_ids"][0]
    attended = inputs["attention_mask"][0].bool() if "attention_mask" in inputs else torch.ones_like(ids, dtype=bool)
    image = (ids == image_id) & attended
    text = attended & ~image & ~torch.isin(ids, torch.tensor(special_ids, dtype=ids.dtype, device=ids.device))
    if not image.any() or not text.any():
        what = "image" if not image.any() else "text"
        raise BadInputError(
            f"sample {pair_id}: no {what} positions in the target sequence (image token id {image_id})",
            hint="the sample needs an image and some text; is the processor the model's own?",
        )
    return image, text


def collect(runnable: Any, pairs: list[Pair], on_pair: Callable[[int], None] | None = None) -> list[LayerStats]:
    """Per-layer statistics of the runnable's language model over `pairs`, one forward pass per pair."""
    import torch

    model, processor = runnable.model, runnable.processor
    image_id, special = image_token_id(model), list(processor.tokenizer.all_special_ids)
    dtype = next(model.parameters()).dtype
    layers: list[LayerStats] = []
    for done, pair in enumerate(pairs, start=1):
        inputs = pair_inputs(processor, pair.messages).to(device=runnable.device, dtype=dtype)
        image, text = _masks(inputs, image_id, special, pair.id)
        with torch.no_grad():
            hidden = model(**inputs, output_hidden_states=True, use_cache=False).hidden_states
        layers = layers or [LayerStats() for _ in hidden]
        for stats, states in zip(layers, hidden):  # states: [1, seq, hidden]
            stats.image.add(states[0][image])
            stats.text.add(states[0][text])
        if on_pair:
            on_pair(done)
    return layers


def _workspace_of(source: Any) -> Path | None:
    from dpa_cli.workspace.manifest import is_workspace

    if source.workspace is not None:
        return source.workspace
    return next((folder for folder in list(source.model_dir.parents)[:3] if is_workspace(folder)), None)


def default_baseline(model: str) -> tuple[str | None, str]:
    """The original model MODEL was upgraded from, as dpa.yaml records it, and a note saying where it came from."""
    from dpa_cli.workspace.manifest import read_manifest
    from dpa_cli.workspace.results import find_runnable

    workspace = _workspace_of(find_runnable(model))
    if workspace is None:
        return None, f"no baseline: {model} is not in a workspace; pass --baseline ORIGINAL to compare"
    target = (read_manifest(workspace).get("plan") or {}).get("target") or {}
    if target.get("path") and Path(target["path"]).is_dir():
        return target["path"], f"baseline: the upgraded target recorded in {workspace / 'dpa.yaml'}"
    if target.get("repo_id"):
        from dpa_cli.hub import resolve_model

        try:
            path = resolve_model(target["repo_id"], revision=target.get("revision")).path
        except DpaError as err:
            return None, f"no baseline: {err.message}; pass --baseline ORIGINAL to compare"
        return str(path), f"baseline: {target['repo_id']} from the local cache"
    return None, f"no baseline: the target in {workspace / 'dpa.yaml'} is gone; pass --baseline ORIGINAL"


def _rows(role: str, runnable: Any, layers: list[LayerStats]) -> list[dict[str, Any]]:
    where = {"role": role, "model_type": runnable.model.config.model_type, "path": str(runnable.source.model_dir)}
    return [{**where, "layer": index, **stats.measures()} for index, stats in enumerate(layers)]


def modality_gap(
    model: str,
    data: str | Path,
    baseline: str | None = None,
    image_root: str | Path | None = None,
    limit: int = 32,
    device: str | None = None,
    progress: Progress | None = None,
    allow_code: bool = False,
) -> dict[str, Any]:
    """Per-layer modality-gap rows for MODEL and its baseline (by default the target dpa.yaml records).
    `allow_code` (--trust-remote-code) lets both models' folders run their own model code."""
    from dpa_cli.generate import check_runnable, open_runnable

    started = time.perf_counter()
    notes: list[str] = []
    if baseline is None:
        baseline, note = default_baseline(model)
        notes.append(note)
    pairs = load_pairs(data, image_root, limit)  # decoded first: a bad image is named before a model loads
    rows: list[dict[str, Any]] = []
    models = [("model", model), *([("baseline", baseline)] if baseline else [])]
    for _, spec in models:  # a model the trust gate refuses is named before the first one works
        check_runnable(spec, allow_code)
    for role, spec in models:
        runnable = open_runnable(spec, device=device, allow_code=allow_code)
        report = (lambda done, role=role: progress(role, done, len(pairs))) if progress else None
        rows += _rows(role, runnable, collect(runnable, pairs, report))
        del runnable
    return {
        "rows": rows,
        "samples": len(pairs),
        "models": [{"role": r, "spec": s} for r, s in models],
        "notes": notes,
        "seconds": round(time.perf_counter() - started, 3),
    }
