"""Resolve a MODEL argument (folder, Hugging Face repo id, or alias) to a local folder.

Repo ids come from the local hub cache first; a download happens only when the caller allows it.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from huggingface_hub import constants

from dpa_cli.catalog import expand_alias
from dpa_cli.errors import BadInputError, ModelNotFoundError


@dataclass(frozen=True)
class ResolvedModel:
    """A MODEL spec and the local folder it names; `revision` is the snapshot's commit hash."""

    path: Path
    source: Literal["folder", "hub-cache"]
    repo_id: str | None
    revision: str | None
    spec: str


def hub_cache_dir() -> Path:
    """The hub cache folder; huggingface_hub reads HF_HUB_CACHE once at import, we read it now."""
    env = os.environ.get("HF_HUB_CACHE")
    return Path(os.path.expandvars(env)).expanduser() if env else Path(constants.HF_HUB_CACHE)


def hub_offline() -> bool:
    """True when HF_HUB_OFFLINE is set, whether before huggingface_hub was imported or after."""
    from_env = os.environ.get("HF_HUB_OFFLINE", "").upper() in constants.ENV_VARS_TRUE_VALUES
    return constants.is_offline_mode() or from_env


def _looks_like_path(spec: str, local: Path) -> bool:
    return spec.startswith((".", "/", "~")) or spec.count(os.sep) > 1 or local.exists()


def _repo_id(spec: str) -> str:
    """`spec` if it is a valid `owner/name` repo id, else a ModelNotFoundError saying why."""
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    hint = "pass a model folder or a Hugging Face repo id such as Qwen/Qwen3-0.6B"
    if "/" not in spec:
        raise ModelNotFoundError(f"{spec!r} is neither a folder nor a repo id (OWNER/NAME)", hint=hint)
    try:
        validate_repo_id(spec)
    except HFValidationError as err:
        what = f"{spec!r} is neither a folder nor a valid repo id: {err}"
        raise ModelNotFoundError(what, hint=hint) from None
    return spec


def _not_cached(repo_id: str, revision: str | None) -> ModelNotFoundError:
    at = f" at revision {revision}" if revision else ""
    command = f"hf download {repo_id}" + (f" --revision {revision}" if revision else "")
    why = "HF_HUB_OFFLINE is set, so nothing is downloaded" if hub_offline() else "downloads are off"
    return ModelNotFoundError(
        f"{repo_id}{at} is not in the local Hugging Face cache ({hub_cache_dir()}); {why}",
        hint=f"fetch it with `{command}` (with network access and HF_HUB_OFFLINE unset)",
    )


def _snapshot(repo_id: str, revision: str | None, allow_download: bool) -> Path:
    """The cached snapshot folder, downloading it only when allowed and online."""
    # Imported here: huggingface_hub's API module costs half a second, and folders never need it.
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    cache_dir = hub_cache_dir()
    try:
        return Path(snapshot_download(repo_id, revision=revision, cache_dir=cache_dir, local_files_only=True))
    except LocalEntryNotFoundError:  # also raised for a partly downloaded snapshot
        if hub_offline() or not allow_download:
            raise _not_cached(repo_id, revision) from None
    try:
        return Path(snapshot_download(repo_id, revision=revision, cache_dir=cache_dir))
    except (HfHubHTTPError, LocalEntryNotFoundError) as err:
        reason = str(err).splitlines()[0]
        raise ModelNotFoundError(f"could not download {repo_id}: {reason}") from None


def resolve_model(
    spec: str, *, revision: str | None = None, allow_download: bool = False, aliases: Mapping[str, str] | None = None
) -> ResolvedModel:
    """Turn MODEL into a local folder: an alias is looked up first, then folder, then repo id.

    `aliases` maps a short name to another spec; by default the catalog's aliases are used.
    """
    target = aliases.get(spec, spec) if aliases is not None else expand_alias(spec)
    local = Path(target).expanduser()
    if local.is_dir():
        if revision is not None:
            raise BadInputError(f"revision {revision!r} applies only to repo ids, but {target} is a folder")
        return ResolvedModel(local.resolve(), "folder", None, None, spec)
    if _looks_like_path(target, local):
        what = "not a folder" if local.exists() else "no such folder"
        raise ModelNotFoundError(f"{what}: {target}", hint="pass a model folder or a repo id (OWNER/NAME)")
    repo_id = _repo_id(target)
    path = _snapshot(repo_id, revision, allow_download)
    # snapshot_download returns <cache>/models--owner--name/snapshots/<commit hash>.
    return ResolvedModel(path, "hub-cache", repo_id, path.name, spec)
