"""Whose code runs: a model folder's own Python (`auto_map` remote code) only when it is dpa's, byte for byte.

dpa writes its model files next to every checkpoint it makes so plain transformers can load them. When
dpa itself loads a folder, that code runs only if each file `auto_map` names has the sha256 of the copy
installed with dpa (so nothing new runs); otherwise transformers uses dpa's installed classes, registered
for `model_type: dpa`, and the folder's code is ignored with a warning. `--trust-remote-code` lifts this.
Input checkpoints of other families are always loaded with `trust_remote_code=False`.
"""

from __future__ import annotations

import functools
import logging
from pathlib import Path

from dpa_cli.checkpoint import sha256_file
from dpa_cli.jsonio import PARSE_ERRORS, parse_json

log = logging.getLogger(__name__)
CONFIG_FILES = ("config.json", "processor_config.json", "tokenizer_config.json", "preprocessor_config.json")


@functools.cache
def own_code() -> dict[str, str]:
    """{file name: sha256} of the DPA model files installed with dpa."""
    import dpa_cli.model

    folder = Path(dpa_cli.model.__file__).parent
    return {path.name: sha256_file(path) for path in sorted(folder.glob("*_dpa.py"))}


def _code_files(folder: Path) -> set[str]:
    """The Python files the folder's configs point transformers at (`auto_map` values, `module.Class`)."""
    files: set[str] = set()
    for name in CONFIG_FILES:
        try:
            config = parse_json((folder / name).read_bytes())
        except (OSError, *PARSE_ERRORS):
            continue
        auto_map = config.get("auto_map") if isinstance(config, dict) else None
        for value in (auto_map or {}).values():
            for ref in value if isinstance(value, list) else [value]:
                if isinstance(ref, str) and "." in ref:
                    files.add(ref.split("--")[-1].rsplit(".", 1)[0] + ".py")
    return files


def trust_remote_code(folder: str | Path, allow: bool = False) -> bool:
    """The `trust_remote_code` to load `folder` with: True only for dpa's own code (or when the user allows it)."""
    if allow:
        return True
    folder = Path(folder)
    files = _code_files(folder)
    if not files:
        return False
    ours = own_code()
    foreign = sorted(f for f in files if f not in ours or not (folder / f).is_file() or sha256_file(folder / f) != ours[f])
    if foreign:
        log.warning(
            "%s carries model code that is not dpa's own (%s): it is not run; dpa's installed classes load the "
            "folder instead (pass --trust-remote-code to run it)", folder, ", ".join(foreign),
        )  # fmt: skip
        return False
    return True
