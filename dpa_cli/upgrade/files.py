"""The non-weight files of an upgraded checkpoint: config with `auto_map`, remote code, generation config."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import dpa_cli.model
from dpa_cli.upgrade.plan import UpgradePlan

# The paper skeleton's files travel too: configuration_dpa / modeling_dpa import them for a paper perceiver.
MODEL_CODE = (
    "configuration_dpa.py", "modeling_dpa.py", "processing_dpa.py", "configuration_paper_dpa.py", "modeling_paper_dpa.py",
)  # fmt: skip
AUTO_MAP = {
    "AutoConfig": "configuration_dpa.DPAConfig",
    "AutoModel": "modeling_dpa.DPAModel",
    "AutoModelForImageTextToText": "modeling_dpa.DPAForConditionalGeneration",
    # `transformers serve` loads VLMs with this class (see configuration_dpa._list_with_transformers_serve).
    "AutoModelForMultimodalLM": "modeling_dpa.DPAForConditionalGeneration",
}
GENERATION_KEYS = ("bos_token_id", "eos_token_id", "pad_token_id")


def copy_model_code(folder: Path) -> None:
    """The remote-code files, so plain transformers loads the folder with trust_remote_code=True."""
    source = Path(dpa_cli.model.__file__).parent
    for name in MODEL_CODE:
        shutil.copyfile(source / name, Path(folder) / name)


def write_config(plan: UpgradePlan, folder: Path) -> None:
    config: dict[str, Any] = plan.config.to_diff_dict()
    config.update(
        architectures=["DPAForConditionalGeneration"],
        auto_map=AUTO_MAP,
        dtype=str(plan.tensors[0].dtype).removeprefix("torch."),
    )
    (Path(folder) / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def write_generation_config(plan: UpgradePlan, folder: Path) -> None:
    """The target's own generation_config.json when it has one (its stop tokens), else one from its config."""
    target = plan.sources.target.files_path / "generation_config.json"
    if target.is_file():
        shutil.copyfile(target, Path(folder) / "generation_config.json")
        return
    text = plan.config.text_config
    values = {key: getattr(text, key, None) for key in GENERATION_KEYS}
    generation = {key: value for key, value in values.items() if value is not None}
    (Path(folder) / "generation_config.json").write_text(json.dumps(generation, indent=2, sort_keys=True) + "\n")


def write_model_files(plan: UpgradePlan, folder: Path) -> None:
    copy_model_code(folder)
    write_config(plan, folder)
    write_generation_config(plan, folder)
