"""The shapes of the records dpa writes and reads back: a workspace's dpa.yaml and an export's dpa_export.json.

Both may be edited by hand (or by someone hostile), so every reader goes through `check_manifest` /
`read_export_record`: known keys must have the types dpa writes, and every path dpa would follow from them
(the `checksums:` file names) must stay inside the folder that holds the record, after symlinks. Unknown
keys are kept: a newer dpa, or a user's note, may add some.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from dpa_cli.jsonio import PARSE_ERRORS, parse_json
from dpa_cli.schema import (
    AnyValue, Bool, Context, Int, ListOf, MapOf, Number, Record, RelPath, Sha256, Str, validate,
)  # fmt: skip

EXPORT_RECORD = "dpa_export.json"  # the same name as dpa_cli.export.files.EXPORT_RECORD (no import cycle)
CHECKSUMS = "checksums"
STAGE_NAME = Str(pattern=r"stage\d+", like="stage1")
FILES = MapOf(Sha256(), key=RelPath())  # a manifest of files: path inside the folder -> sha256

_SOURCE = Record({
    "spec": Str(), "path": Str(), "repo_id": Str(nullable=True), "revision": Str(nullable=True), "family": Str(),
    "files": MapOf(Sha256()),
}, required=("path",))  # fmt: skip
_PERCEIVER = Record({
    **_SOURCE.fields, "path": Str(), "kind": Str(choices=("existing", "composed")), "vit": _SOURCE, "lm": _SOURCE,
    "phi_p_trained": Bool(),
}, required=("kind",))  # fmt: skip
_PART = Record({"from": ListOf(Str()), "tensors": Int(minimum=0), "params": Int(minimum=0)})
_PLAN = Record({
    "target": _SOURCE,
    "perceiver": _PERCEIVER,
    "dimensions": Record({"perceiver_width": Int(minimum=1), "target_width": Int(minimum=1), "phi": Str()},
                         required=("perceiver_width", "target_width")),
    "kept": MapOf(_PART), "dropped": MapOf(_PART), "new": MapOf(Record({"params": Int(minimum=0)})),
    "config": MapOf(AnyValue()), "dtype": Str(), "total_params": Int(minimum=0),
    "trainable_stage1_params": Int(minimum=0), "output_bytes": Int(minimum=0), "num_shards": Int(minimum=0),
    "shard_size": Int(minimum=1), "notes": ListOf(Str()),
}, required=("target", "perceiver", "dimensions"))  # fmt: skip
_OPTIONS = Record({
    "projector": Str(), "feature_span": Str(), "early_fusion": Bool(), "dtype": Str(), "seed": Int(),
    "shard_size": Int(minimum=1), "perceiver_layers": Int(minimum=0, nullable=True),
})  # fmt: skip
_STAGE = Record({
    "recipe": MapOf(AnyValue()), "source": Str(), "data": Record({"path": Str(), "fingerprint": Str(nullable=True)}),
    "steps": Int(minimum=0), "final_loss": Number(nullable=True, finite=False),
    "train_loss": Number(nullable=True, finite=False), "seconds": Number(minimum=0),
    "tokens_seen": Int(minimum=0), "skipped_samples": MapOf(AnyValue()), "lora": Bool(),
    "deepspeed": Str(nullable=True), "world_size": Int(minimum=1), "notes": ListOf(Str()),
})  # fmt: skip
WORKSPACE = Record({
    "created": Str(timestamp=True), "versions": MapOf(AnyValue()), "options": _OPTIONS, "plan": _PLAN,
    "upgrade": MapOf(AnyValue()), "stages": MapOf(_STAGE, key=STAGE_NAME), CHECKSUMS: FILES,
}, required=("plan",))  # fmt: skip
EXPORT = Record({
    "path": Str(), "stage": Str(), "source": Str(), "lora": Str(nullable=True), "dtype": Str(nullable=True),
    "weights": MapOf(AnyValue()), "created": Str(timestamp=True), "verified": Bool(),
    "max_abs_diff": Number(nullable=True, finite=False), "tolerance": Number(nullable=True), CHECKSUMS: FILES,
})  # fmt: skip

MANIFEST_HINT = "restore it or undo the hand edit, or upgrade again into a new folder with -o"
EXPORT_HINT = "restore the export's dpa_export.json, or export again"


def check_manifest(manifest: dict[str, Any], workspace: Path, where: str) -> dict[str, Any]:
    """A parsed dpa.yaml when it has the shape dpa writes; else a BadInputError naming the key path."""
    ctx = Context(Path(workspace), "the workspace")
    return validate(manifest, WORKSPACE, where, hint=MANIFEST_HINT, ctx=ctx)


def read_export_record(folder: Path) -> dict[str, Any] | None:
    """The export's dpa_export.json, checked; None when there is none (or it is not dpa's record at all).

    A record that says it is dpa's (`dpa_export: 1`) but has a wrong shape is refused, naming the key.
    """
    path = Path(folder) / EXPORT_RECORD
    try:
        record = parse_json(path.read_bytes(), allow_nan=True)
    except (OSError, *PARSE_ERRORS):
        return None
    if not isinstance(record, dict) or record.get("dpa_export") != 1:
        return None
    ctx = Context(Path(folder), "the export")
    return validate(record, EXPORT, str(path), hint=EXPORT_HINT, ctx=ctx)


def is_export(folder: Path) -> bool:
    """Whether `folder` is an export dpa wrote (its record says so)."""
    return read_export_record(folder) is not None
