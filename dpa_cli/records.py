"""The shapes of the records dpa writes and reads back: a workspace's dpa.yaml and an export's dpa_export.json.

Both may be edited by hand (or by someone hostile), so every reader goes through `check_manifest` /
`read_export_record`: known keys must have the types dpa writes, and every path dpa would follow from them
(the `checksums:` file names) must stay inside the folder that holds the record, after symlinks. Unknown
keys are kept: a newer dpa, or a user's note, may add some.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from dpa_cli.defaults import ExportLora
from dpa_cli.jsonio import read_json
from dpa_cli.schema import (
    AnyValue,
    Bool,
    Context,
    Digest,
    Int,
    ListOf,
    MapOf,
    Number,
    Record,
    RelPath,
    Spec,
    Str,
    validate,
)
from dpa_cli.workspace.layout import EXPORT_RECORD

CHECKSUMS = "checksums"
STAGE_NAME = Str(pattern=r"stage\d+", like="stage1")
FILES = MapOf(Digest(), key=RelPath())  # a manifest of files: path inside the folder -> digest


def _every(fields: dict[str, Spec]) -> Record:
    """A record whose every field is required."""
    return Record(fields, required=tuple(fields))


# What `dpa upgrade` always writes is required (a dpa.yaml without it was edited); what a run writes only
# sometimes (a composed perceiver's parts, the load check, a library that is installed) is optional.
_SOURCE_ALWAYS = _every(
    {
        "spec": Str(),
        "path": Str(),
        "repo_id": Str(nullable=True),
        "revision": Str(nullable=True),
        "family": Str(),
        "files": MapOf(Digest()),
    }
)
# `builds`: the family dpa builds from an official-format source (its own family name is `family`).
_SOURCE = Record({**_SOURCE_ALWAYS.fields, "builds": Str()}, required=_SOURCE_ALWAYS.required)
_PERCEIVER = Record(
    {
        **_SOURCE.fields,
        "kind": Str(choices=("existing", "composed")),
        "vit": _SOURCE,
        "lm": _SOURCE,
        "phi_p_trained": Bool(),
    },
    required=("kind", "spec", "family"),
)
_PART = Record(
    {"from": ListOf(Str()), "tensors": Int(minimum=0), "params": Int(minimum=0)}, required=("tensors", "params")
)
_NEW = _every({"shapes": MapOf(ListOf(Int(minimum=0))), "params": Int(minimum=0), "init": ListOf(Str()), "seed": Int()})
_TOKEN = _every({"token": Str(), "id": Int(minimum=0), "added": Bool()})
# `encoding` is optional: workspaces made before it existed have none (they are `dpa`).
_CONFIG = Record(
    {
        "projector_type": Str(),
        "feature_span": Str(),
        "early_fusion": Bool(),
        "tie_word_embeddings": Bool(),
        "image_token": _TOKEN,
        "perceiver_image_token": _TOKEN,
        "encoding": Str(choices=("dpa", "paper")),
    },
    required=(
        "projector_type",
        "feature_span",
        "early_fusion",
        "tie_word_embeddings",
        "image_token",
        "perceiver_image_token",
    ),
)
_DIMENSIONS = _every({"perceiver_width": Int(minimum=1), "target_width": Int(minimum=1), "phi": Str()})
_PLAN_ALWAYS = _every(
    {
        "target": _SOURCE,
        "perceiver": _PERCEIVER,
        "dimensions": _DIMENSIONS,
        "kept": MapOf(_PART),
        "dropped": MapOf(_PART),
        "new": MapOf(_NEW),
        "config": _CONFIG,
        "dtype": Str(),
        "total_params": Int(minimum=0),
        "trainable_stage1_params": Int(minimum=0),
        "output_bytes": Int(minimum=0),
        "num_shards": Int(minimum=1),
        "shard_size": Int(minimum=1),
        "notes": ListOf(Str()),
    }
)
# `converted` (an official DPA checkpoint renamed) is newer than the first workspaces: optional.
_PLAN = Record({**_PLAN_ALWAYS.fields, "converted": Bool()}, required=_PLAN_ALWAYS.required)
_OPTIONS = Record(
    {  # `encoding` optional, as in _CONFIG
        "projector": Str(),
        "feature_span": Str(),
        "early_fusion": Bool(),
        "dtype": Str(),
        "seed": Int(),
        "shard_size": Int(minimum=1),
        "perceiver_layers": Int(minimum=0, nullable=True),
        "encoding": Str(choices=("dpa", "paper")),
    },
    required=("projector", "feature_span", "early_fusion", "dtype", "seed", "shard_size", "perceiver_layers"),
)
_UPGRADE = Record(
    {
        "seconds": Number(minimum=0),
        "written": _every({"keys": Int(minimum=0), "shards": Int(minimum=0), "bytes": Int(minimum=0)}),
        "loaded": Record({"loaded": Bool(), "forward": Str(), "image_features": Int(minimum=0)}),
    },
    required=("seconds", "written"),
)
# Stage records are written by `dpa train` when a stage finishes; every key is typed, none required (records
# of older runs hold fewer).
_STAGE = Record(
    {
        "recipe": Record({"name": Str()}),
        "source": Str(),
        "data": Record({"path": Str(), "fingerprint": Str(nullable=True)}),
        "steps": Int(minimum=0),
        "final_loss": Number(nullable=True, finite=False),
        "train_loss": Number(nullable=True, finite=False),
        "seconds": Number(minimum=0),
        "tokens_seen": Int(minimum=0),
        "skipped_samples": Record({"count": Int(minimum=0), "by_kind": MapOf(Int(minimum=0))}),
        "lora": Bool(),
        "deepspeed": Str(nullable=True),
        "world_size": Int(minimum=1),
        "notes": ListOf(Str()),
        "text_only_batches": ListOf(Int(minimum=0)),
    }
)
WORKSPACE = Record(
    {
        "created": Str(timestamp=True),
        "versions": MapOf(Str()),
        "options": _OPTIONS,
        "plan": _PLAN,
        "upgrade": _UPGRADE,
        "stages": MapOf(_STAGE, key=STAGE_NAME),
        CHECKSUMS: FILES,
    },
    required=("created", "versions", "options", "plan", "upgrade", "stages", CHECKSUMS),
)
EXPORT = _every(
    {  # all written by every export
        "path": Str(),
        "stage": Str(),
        "source": Str(),
        "lora": Str(choices=ExportLora.names()),
        "dtype": Str(nullable=True),
        "weights": MapOf(AnyValue()),
        "created": Str(timestamp=True),
        "verified": Bool(),
        "max_abs_diff": Number(nullable=True, finite=False),
        "tolerance": Number(nullable=True),
        CHECKSUMS: FILES,
    }
)

MANIFEST_HINT = "restore it or undo the hand edit, or upgrade again into a new folder with -o"
EXPORT_HINT = "restore the export's dpa_export.json, or export again"


def check_manifest(manifest: dict[str, Any], workspace: Path, where: str) -> dict[str, Any]:
    """A parsed dpa.yaml when it has the shape dpa writes; else a BadInputError naming the key path."""
    ctx = Context(Path(workspace), "the workspace")
    return validate(manifest, WORKSPACE, where, hint=MANIFEST_HINT, ctx=ctx)


def read_export_record(folder: Path) -> dict[str, Any] | None:
    """The export's dpa_export.json, checked; None when there is none (or it is not dpa's record at all).

    A record that cannot be parsed, or says it is dpa's (`dpa_export: 1`) but has a wrong shape, is refused
    naming the file and the key.
    """
    path = Path(folder) / EXPORT_RECORD
    if not path.is_file():
        return None
    record = read_json(path, hint=EXPORT_HINT, allow_nan=True)
    if not isinstance(record, dict) or record.get("dpa_export") != 1:
        return None
    ctx = Context(Path(folder), "the export")
    return validate(record, EXPORT, str(path), hint=EXPORT_HINT, ctx=ctx)


def is_export(folder: Path) -> bool:
    """Whether `folder` is an export dpa wrote (its record says so)."""
    return read_export_record(folder) is not None
