"""Training recipes as data: YAML files, `--set key=value` overrides, validated before any work starts.

A recipe's own fields (stage, per-part modes and learning rates, global batch, max length, LoRA) sit beside
`transformers.TrainingArguments` fields; any other key is an error naming it, and every value passes the
typed gate of `validate.py` before anything is loaded.
"""

from __future__ import annotations

import difflib
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from dpa_cli.defaults import PartMode
from dpa_cli.errors import BadInputError
from dpa_cli.jsonio import PARSE_ERRORS, parse_yaml, read_yaml, reason
from dpa_cli.train.arguments import FIXED
from dpa_cli.train.schedule import rescale, schedule_note
from dpa_cli.train.validate import check_recipe, stage_number, training_fields

RECIPES = Path(__file__).resolve().parent.parent / "recipes"


class _RecipeLoader(getattr(yaml, "CSafeLoader", yaml.SafeLoader)):  # libyaml's parser where installed
    """YAML 1.1 reads `1e-7` (an exponent, no dot) as a string; a recipe means a number, also inside mappings
    (`lr_scheduler_kwargs: {min_lr: 1e-7}`) where no field type says so."""


_RecipeLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float", re.compile(r"^[-+]?[0-9][0-9_]*(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"), list("-+0123456789")
)

OWN_FIELDS = (
    "stage",
    "trainable",
    "learning_rates",
    "global_batch_size",
    "max_length",
    "lora_r",
    "lora_alpha",
    "lora_dropout",
    "lora_targets",
    "pack",
)
NESTED = ("trainable", "learning_rates")  # per-part maps that `--set trainable.vit=full` reaches into
# Set by dpa itself: the run's folder, the accumulation that keeps the global batch, the data plumbing, the
# launcher's rank, and the settings every run fixes (arguments.FIXED).
MANAGED = ("output_dir", "gradient_accumulation_steps", "deepspeed", "resume_from_checkpoint", "local_rank", *FIXED)
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
    pack: bool = False  # several samples per row up to max_length (data/packing.py)
    training_args: dict[str, Any] = field(default_factory=dict)  # TrainingArguments fields
    notes: tuple[str, ...] = ()  # what resolving the recipe changed (a schedule scaled to the run's length)

    @property
    def uses_lora(self) -> bool:
        return PartMode.LORA in self.trainable.values()

    def as_dict(self) -> dict[str, Any]:
        """The resolved recipe, printed before training and stored with the run."""
        own = {name: getattr(self, name) for name in OWN_FIELDS}
        if not self.uses_lora:
            own = {k: v for k, v in own.items() if not k.startswith("lora_")}
        return {"name": self.name, **own, **self.training_args}


def recipe_max_length(stage: int, recipe: str | None = None) -> int:
    """The `max_length` training will use: the named recipe's, else the stage's default recipe's."""
    return load_recipe(recipe or default_recipe(stage)).max_length


def default_recipe(stage: int, lora: bool | None = None) -> str:
    """The packaged recipe a stage runs by default (`--lora` picks stage 2's LoRA recipe)."""
    return "stage1" if stage == 1 else "stage2-lora" if lora else "stage2-full"


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


def _parse_overrides(overrides: list[str]) -> tuple[dict[str, Any], dict[str, str]]:
    """`--set` items -> (values, the values as typed: a key that takes text gets the text itself)."""
    parsed: dict[str, Any] = {}
    texts: dict[str, str] = {}
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise BadInputError(f"--set {item!r} is not key=value", hint="e.g. --set learning_rate=2e-5")
        parsed[key.strip()] = _scalar(value.strip())
        texts[key.strip()] = value.strip()
    return parsed, texts


def _scalar(text: str) -> Any:
    """A --set value: numbers first (YAML 1.1 reads `5e-3` as a string), then YAML (true, null, lists); text
    that is not valid YAML (`[qk]_proj`) stays text."""
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            continue
    try:
        return parse_yaml(text, loader=_RecipeLoader) if text else None
    except yaml.YAMLError:  # not YAML (`[qk]_proj`): the text as typed
        return text
    except PARSE_ERRORS as err:
        raise BadInputError(
            f"--set value {text[:40]!r}: {reason(err)}", hint="quote it, or write a plain value"
        ) from None


def _apply(data: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """Overrides win; `trainable.vit=full` and `learning_rates.vit=1e-6` reach into the nested maps (a nested
    value that is not a mapping is left as it is, for the gate to refuse)."""
    data = dict(data)
    for key, value in overrides.items():
        head, _, tail = key.partition(".")
        if tail and head in NESTED:
            nested = data.get(head) or {}
            if isinstance(nested, dict):
                data[head] = {**nested, tail: value}
        else:
            data[key] = value
    return data


def _unknown(key: str, known: set[str]) -> BadInputError:
    close = difflib.get_close_matches(key, known, n=3)
    hint = f"did you mean {', '.join(close)}?" if close else "see TrainingArguments and docs/training.md for the keys"
    return BadInputError(f"unknown recipe key {key!r}", hint=hint)


def load_recipe(name_or_file: str, overrides: list[str] | None = None, values: dict[str, Any] | None = None) -> Recipe:
    """Read, override and validate a recipe; every problem is a BadInputError naming the key. `values` (a
    config file's recipe keys, already typed) apply over the recipe, `overrides` (flags, `--set`) over both."""
    path = recipe_path(name_or_file)
    written = read_yaml(path, hint="fix the recipe file", loader=_RecipeLoader) or {}
    if not isinstance(written, dict):
        raise BadInputError(f"{path}: a recipe is a mapping of keys to values")
    parsed, texts = _parse_overrides(overrides or [])
    values = values or {}
    data = _apply(_apply(written, values), parsed)
    known = set(OWN_FIELDS) | set(training_fields())
    for key in data:
        if key in MANAGED:
            raise BadInputError(f"recipe key {key!r} is set by dpa itself", hint="remove it from the recipe / --set")
        if key not in known:
            raise _unknown(str(key), known)
    stage = data.get("stage")
    if stage_number(stage) not in (1, 2):
        raise BadInputError(f"{path}: stage must be 1 or 2, not {stage!r}")
    data, scaled_from = rescale(written, data, set(parsed) | set(values))
    data = check_recipe(data, texts)
    if data.get("pack") and data.get("train_sampling_strategy") == "group_by_length":
        raise BadInputError(
            "recipe keys pack=true and train_sampling_strategy=group_by_length contradict each other",
            hint="packing already fills rows by length: drop one of them",
        )
    own = {k: data[k] for k in OWN_FIELDS if k in data and k not in NESTED + ("stage",)}
    training = {k: v for k, v in data.items() if k not in OWN_FIELDS}
    notes = tuple(note for note in [schedule_note(scaled_from)] if note)
    return Recipe(
        path.stem, data["stage"], data["trainable"], data["learning_rates"], **own, training_args=training, notes=notes
    )


def gradient_accumulation(global_batch: int, per_device: int, world_size: int) -> int:
    """Steps to accumulate so that per-device batch x processes x steps = the recipe's global batch."""
    per_step = per_device * world_size
    if global_batch % per_step:
        raise BadInputError(
            f"global batch {global_batch} is not a multiple of per-device batch {per_device} "
            f"x {world_size} process(es)",
            hint="change global_batch_size or per_device_train_batch_size with --set",
        )
    return global_batch // per_step
