"""Training recipes as data: YAML files, `--set key=value` overrides, validated before any work starts.

A recipe's own fields (stage, per-part modes and learning rates, global batch, max length, LoRA) sit beside
`transformers.TrainingArguments` fields, which pass through; any other key is an error naming it.
"""

from __future__ import annotations

import dataclasses
import difflib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


from dpa_cli.errors import BadInputError
from dpa_cli.jsonio import PARSE_ERRORS, parse_yaml, read_yaml, reason

RECIPES = Path(__file__).resolve().parent.parent / "recipes"
PARTS = ("vit", "phi_p", "perceiver_lm", "phi", "llm")
MODES = ("frozen", "full", "lora")
OWN_FIELDS = (
    "stage", "trainable", "learning_rates", "global_batch_size", "max_length",
    "lora_r", "lora_alpha", "lora_dropout", "lora_targets",
)  # fmt: skip
# Set by dpa itself: the run's folder, the accumulation that keeps the global batch, the data plumbing.
MANAGED = ("output_dir", "gradient_accumulation_steps", "remove_unused_columns", "deepspeed", "resume_from_checkpoint")
DEFAULT_LORA_TARGETS = r"model\.language_model\..*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)$"


@dataclass(frozen=True)
class Recipe:
    name: str
    stage: int
    trainable: dict[str, str]
    learning_rates: dict[str, float] = field(default_factory=dict)
    global_batch_size: int = 256
    max_length: int = 2048
    lora_r: int = 32
    lora_alpha: int = 32
    lora_dropout: float = 0.05
    lora_targets: str = DEFAULT_LORA_TARGETS
    training_args: dict[str, Any] = field(default_factory=dict)  # TrainingArguments fields

    @property
    def uses_lora(self) -> bool:
        return "lora" in self.trainable.values()

    def as_dict(self) -> dict[str, Any]:
        """The resolved recipe, printed before training and stored with the run."""
        own = {name: getattr(self, name) for name in OWN_FIELDS}
        if not self.uses_lora:
            own = {k: v for k, v in own.items() if not k.startswith("lora_")}
        return {"name": self.name, **own, **self.training_args}


def training_argument_names() -> set[str]:
    from transformers import TrainingArguments

    return {f.name for f in dataclasses.fields(TrainingArguments) if f.init}


def recipe_path(name_or_file: str) -> Path:
    """A packaged recipe by name (`stage1`, `stage2-full`, `stage2-lora`) or a YAML file."""
    packaged = RECIPES / f"{name_or_file}.yaml"
    if packaged.is_file():
        return packaged
    path = Path(name_or_file).expanduser()
    if path.is_file():
        return path
    known = ", ".join(sorted(p.stem for p in RECIPES.glob("*.yaml")))
    raise BadInputError(f"no recipe {name_or_file!r}", hint=f"use one of {known}, or a YAML file path")


def _parse_overrides(overrides: list[str]) -> dict[str, Any]:
    parsed: dict[str, Any] = {}
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise BadInputError(f"--set {item!r} is not key=value", hint="e.g. --set learning_rate=2e-5")
        parsed[key.strip()] = _scalar(value.strip())
    return parsed


def _scalar(text: str) -> Any:
    """A --set value: numbers first (YAML 1.1 reads `5e-3` as a string), then YAML (true, null, lists)."""
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            continue
    try:
        return parse_yaml(text) if text else None
    except PARSE_ERRORS as err:
        raise BadInputError(f"--set value {text[:40]!r}: {reason(err)}", hint="quote it, or write a plain value") from None


def _apply(data: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """Overrides win; `trainable.vit=full` and `learning_rates.vit=1e-6` reach into the nested maps."""
    data = {**data, "trainable": dict(data.get("trainable") or {}), "learning_rates": dict(data.get("learning_rates") or {})}
    for key, value in overrides.items():
        head, _, tail = key.partition(".")
        if tail and head in ("trainable", "learning_rates"):
            data[head][tail] = value
        else:
            data[key] = value
    return data


def _unknown(key: str, known: set[str]) -> BadInputError:
    close = difflib.get_close_matches(key, known, n=3)
    hint = f"did you mean {', '.join(close)}?" if close else "see TrainingArguments and docs/training.md for the keys"
    return BadInputError(f"unknown recipe key {key!r}", hint=hint)


def _number(data: dict[str, Any], key: str, kind: type, positive: bool = True) -> Any:
    value = data.get(key)
    if value is None:
        return None
    try:
        number = kind(value)
    except (TypeError, ValueError):
        raise BadInputError(f"recipe key {key}={value!r} is not a {kind.__name__}") from None
    if positive and number <= 0:
        raise BadInputError(f"recipe key {key}={value!r} must be positive")
    return number


def _validate_parts(data: dict[str, Any]) -> None:
    for part, mode in data["trainable"].items():
        if part not in PARTS:
            raise BadInputError(f"unknown part trainable.{part}", hint=f"parts: {', '.join(PARTS)}")
        if mode not in MODES:
            raise BadInputError(f"trainable.{part}={mode!r} is not one of {', '.join(MODES)}")
    missing = [p for p in PARTS if p not in data["trainable"]]
    if missing:
        raise BadInputError(f"the recipe does not say how to train {', '.join(missing)}", hint="add them under trainable:")
    for part, lr in data["learning_rates"].items():
        if part not in PARTS:
            raise BadInputError(f"unknown part learning_rates.{part}", hint=f"parts: {', '.join(PARTS)}")
        _number({f"learning_rates.{part}": lr}, f"learning_rates.{part}", float)


def load_recipe(name_or_file: str, overrides: list[str] | None = None) -> Recipe:
    """Read, override and validate a recipe; every problem is a BadInputError naming the key."""
    path = recipe_path(name_or_file)
    data = read_yaml(path, hint="fix the recipe file") or {}
    if not isinstance(data, dict):
        raise BadInputError(f"{path}: a recipe is a mapping of keys to values")
    data = _apply(data, _parse_overrides(overrides or []))
    known = set(OWN_FIELDS) | training_argument_names()
    for key in data:
        if key in MANAGED:
            raise BadInputError(f"recipe key {key!r} is set by dpa itself", hint="remove it from the recipe / --set")
        if key not in known:
            raise _unknown(key, known)
    _validate_parts(data)
    stage = data.get("stage")
    if stage not in (1, 2):
        raise BadInputError(f"{path}: stage must be 1 or 2, not {stage!r}")
    # Numbers are stored as numbers: YAML 1.1 reads `2e-5` as a string.
    for key in ("learning_rate", "num_train_epochs", "weight_decay", "adam_beta2", "warmup_steps"):
        if data.get(key) is not None:
            data[key] = _number(data, key, float, positive=key in ("learning_rate", "num_train_epochs"))
    for key in ("global_batch_size", "per_device_train_batch_size", "max_length", "save_steps"):
        if data.get(key) is not None:
            data[key] = _number(data, key, int)
    if data.get("max_steps") not in (None, -1):
        data["max_steps"] = _number(data, "max_steps", int)
    own = {k: data[k] for k in OWN_FIELDS if k in data and k not in ("stage", "trainable", "learning_rates")}
    training = {k: v for k, v in data.items() if k not in OWN_FIELDS}
    return Recipe(path.stem, stage, data["trainable"], {k: float(v) for k, v in data["learning_rates"].items()},
                  **own, training_args=training)  # fmt: skip


def gradient_accumulation(global_batch: int, per_device: int, world_size: int) -> int:
    """Steps to accumulate so that per-device batch x processes x steps = the recipe's global batch."""
    per_step = per_device * world_size
    if global_batch % per_step:
        raise BadInputError(
            f"global batch {global_batch} is not a multiple of per-device batch {per_device} x {world_size} process(es)",
            hint="change global_batch_size or per_device_train_batch_size with --set",
        )
    return global_batch // per_step
