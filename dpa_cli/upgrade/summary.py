"""The plan as people and scripts read it: kept / dropped / new parts, widths, dtypes, sizes (JSON-ready)."""

from __future__ import annotations

from collections import defaultdict
from typing import Any

from dpa_cli.parts import part_of
from dpa_cli.upgrade.plan import PHI, TensorPlan, UpgradePlan

LABELS = {"vit": "perceiver vision", "perceiver_lm": "perceiver language_model", "phi": "phi"}


def dpa_part(plan: UpgradePlan, name: str) -> str:
    """A people's label for the part an output tensor belongs to, e.g. `perceiver vision`, `target lm_head`."""
    part = part_of(name, (plan.sources.perceiver or plan.sources.vit).family)
    if part == "phi_p":
        return "phi_p" if plan.sources.composed else "perceiver projector"
    if part == "llm":
        return "target lm_head" if name.startswith("lm_head.") else "target language_model"
    return LABELS[part]


def _parts(plan: UpgradePlan) -> dict[str, dict[str, Any]]:
    parts: dict[str, dict[str, Any]] = defaultdict(lambda: {"from": set(), "tensors": 0, "params": 0})
    for tensor in plan.tensors:
        part = parts[dpa_part(plan, tensor.name)]
        part["from"].add(tensor.source)
        part["tensors"] += 1
        part["params"] += tensor.spec.numel
    return {name: {**part, "from": sorted(part["from"])} for name, part in parts.items()}


def _new(plan: UpgradePlan, tensors: list[TensorPlan]) -> dict[str, Any]:
    return {
        "shapes": {t.name: list(t.shape) for t in tensors},
        "params": sum(t.spec.numel for t in tensors),
        "init": sorted({t.init for t in tensors}),
        "seed": plan.options.seed,
    }


def plan_summary(plan: UpgradePlan) -> dict[str, Any]:
    """Everything `--dry-run` shows, as one JSON-ready dict."""
    config, parts = plan.config, _parts(plan)
    stage1 = {"phi", "phi_p"} if plan.sources.composed else {"phi"}
    new = [t for t in plan.tensors if t.source == "new"]
    phi_p = [t for t in new if dpa_part(plan, t.name) == "phi_p" or t.name.endswith("image_newline")]
    return {
        "target": plan.sources.target.describe_source(),
        "perceiver": _perceiver_sources(plan),
        "dimensions": {
            "perceiver_width": config.perceiver_hidden_size,
            "target_width": config.text_config.hidden_size,
            "phi": f"{config.projector_type}: {config.perceiver_hidden_size} -> {config.text_config.hidden_size}",
        },
        "kept": {name: part for name, part in parts.items() if "new" not in part["from"]},
        "dropped": plan.dropped,
        "new": {}
        if plan.sources.converted
        else {
            "phi": _new(plan, [t for t in new if t.name.startswith(PHI)]),
            **({"phi_p": _new(plan, phi_p)} if phi_p else {}),
        },
        "config": {
            "projector_type": config.projector_type,
            "feature_span": config.feature_span,
            "early_fusion": config.early_fusion,
            "encoding": config.encoding,
            "tie_word_embeddings": config.tie_word_embeddings,
            "image_token": plan.placeholders["target"].as_dict(),
            "perceiver_image_token": plan.placeholders["perceiver"].as_dict(),
        },
        "dtype": str(plan.tensors[0].dtype).removeprefix("torch."),
        "total_params": sum(t.spec.numel for t in plan.tensors),
        # Stage 1 trains phi, and phi_p when the perceiver was composed (train/stage.py).
        "trainable_stage1_params": sum(t.spec.numel for t in plan.tensors if dpa_part(plan, t.name) in stage1),
        "converted": plan.sources.converted,
        "output_bytes": plan.output_bytes,
        "num_shards": plan.num_shards,
        "shard_size": plan.options.shard_size,
        "notes": plan.notes,
    }


def _perceiver_sources(plan: UpgradePlan) -> dict[str, Any]:
    sources = plan.sources
    if sources.perceiver is not None:
        return {"kind": "existing", **sources.perceiver.describe_source()}
    return {
        "kind": "composed",
        "spec": str(sources.composed),
        "family": sources.vit.family.name,
        "vit": sources.vit.describe_source(),
        "lm": sources.lm.describe_source(),
        "phi_p_trained": False,
    }
