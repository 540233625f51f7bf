"""The non-weight files of an upgraded checkpoint: config with `auto_map`, remote code, generation config."""

from __future__ import annotations

from pathlib import Path

from dpa_cli.checkpoint.side_files import copy_model_code, remote_code_config, write_generation_config, write_json
from dpa_cli.upgrade.plan import UpgradePlan


def write_model_files(plan: UpgradePlan, folder: Path) -> None:
    copy_model_code(folder)
    dtype = str(plan.tensors[0].dtype).removeprefix("torch.")
    write_json(Path(folder) / "config.json", remote_code_config(plan.config.to_diff_dict(), dtype))
    target = plan.sources.target.files_path
    write_generation_config(folder, [target], plan.config.text_config.to_dict(), tokenizer_folder=target)
