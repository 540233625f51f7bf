"""Catalog aliases for targets and perceivers: data in `catalog.yaml`, extended by the file in $DPA_CATALOG."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import yaml

from dpa_cli.errors import BadInputError, ModelNotFoundError, yaml_problem
from dpa_cli.jsonio import PARSE_ERRORS, parse_yaml, read_regular, reason

BUILTIN = Path(__file__).with_name("catalog.yaml")
KINDS = ("targets", "perceivers")


@dataclass(frozen=True)
class Alias:
    name: str
    kind: str  # "target" or "perceiver"
    source: str | None
    description: str
    origin: Path


def _read(path: Path) -> list[Alias]:
    hint = "fix or unset $DPA_CATALOG"
    try:
        data = parse_yaml(read_regular(path)) or {}
    except OSError as err:
        raise BadInputError(f"{path}: cannot read the catalog ({err.strerror})", hint=hint) from None
    except PARSE_ERRORS as err:
        detail = yaml_problem(err) if isinstance(err, yaml.YAMLError) else reason(err)
        raise BadInputError(f"{path}: cannot read the catalog ({detail})", hint=hint) from None
    if not isinstance(data, dict) or set(data) - set(KINDS):
        raise BadInputError(f"{path}: a catalog holds only the sections {', '.join(KINDS)}")
    aliases = []
    for kind in KINDS:
        for name, entry in (data.get(kind) or {}).items():
            if not isinstance(entry, dict) or "source" not in entry:
                raise BadInputError(f"{path}: alias {name!r} needs a `source` entry")
            aliases.append(Alias(name, kind[:-1], entry["source"], str(entry.get("description", "")).strip(), path))
    return aliases


def load_catalog() -> dict[str, Alias]:
    """Builtin aliases, then the user's ($DPA_CATALOG), which win on a clash."""
    files = [BUILTIN]
    if os.environ.get("DPA_CATALOG"):
        files.append(Path(os.environ["DPA_CATALOG"]).expanduser())
    return {alias.name: alias for path in files for alias in _read(path)}


def expand_alias(spec: str, catalog: dict[str, Alias] | None = None) -> str:
    """`spec` itself, or the source its alias names; an alias with no public source is an error."""
    catalog = load_catalog() if catalog is None else catalog
    alias = catalog.get(spec)
    if alias is None:
        return spec
    if alias.source is None:
        raise ModelNotFoundError(
            f"alias {spec!r} has no public checkpoint: {alias.description}",
            hint=f"define `{spec}: {{source: /path/or/repo-id}}` under `{alias.kind}s:` "
            "in a file named by $DPA_CATALOG",
        )
    return alias.source
