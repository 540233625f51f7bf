"""The export's README.md: a Hugging Face model card written from dpa.yaml (sources, recipe, data, metrics)."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from dpa_cli import __version__
from dpa_cli.defaults import ExportLora, PartMode

PAPER = "Deep Pre-Alignment for VLMs (arXiv 2605.15300, ICML 2026)"


def _source(entry: dict[str, Any] | None) -> str:
    if not entry:
        return "-"
    name = entry.get("repo_id") or entry.get("spec") or entry.get("path") or "-"
    revision = f" @ {entry['revision'][:12]}" if entry.get("revision") else ""
    return f"`{name}`{revision} ({entry.get('family', '?')})"


def _sources(plan: dict[str, Any]) -> list[str]:
    perceiver = plan.get("perceiver") or {}
    rows = ["| role | model |", "|---|---|", f"| target | {_source(plan.get('target'))} |"]
    if perceiver.get("kind") == "composed":
        rows += [
            f"| perceiver ViT | {_source(perceiver.get('vit'))} |",
            f"| perceiver language model | {_source(perceiver.get('lm'))} |",
        ]
    else:
        rows.append(f"| perceiver | {_source(perceiver)} |")
    dims = plan.get("dimensions") or {}
    config = plan.get("config") or {}
    rows += [
        "",
        f"Projector phi: {dims.get('phi', '?')}; features: {config.get('feature_span', 'image')}; "
        f"early fusion: {'on' if config.get('early_fusion') else 'off'}; "
        f"encoding: {config.get('encoding', 'dpa')}.",
    ]
    return rows


def _short(value: Any) -> str:
    """A data fingerprint as one table cell, whatever shape the data module records it in."""
    if isinstance(value, dict):
        value = value.get("sha256") or json.dumps(value, sort_keys=True, default=str)
    text = str(value) if value is not None else "-"
    return text if len(text) <= 24 else text[:24] + "…"


def _stage_row(name: str, stage: dict[str, Any]) -> str:
    recipe = stage.get("recipe") or {}
    trained = ", ".join(
        f"{part} {mode}" for part, mode in (recipe.get("trainable") or {}).items() if mode != PartMode.FROZEN
    )
    data = stage.get("data") or {}
    loss = stage.get("final_loss")
    cells = [
        name,
        f"{recipe.get('name', '?')} ({trained or 'nothing'})",
        f"`{data.get('path', '-')}`",
        _short(data.get("fingerprint")),
        str(stage.get("steps", "-")),
        f"{loss:.4g}" if isinstance(loss, (int, float)) else "-",
        str(stage.get("tokens_seen", "-")),
    ]
    return "| " + " | ".join(cells) + " |"


def _training(stages: dict[str, Any]) -> list[str]:
    if not stages:
        return ["No stage has been trained: this is the upgraded model, with an untrained projector phi."]
    rows = [
        "| stage | recipe (trained parts) | data | data fingerprint | steps | final loss | tokens seen |",
        "|---|---|---|---|---|---|---|",
    ]
    return rows + [_stage_row(name, stage) for name, stage in sorted(stages.items()) if isinstance(stage, dict)]


def _export(export: dict[str, Any]) -> list[str]:
    verified = (
        f"reloaded with plain transformers in a fresh process; max |logit difference| on the probe "
        f"{export['max_abs_diff']:.3g} (tolerance {export['tolerance']:.3g})"
        if export.get("verified")
        else "not verified (--no-verify)"
    )
    lora = {"merged": "LoRA merged into the weights", "kept": "LoRA adapter kept in `adapter/`"}
    return [
        f"- from: {export['stage']} of the workspace",
        f"- weights: {export['dtype']}, {lora.get(export['lora'], 'no LoRA')}",
        f"- verification: {verified}",
    ]


_LOAD = """```python
from PIL import Image
{imports}

path = "{path}"
{model}
processor = AutoProcessor.from_pretrained(path, trust_remote_code=True)
messages = [{{"role": "user", "content": [{{"type": "image", "image": Image.open("photo.jpg")}},
                                         {{"type": "text", "text": "What is in this picture?"}}]}}]
inputs = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                       return_dict=True, return_tensors="pt")
output = model.generate(**inputs, max_new_tokens=64)
print(processor.decode(output[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True))
```"""
# (imports, the line that loads the model, what it needs): the weights alone, or with the kept adapter on top.
_MODEL = {
    "weights": (
        "from transformers import AutoModelForImageTextToText, AutoProcessor",
        "model = AutoModelForImageTextToText.from_pretrained(path, trust_remote_code=True)",
        "nothing else is needed",
    ),
    "adapter": (
        "from peft import AutoPeftModel\nfrom transformers import AutoProcessor",
        "# the adapter in adapter/ names this folder as its base; peft loads both and applies it unmerged\n"
        'model = AutoPeftModel.from_pretrained(f"{path}/adapter", trust_remote_code=True)',
        "peft applies the adapter, nothing else is needed",
    ),
}


def load_line(path: Path, kept_adapter: bool) -> str:
    """One line of Python that loads the export as it was verified (with its adapter when kept)."""
    if kept_adapter:
        where, module, cls = json.dumps(f"{path}/adapter"), "peft", "AutoPeftModel"
    else:
        where, module, cls = json.dumps(str(path)), "transformers", "AutoModelForImageTextToText"
    return f"from {module} import {cls}; model = {cls}.from_pretrained({where}, trust_remote_code=True)"


REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


def source_repo(entry: dict[str, Any] | None) -> str | None:
    """The Hub repo a source came from: its repo id, else the cache layout of its folder
    (`.../models--org--name/snapshots/...`), else the repo its config.json names (`_name_or_path`, kept by
    `save_pretrained` and by downloads), when that is a repo id rather than a local path."""
    if not entry:
        return None
    if entry.get("repo_id"):
        return entry["repo_id"]
    path = Path(str(entry.get("path") or ""))
    for part in path.parts:
        org, dashes, name = part.removeprefix("models--").partition("--")
        if part.startswith("models--") and dashes and REPO_ID.fullmatch(f"{org}/{name}"):
            return f"{org}/{name}"
    try:
        named = json.loads((path / "config.json").read_text(encoding="utf-8")).get("_name_or_path")
    except (OSError, ValueError, AttributeError):  # the folder moved since the upgrade, or an odd config
        return None
    if isinstance(named, str) and REPO_ID.fullmatch(named) and not Path(named).expanduser().exists():
        return named
    return None


def base_models(plan: dict[str, Any]) -> list[str]:
    """The repos the export is built from, target first, then the perceiver (its ViT and LM when composed)."""
    perceiver = plan.get("perceiver") or {}
    parts = [perceiver.get("vit"), perceiver.get("lm")] if perceiver.get("kind") == "composed" else [perceiver]
    repos = [source_repo(entry) for entry in (plan.get("target"), *parts)]
    return list(dict.fromkeys(repo for repo in repos if repo))


def _card_data(plan: dict[str, Any]) -> Any:
    from huggingface_hub import ModelCardData

    return ModelCardData(
        library_name="transformers",
        pipeline_tag="image-text-to-text",
        tags=["dpa", "deep-pre-alignment", "vision-language", "custom_code"],
        base_model=base_models(plan) or None,
    )


def model_card(manifest: dict[str, Any], export: dict[str, Any], path: Path, title: str) -> str:
    """README.md for the export at `path`, from the workspace manifest and the export's own summary."""
    plan = manifest.get("plan") or {}
    imports, model, needed = _MODEL["adapter" if export.get("lora") == ExportLora.KEPT else "weights"]
    load = _LOAD.format(path=path, imports=imports, model=model)
    lines = [
        f"# {title}",
        "",
        f"A vision-language model upgraded with {PAPER}: the target language model reads the final hidden states "
        "of a small VLM, the perceiver, at the image positions, mapped to its width by the projector phi. "
        f"Exported by dpa {__version__}.",
        "",
        "## Sources",
        "",
        *_sources(plan),
        "",
        "## Training",
        "",
        *_training(manifest.get("stages") or {}),
        "",
        "## This export",
        "",
        *_export(export),
        "",
        "## How to load",
        "",
        f"The model code ships in this folder (`trust_remote_code=True`); {needed}.",
        "",
        load,
        "",
    ]
    from huggingface_hub import ModelCard

    return str(ModelCard(f"---\n{_card_data(plan).to_yaml()}\n---\n\n" + "\n".join(lines)))
