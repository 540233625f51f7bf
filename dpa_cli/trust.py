"""Whose code runs: a model folder's own Python (`auto_map` remote code) only when it is dpa's, byte for byte.

dpa writes its model files next to every checkpoint it makes so plain transformers can load them. Before
dpa loads a folder it reads every config transformers may read there, in the folder and its sub-folders
(`perceiver_tokenizer/` ...), and every `auto_map` in them, nested ones too (`processor_config.json` holds
its sub-processors' own). The folder's code may run only when each module they name is one of dpa's model
files and every copy transformers could import (beside the config, at the folder's root, and the files
those import) has the sha256 of the copy installed with dpa, so nothing new runs. Anything else is foreign:
never imported unless the user passes `--trust-remote-code`. dpa_cli.loading acts on this verdict.
"""

from __future__ import annotations

import functools
import os
import re
from dataclasses import dataclass
from pathlib import Path

from dpa_cli.checkpoint import sha256_file
from dpa_cli.jsonio import PARSE_ERRORS, parse_json

# Configs transformers reads: config, tokenizer_config, processor_config, preprocessor_config,
# video_preprocessor_config, generation_config, feature_extractor / image_processor configs, adapter_config.
CONFIG_SUFFIX = "config.json"
MAX_DEPTH = 3  # sub-folders deep enough for processor parts (`perceiver_tokenizer/`), bounded against link loops
MAX_CONFIG_BYTES = 64 << 20  # a config file larger than this is not read (transformers would choke on it too)
_OWN_REF = re.compile(r"^(?P<module>[A-Za-z_]\w*)\.[A-Za-z_]\w*$")  # `module.Class`, no repo, no path


@functools.cache
def own_code() -> dict[str, str]:
    """{module name: sha256} of the DPA model files installed with dpa (`modeling_dpa`, ...)."""
    import dpa_cli.model

    folder = Path(dpa_cli.model.__file__).parent
    return {path.stem: sha256_file(path) for path in sorted(folder.glob("*_dpa.py"))}


@functools.cache
def _own_imports(module: str) -> tuple[str, ...]:
    """The modules an installed DPA model file imports relatively (transformers copies and imports them too)."""
    import dpa_cli.model

    text = (Path(dpa_cli.model.__file__).parent / f"{module}.py").read_text(encoding="utf-8")
    return tuple(sorted(set(re.findall(r"^\s*from\s+\.(\w+)\s+import", text, flags=re.MULTILINE))))


@dataclass(frozen=True)
class CodeRef:
    """One class reference in an `auto_map`: the config file that holds it, the reference as written and, for a
    foreign one, the file that is not dpa's (the module it names, or a file that module imports)."""

    config: Path
    ref: str
    culprit: str | None = None

    @property
    def module_file(self) -> str:
        """The Python file transformers would import for it (`repo--module.Class` -> `module.py`)."""
        return self.ref.split("--")[-1].rsplit(".", 1)[0] + ".py"


@dataclass(frozen=True)
class Verdict:
    """What a folder's configs ask transformers to import: dpa's own files, and everything else (foreign)."""

    folder: Path
    own: tuple[CodeRef, ...]
    foreign: tuple[CodeRef, ...]

    @property
    def own_code_only(self) -> bool:
        """Code is referenced and all of it is dpa's own, byte for byte: running it runs nothing new."""
        return bool(self.own) and not self.foreign

    @property
    def carried(self) -> tuple[CodeRef, ...]:
        """The foreign references a copy of the folder would carry on: all but altered copies of dpa's own files
        at the folder's root, which dpa rewrites from its installed copies wherever it writes a model folder."""
        rewritten = {f"{module}.py" for module in own_code()}
        return tuple(ref for ref in self.foreign if ref.culprit not in rewritten)

    def describe_foreign(self, refs: tuple[CodeRef, ...] | None = None, most: int = 2) -> str:
        """`config (module.py), ...` for messages (`refs`: all foreign ones by default): configs relative to the
        folder, the first `most` of them."""
        seen: dict[str, list[str]] = {}
        for ref in self.foreign if refs is None else refs:
            files = seen.setdefault(_relative(ref.config, self.folder), [])
            files += [ref.culprit] if ref.culprit not in files else []
        named = [f"{name} ({', '.join(files)})" for name, files in seen.items()]
        more = f" and {len(named) - most} more configs" if len(named) > most else ""
        return ", ".join(named[:most]) + more


def _relative(path: Path, folder: Path) -> str:
    try:
        return str(path.relative_to(folder))
    except ValueError:
        return str(path)


def config_files(folder: Path) -> list[Path]:
    """Every `*config.json` in `folder` and its sub-folders (links followed, MAX_DEPTH deep, each folder once)."""
    found, seen = [], set()
    for root, dirs, files in os.walk(folder, followlinks=True):
        real = os.path.realpath(root)
        depth = Path(root).relative_to(folder).parts
        if real in seen or len(depth) > MAX_DEPTH:
            dirs[:] = []
            continue
        seen.add(real)
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        found += [Path(root) / name for name in sorted(files) if name.endswith(CONFIG_SUFFIX)]
    return found


def _auto_map_strings(value: object, inside: bool = False) -> list[str]:
    """Every string under an `auto_map` key, at any depth: `"m.C"`, `["m.C", null]`, `"repo--m.C"`, nested dicts."""
    if isinstance(value, dict):
        return [s for key, item in value.items() for s in _auto_map_strings(item, inside or key == "auto_map")]
    if isinstance(value, list):
        return [s for item in value for s in _auto_map_strings(item, inside)]
    return [value] if inside and isinstance(value, str) else []


def references(folder: Path) -> list[CodeRef]:
    """Every class reference in the auto_maps of the folder's configs. A config that cannot be read here (too
    large, not UTF-8 JSON, nested too deep) counts as foreign code: what it names is unknown, so fail closed."""
    refs = []
    for path in config_files(folder):
        try:
            if path.stat().st_size > MAX_CONFIG_BYTES:
                raise ValueError("too large")
            refs += [CodeRef(path, ref) for ref in _auto_map_strings(parse_json(path.read_bytes()))]
        except (OSError, *PARSE_ERRORS):
            refs.append(CodeRef(path, "", culprit="unreadable, so unknown code"))
    return refs


def _not_own(module: str, places: list[Path], depth: int = 0) -> str | None:
    """None when `module` is a DPA model file, present in `places`, and every copy there (and of every file it
    imports) is dpa's; else the first file that is not, relative to the folder (`places[0]`)."""
    ours = own_code()
    if module not in ours or depth > len(ours):
        return f"{module}.py"
    copies = [place / f"{module}.py" for place in places if (place / f"{module}.py").is_file()]
    if not copies:
        return f"{module}.py"
    altered = [copy for copy in copies if sha256_file(copy) != ours[module]]
    if altered:
        return _relative(altered[-1], places[0])  # a sub-folder's copy first: it is the one a copy carries on
    return next(filter(None, (_not_own(name, places, depth + 1) for name in _own_imports(module))), None)


def _module_path(ref: str) -> str:
    """The file a reference that is not a bare `module.Class` names, with its repository: `repo--module.py`."""
    return ref.rsplit(".", 1)[0] + ".py"


def examine(folder: str | Path) -> Verdict:
    """Sort every code reference of `folder` into dpa's own and foreign ones."""
    folder = Path(folder)
    own, foreign = [], []
    for ref in references(folder):
        match = _OWN_REF.match(ref.ref)
        # transformers looks for the module at the folder's root; a copy beside a sub-folder's config counts too.
        places = list(dict.fromkeys([folder, ref.config.parent]))
        culprit = ref.culprit or (_not_own(match["module"], places) if match else _module_path(ref.ref))
        if culprit is None:
            own.append(ref)
        else:
            foreign.append(CodeRef(ref.config, ref.ref, culprit))
    return Verdict(folder, tuple(own), tuple(foreign))
