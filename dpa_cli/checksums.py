"""Manifests of what dpa wrote, and `dpa verify`: which files changed, went missing or appeared since.

A workspace keeps its manifest in dpa.yaml (`checksums`: path relative to the workspace -> digest, for
`model/` and every stage result); an export keeps it in dpa_export.json. Both are written in the same
rename that puts the files in place, so a manifest always describes a complete folder.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dpa_cli.checkpoint.hashing import file_digest, same_digest, split_digest
from dpa_cli.errors import BadInputError
from dpa_cli.records import CHECKSUMS, EXPORT_RECORD, read_export_record
from dpa_cli.workspace.layout import ADAPTER_DIR, MANIFEST, MODEL_DIR
from dpa_cli.workspace.manifest import is_workspace, read_manifest


def tree_checksums(folder: Path, prefix: str = "", known: dict[str, str] | None = None) -> dict[str, str]:
    """{prefix + path relative to `folder`: digest} of every file under it; `known` digests (file name
    relative to `folder` -> digest, computed while writing) are taken as they are instead of reading again."""
    known = known or {}
    return {prefix + name: known.get(name) or file_digest(path) for name, path in _files(Path(folder)).items()}


def _files(folder: Path) -> dict[str, Path]:
    return {p.relative_to(folder).as_posix(): p for p in sorted(folder.rglob("*")) if p.is_file()}


def stage_checksums(recorded: Any, folder: Path, name: str) -> dict[str, str]:
    """The workspace manifest with stage `name`'s result (`model/`, `adapter/`) hashed in afresh.

    Trainer-written files are read once more here: seconds, next to the hours the stage took.
    """
    sums = {k: v for k, v in (recorded or {}).items() if not k.startswith(f"{name}/")}
    for part in (MODEL_DIR, ADAPTER_DIR):
        if (folder / part).is_dir():
            sums.update(tree_checksums(folder / part, f"{name}/{part}/"))
    return sums


@dataclass
class VerifyReport:
    """What `dpa verify` found: every file the manifest names, checked."""

    path: Path
    kind: str  # "workspace" or "export"
    checked: int = 0
    changed: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    extra: list[str] = field(default_factory=list)
    parts: list[str] = field(default_factory=list)  # the folders covered, e.g. model, stage1/model, export

    @property
    def clean(self) -> bool:
        return not (self.changed or self.missing or self.extra)

    def as_dict(self) -> dict[str, Any]:
        return {
            "path": str(self.path),
            "kind": self.kind,
            "clean": self.clean,
            "checked": self.checked,
            "changed": self.changed,
            "missing": self.missing,
            "extra": self.extra,
            "parts": self.parts,
        }


def _part(name: str) -> str:
    """The folder a recorded file belongs to: `model`, `stage1/model`, `stage2/adapter`..."""
    parts = name.split("/")
    return "/".join(parts[:2]) if parts[0].startswith("stage") and len(parts) > 2 else parts[0]


def _inside(root: Path, path: Path) -> bool:
    resolved, root = path.resolve(), root.resolve()
    return resolved == root or root in resolved.parents


def _confined(root: Path, parts: list[str], what: str) -> None:
    """Refuse, before one byte is hashed, a part folder or a file in it that a symlink leads out of `root`:
    `dpa verify` reads only what lies inside the folder it checks."""
    hint = "remove the link (dpa never writes one), or restore the folder from the run that wrote it"
    for part in parts:
        base = root / part if part else root
        if not _inside(root, base):
            raise BadInputError(f"{root / part} leads outside the {what} through a symbolic link", hint=hint)
        for path in base.rglob("*") if base.is_dir() else ():
            if path.is_symlink() and not _inside(root, path):
                name = path.relative_to(root).as_posix()
                raise BadInputError(f"{root}: {name} is a symbolic link leading outside the {what}", hint=hint)


def _compare(root: Path, expected: dict[str, str], parts: list[str], report: VerifyReport, skip: set[str]) -> None:
    found: dict[str, Path] = {}
    _confined(root, parts, report.kind)
    for part in parts:
        base = root / part if part else root
        if base.is_dir():
            found.update({(f"{part}/" if part else "") + name: path for name, path in _files(base).items()})
    for name in sorted(expected):
        if name not in found:
            report.missing.append(name)
        elif not same_digest(file_digest(found[name], split_digest(expected[name])[0]), expected[name]):
            report.changed.append(name)
    report.extra += sorted(name for name in found if name not in expected and name not in skip)
    report.checked += len(expected)


def _recorded(mapping: Any, where: Path) -> dict[str, str]:
    if not isinstance(mapping, dict) or not all(isinstance(v, str) for v in mapping.values()):
        raise BadInputError(
            f"{where} carries no manifest of digests (written by an older dpa, or edited by hand)",
            hint="nothing to verify against: upgrade or export again to get one",
        )
    return mapping


def verify_export(folder: Path, prefix: str = "", report: VerifyReport | None = None) -> VerifyReport:
    record = read_export_record(folder)
    if record is None:
        raise BadInputError(f"{folder}: no readable {EXPORT_RECORD}", hint="only exports dpa wrote carry a manifest")
    expected = _recorded(record.get(CHECKSUMS), folder / EXPORT_RECORD)
    report = report or VerifyReport(folder, "export")
    sub = VerifyReport(folder, "export")
    _compare(folder, expected, [""], sub, skip={EXPORT_RECORD})
    report.checked += sub.checked
    for name in ("changed", "missing", "extra"):
        getattr(report, name).extend(prefix + item for item in getattr(sub, name))
    report.parts.append(prefix.rstrip("/") or ".")
    return report


def verify_workspace(folder: Path) -> VerifyReport:
    """model/ and every stage result against dpa.yaml; an export inside the workspace against its own record."""
    expected = _recorded(read_manifest(folder).get(CHECKSUMS), folder / MANIFEST)
    parts = sorted({_part(name) for name in expected})
    report = VerifyReport(folder, "workspace", parts=list(parts))
    _compare(folder, expected, parts, report, skip=set())
    for child in sorted(p for p in folder.iterdir() if p.is_dir() and _inside(folder, p) and read_export_record(p)):
        verify_export(child, f"{child.name}/", report)
    return report


def verify_path(path: Path) -> VerifyReport:
    """Re-hash a workspace or an export dpa wrote against the manifest it carries."""
    path = Path(path).expanduser()
    if not path.exists():
        raise BadInputError(f"no such folder: {path}")
    if is_workspace(path) or (path / MANIFEST).is_file():  # a damaged dpa.yaml: read_manifest says how
        return verify_workspace(path.resolve())
    if path.is_dir() and read_export_record(path) is not None:
        return verify_export(path.resolve())
    raise BadInputError(
        f"{path} is neither a dpa workspace (no dpa.yaml) nor an export dpa wrote (no {EXPORT_RECORD})",
        hint="pass the folder `dpa upgrade` or `dpa export` wrote",
    )
