"""`dpa train CONFIG.yaml` (or `--config FILE`): one YAML file holding a run's flags and recipe values.

The file is the command line written down, LLaMA-Factory style: the keys of `dpa train`'s options (`stage`,
`data`, `image_root`, `deepspeed`, `lora`, ...), and any recipe key `--set` takes (`learning_rate`,
`global_batch_size`, `trainable: {llm: lora}`, `report_to`), flat or under `set:`. A flag given on the command
line wins over the file; recipe values from the file sit between the recipe and the flags. Paths are read
as the same flags would be (relative to the current folder). A key that is neither is refused by name.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dpa_cli.errors import BadInputError
from dpa_cli.jsonio import read_yaml
from dpa_cli.train.fieldtypes import Mismatch, coerce

# File key -> (the `dpa train` parameter it sets, its type). `from` is a Python keyword: the parameter is
# `from_model`. Keys that are recipe keys too (`lora_targets`, `max_steps`) are options here: same effect.
OPTIONS: dict[str, tuple[str, Any]] = {
    "stage": ("stage", int),
    "data": ("data", str),
    "workspace": ("workspace", str),
    "image_root": ("image_root", str),
    "recipe": ("recipe", str),
    "lora": ("lora", bool),
    "full": ("full", bool),
    "freeze_perceiver": ("freeze_perceiver", bool),
    "lora_targets": ("lora_targets", str),
    "deepspeed": ("deepspeed", str),
    "nproc": ("nproc", int),
    "resume": ("resume", bool),
    "restart": ("restart", bool),
    "max_steps": ("max_steps", int),
    "from": ("from_model", str),
    "on_bad_sample": ("on_bad_sample", str),
}
# Flags that exclude each other: one of a pair on the command line overrides both in the file.
PAIRS = (("lora", "full"), ("resume", "restart"))
PATH_OPTIONS = ("workspace",)  # options whose value becomes a Path


@dataclass
class TrainConfig:
    """A config file's content: option values by `dpa train` parameter, and recipe values (`--set` keys)."""

    path: Path
    options: dict[str, Any] = field(default_factory=dict)
    values: dict[str, Any] = field(default_factory=dict)
    sets: list[str] = field(default_factory=list)  # `set: [key=value, ...]` written as on the command line


def read_train_config(path: Path) -> TrainConfig:
    """Read and check a config file's keys and option types; recipe values are checked later by the recipe gate."""
    from dpa_cli.train.recipe import _RecipeLoader

    if not path.is_file():
        what = "a folder, not a YAML file" if path.is_dir() else "no such file"
        raise BadInputError(f"config file {path}: {what}", hint="pass a YAML file: dpa train CONFIG.yaml")
    written = read_yaml(path, hint="fix the config file", loader=_RecipeLoader)
    if not isinstance(written, dict):
        raise BadInputError(
            f"config file {path}: the top level must be a mapping of keys to values",
            hint="write one `key: value` per line (see docs/training.md)",
        )
    config = TrainConfig(path)
    for key, value in written.items():
        key = str(key)
        if key == "set":
            _read_set(config, value)
        elif key in OPTIONS:
            name, kind = OPTIONS[key]
            config.options[name] = _typed(path, key, value, kind)
            if key == "nproc" and config.options[name] is not None and config.options[name] < 1:
                raise BadInputError(f"config file {path}: nproc={value!r} must be >= 1")
        else:
            _add_value(config, key, value)
    for name in PATH_OPTIONS:
        if config.options.get(name) is not None:
            config.options[name] = Path(config.options[name]).expanduser()
    return config


def _typed(path: Path, key: str, value: Any, kind: Any) -> Any:
    try:
        return coerce(value, kind | None)
    except Mismatch as bad:
        raise BadInputError(f"config file {path}: {key}={value!r} {bad.expected}", hint=bad.hint) from None


def _read_set(config: TrainConfig, value: Any) -> None:
    """`set:` as a mapping of recipe keys, or as a list of `key=value` items like the `--set` flag."""
    if isinstance(value, dict):
        for key, item in value.items():
            _add_value(config, str(key), item)
    elif isinstance(value, list) and all(isinstance(item, str) for item in value):
        for item in value:  # `key=value` as --set takes it; the key is judged here, naming the file
            key, sep, _ = item.partition("=")
            if sep and key.strip():
                _check_recipe_key(config.path, key.strip())
        config.sets.extend(value)
    elif value is not None:
        raise BadInputError(
            f"config file {config.path}: set={value!r} is not a mapping or a list of key=value",
            hint="e.g. set: {learning_rate: 2.0e-5}",
        )


def _add_value(config: TrainConfig, key: str, value: Any) -> None:
    """A recipe value; a per-part map (`trainable: {llm: lora}`) is merged into the recipe's key by key."""
    from dpa_cli.train.recipe import NESTED

    if key in NESTED and isinstance(value, dict):
        for part, item in value.items():
            _add_value(config, f"{key}.{part}", item)
        return
    _check_recipe_key(config.path, key)
    config.values[key] = value


def _check_recipe_key(path: Path, key: str) -> None:
    from dpa_cli.parts import PARTS
    from dpa_cli.train.recipe import MANAGED, NESTED, OWN_FIELDS
    from dpa_cli.train.validate import training_fields

    head, dot, part = key.partition(".")
    if dot and head in NESTED and part not in PARTS:
        raise BadInputError(f"config file {path}: unknown part {key!r}", hint=f"parts: {', '.join(PARTS)}")
    if key in MANAGED:
        raise BadInputError(
            f"config file {path}: key {key!r} is set by dpa itself",
            hint="remove it (dpa trains into WORKSPACE/stageN; name the workspace with `workspace:`)",
        )
    if (dot and head in NESTED) or key in OWN_FIELDS or key in training_fields():
        return
    known = set(OPTIONS) | set(OWN_FIELDS) | set(training_fields()) | {"set"}
    close = difflib.get_close_matches(key, known, n=3)
    hint = f"did you mean {', '.join(close)}?" if close else "see docs/training.md for the keys a config file takes"
    raise BadInputError(f"config file {path}: unknown key {key!r}", hint=hint)


def merged(given: dict[str, Any], explicit: set[str], config: TrainConfig) -> dict[str, Any]:
    """`dpa train`'s parameters: those given on the command line (`explicit`), else the file's, else the
    defaults. A flag of an exclusive pair on the command line overrides both of the pair in the file."""
    result = dict(given)
    overridden = set(explicit)
    for pair in PAIRS:
        if overridden & set(pair):
            overridden |= set(pair)
    for name, value in config.options.items():
        if name not in overridden:
            result[name] = value
    return result
