"""The workspace's record, and finding the workspace the way git finds a repo.

`WORKSPACE/dpa.yaml` records the sources, the plan, the options, the versions and the stages done; it is
only ever replaced whole (temp + fsync + rename).
"""

from __future__ import annotations

import os
import platform
from importlib import metadata
from pathlib import Path
from typing import Any

import yaml

from dpa_cli import __version__
from dpa_cli.checkpoint.atomic import write_text_atomic
from dpa_cli.describe import check_json_files
from dpa_cli.errors import BadInputError
from dpa_cli.families import check_config
from dpa_cli.jsonio import PARSE_ERRORS, parse_yaml, read_json, read_regular, reason
from dpa_cli.records import MANIFEST_HINT, check_manifest
from dpa_cli.workspace.layout import MANIFEST

FORMAT = 1  # bumped when dpa.yaml changes shape
LIBRARIES = ("torch", "transformers", "safetensors", "peft", "accelerate", "deepspeed", "tokenizers")


def is_workspace(folder: Path) -> bool:
    """Whether `folder` is a workspace dpa wrote (its dpa.yaml says so; whether it is intact, `read_manifest`
    says)."""
    try:
        manifest = parse_yaml(read_regular(Path(folder) / MANIFEST))
    except (OSError, *PARSE_ERRORS):
        return False
    return isinstance(manifest, dict) and manifest.get("dpa_workspace") == FORMAT


def find_workspace(explicit: str | Path | None = None, cwd: Path | None = None) -> Path:
    """--workspace, else $DPA_WORKSPACE, else cwd or a parent holding dpa.yaml, else the one child that does."""
    if explicit or os.environ.get("DPA_WORKSPACE"):
        folder = Path(explicit or os.environ["DPA_WORKSPACE"]).expanduser()
        if (folder / MANIFEST).is_file() and not is_workspace(folder):
            read_manifest(folder)  # says what is wrong with the dpa.yaml that is there
        if not is_workspace(folder):
            raise BadInputError(f"{folder} is not a dpa workspace (no {MANIFEST})", hint="run `dpa upgrade` first")
        return folder.resolve()
    cwd = (cwd or Path.cwd()).resolve()
    for folder in (cwd, *cwd.parents):
        if is_workspace(folder):
            return folder
    children = sorted(child for child in cwd.iterdir() if child.is_dir() and is_workspace(child))
    if len(children) == 1:
        return children[0]
    if children:
        names = ", ".join(child.name for child in children)
        raise BadInputError(f"several workspaces here ({names})", hint="pick one with --workspace")
    raise BadInputError(
        f"no dpa workspace in {cwd} or its parents",
        hint="run `dpa upgrade TARGET --perceiver PERCEIVER` first, or pass --workspace",
    )


def versions() -> dict[str, str]:
    """The tool and library versions a run used, for the record."""
    found = {"dpa": __version__, "python": platform.python_version()}
    for name in LIBRARIES:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return found


def read_manifest(workspace: Path) -> dict[str, Any]:
    """The workspace's dpa.yaml, checked against the shape dpa writes (`dpa_cli.records.WORKSPACE`): every
    command that reads a workspace comes through here, so a hand edit is named by its key path once, and a
    `checksums:` path that leaves the workspace is refused before anything follows it."""
    path = Path(workspace) / MANIFEST
    try:
        manifest = parse_yaml(read_regular(path))
    except OSError as err:
        raise BadInputError(f"{path}: cannot read it ({err.strerror})", hint=MANIFEST_HINT) from None
    except PARSE_ERRORS as err:
        raise BadInputError(f"{path}: cannot read it ({reason(err)})", hint=MANIFEST_HINT) from None
    if not isinstance(manifest, dict) or manifest.get("dpa_workspace") != FORMAT:
        raise BadInputError(
            f"{path}: not a dpa workspace manifest (no `dpa_workspace: {FORMAT}` mapping)", hint=MANIFEST_HINT
        )
    return check_manifest(manifest, Path(workspace), str(path))


def check_model_folder(folder: Path, manifest: dict[str, Any], hint: str | None = None, what: str = "") -> None:
    """A workspace's model folder (the upgrade's or a stage's, or a --from folder) must hold the DPA model its
    dpa.yaml describes: a folder swapped for another model is refused before anything loads it."""
    path = Path(folder) / "config.json"
    hint = hint or "restore the folder from the run that wrote it, or point --workspace at the workspace it belongs to"
    config = read_json(path, where=f"{what}{path}", hint=hint)
    kind = config.get("model_type") if isinstance(config, dict) else None
    if kind != "dpa":
        raise BadInputError(f"{what}{folder} holds a {kind!r} model, not the DPA model of this workspace", hint=hint)
    check_config(config, str(path))
    check_json_files(folder)
    width = (manifest.get("plan") or {}).get("dimensions", {}).get("target_width")
    text = config.get("text_config")
    have = text.get("hidden_size") if isinstance(text, dict) else None
    if width is not None and have is not None and width != have:
        raise BadInputError(
            f"{what}{folder} holds a DPA model of target width {have}, not the DPA model of this "
            f"workspace (dpa.yaml: target width {width})",
            hint=hint,
        )


def write_manifest(workspace: Path, manifest: dict[str, Any]) -> None:
    """Replace dpa.yaml in one rename: a crash leaves the old file or the new one, never half."""
    manifest = {"dpa_workspace": FORMAT, **{k: v for k, v in manifest.items() if k != "dpa_workspace"}}
    write_text_atomic(Path(workspace) / MANIFEST, yaml.safe_dump(manifest, sort_keys=False, allow_unicode=True))
