"""`dpa upgrade` as one library call: resolve, plan, refuse what cannot work, write a workspace atomically."""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from dataclasses import asdict
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from dpa_cli.checkpoint.atomic import check_replaceable, staged_folder
from dpa_cli.checksums import CHECKSUMS, tree_checksums
from dpa_cli.errors import BadInputError
from dpa_cli.upgrade.files import write_model_files
from dpa_cli.upgrade.fingerprint import InputHashes
from dpa_cli.upgrade.plan import Options, UpgradePlan, build_plan
from dpa_cli.upgrade.processor import write_processor
from dpa_cli.upgrade.sources import Sources, open_sources
from dpa_cli.upgrade.summary import plan_summary
from dpa_cli.upgrade.surgery import write_weights
from dpa_cli.upgrade.verify import AUTO_VERIFY_BYTES, check_written, load_and_run
from dpa_cli.workspace.layout import MODEL_DIR
from dpa_cli.workspace.manifest import is_workspace, versions, write_manifest


def plan_upgrade(
    target: str, perceiver: str | None, options: Options, inputs: InputHashes | None = None
) -> UpgradePlan:
    """The surgery plan. `inputs`, when given, starts hashing the input folders first: the imports and the
    meta-device models below keep one core busy for seconds, the hashing takes the other."""
    if inputs is not None:
        inputs.start(input_folders(target, perceiver))
    import dpa_cli.model  # noqa: F401  registers the DPA classes the plan is checked against

    return build_plan(open_sources(target, perceiver), options)


def input_folders(target: str, perceiver: str | None) -> list[Path]:
    """The folders the specs name, as far as they resolve; `open_sources` reports any that does not."""
    from dpa_cli.errors import DpaError
    from dpa_cli.hub import resolve_model
    from dpa_cli.upgrade.sources import ComposedSpec, parse_perceiver_spec

    folders = []
    try:
        folders.append(resolve_model(target).path)
        if perceiver is None:  # an official DPA checkpoint: the target holds the perceiver
            return folders
        parsed = parse_perceiver_spec(perceiver)
        specs = [parsed.vit, parsed.lm] if isinstance(parsed, ComposedSpec) else [parsed]
        folders += [resolve_model(spec).path for spec in specs if spec != "target"]
    except (DpaError, OSError):
        pass
    return folders


def _slug(spec: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", spec.rstrip("/").rsplit("/", 1)[-1]).strip("-").lower() or "model"


def default_workspace(target: str, perceiver: str | None) -> Path:
    """`<target>-dpa-<perceiver>` in the current folder, named after the specs the user typed (an official DPA
    checkpoint, which has its perceiver: `<target>-workspace`)."""
    if perceiver is None:
        return Path.cwd() / f"{_slug(target)}-workspace"
    lm = re.search(r"lm=([^,]+)", perceiver)
    return Path.cwd() / f"{_slug(target)}-dpa-{_slug(lm.group(1) if lm else perceiver)}"


def _inside(path: Path, folder: Path) -> bool:
    return path == folder or folder in path.parents


def check_output(workspace: Path, sources: Sources, force: bool) -> None:
    """The refusals of DESIGN.md section 5, before anything is written."""
    workspace = workspace.resolve()
    for checkpoint in sources.all():
        if _inside(workspace, checkpoint.path) or _inside(checkpoint.path, workspace):
            raise BadInputError(
                f"the workspace {workspace} and the input {checkpoint.path} overlap",
                hint="write the workspace somewhere else with -o",
            )
    not_ours = f"--force replaces only a dpa workspace, and {workspace} is not one (no dpa.yaml)"
    check_replaceable(workspace, force, is_workspace(workspace), "a workspace", not_ours)


def _manifest(plan: UpgradePlan, fingerprints: dict[str, Any], report: dict[str, Any], seconds: float) -> dict:
    summary = plan_summary(plan)
    files = {str(c.path): fingerprints[c.role] for c in plan.sources.all()}
    perceiver = summary["perceiver"]
    for source in (
        summary["target"],
        *([perceiver] if perceiver["kind"] == "existing" else [perceiver["vit"], perceiver["lm"]]),
    ):
        source["files"] = files[source["path"]]
    return {
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "versions": versions(),
        "options": asdict(plan.options),
        "plan": summary,
        "upgrade": {"seconds": round(seconds, 2), **report},
        "stages": {},
    }


def run_upgrade(
    plan: UpgradePlan,
    workspace: Path,
    force: bool = False,
    verify_load: bool | None = None,
    on_bytes: Callable[[int], None] | None = None,
    inputs: InputHashes | None = None,
) -> dict[str, Any]:
    """Write the planned workspace (model/ + dpa.yaml) through a temporary sibling renamed at the end.

    `verify_load`: None loads and runs the model when it is at most 2 GB on disk. `inputs`: the hashing of the
    input folders, if `plan_upgrade` started it.
    """
    check_output(workspace, plan.sources, force)
    started = time.perf_counter()
    folders = {c.role: c.path for c in plan.sources.all()}
    inputs = inputs or InputHashes()
    inputs.start(folders.values())
    done = False
    try:
        with staged_folder(workspace, replace=force) as staging:
            model_dir = staging / MODEL_DIR
            model_dir.mkdir()
            digests: dict[str, str] = {}
            write_weights(plan, model_dir, on_bytes, digests)
            write_model_files(plan, model_dir)
            write_processor(plan, model_dir)
            report = {"written": check_written(plan, model_dir)}
            if verify_load or (verify_load is None and plan.output_bytes <= AUTO_VERIFY_BYTES):
                report["loaded"] = load_and_run(model_dir)
            fingerprints = {role: inputs.result(folder) for role, folder in folders.items()}
            manifest = _manifest(plan, fingerprints, report, time.perf_counter() - started)
            # What was written, file by file, for `dpa verify`; shards were hashed while they were written.
            manifest[CHECKSUMS] = tree_checksums(model_dir, f"{MODEL_DIR}/", digests)
            write_manifest(staging, manifest)
        done = True
    finally:
        if not done:
            inputs.cancel()
    return {"workspace": str(workspace.resolve()), "model": str(workspace.resolve() / MODEL_DIR), **manifest}
