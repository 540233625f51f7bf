"""The recipe gate: every key of a resolved recipe (file values and `--set` values alike) is checked before
anything is loaded or written.

TrainingArguments fields are checked against the dataclass's own type hints, then against the ranges their
meaning needs; dpa's own fields against the tables below. Last, TrainingArguments is built once, dry, with
the optimizer and scheduler it names, so whatever transformers itself refuses is refused here, by key.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
import math
import re
import tempfile
import typing
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from dpa_cli.defaults import PartMode
from dpa_cli.errors import BadInputError
from dpa_cli.parts import PARTS
from dpa_cli.train.arguments import RENAMED, trainer_kwargs
from dpa_cli.train.fieldtypes import Mismatch, choice, coerce, only_text
from dpa_cli.train.schedule import build_scheduler, check_phases

MODES = PartMode.names()
OWN_TYPES: dict[str, Any] = {
    "stage": int,
    "global_batch_size": int,
    "max_length": int,
    "lora_r": int,
    "lora_alpha": int | float,
    "lora_dropout": float,
    "lora_targets": str,
    "pack": bool,
}
# Installable package of a reporting backend, where it is not the backend's own name.
PACKAGES = {"azure_ml": "azureml-core", "flyte": "flytekit", "tensorboard": "tensorboard", "neptune": "neptune"}


@dataclass(frozen=True)
class Bound:
    """A range a number must fall in: `low` (excluded when `open_low`) up to `high` (excluded)."""

    low: float
    said: str
    high: float = math.inf
    open_low: bool = False
    also: tuple[float, ...] = ()  # values allowed outside the range (-1: "not set")

    def __call__(self, value: Any) -> None:
        if value is None or value in self.also:
            return
        if not ((value > self.low if self.open_low else value >= self.low) and value < self.high):
            raise Mismatch(self.said)


POSITIVE = Bound(0, "must be positive", open_low=True)
# A learning rate reaches the optimizer as a float32 factor: beyond float32's range torch fails mid-step.
RATE = Bound(0, "must be positive and below 3.4e38 (float32)", open_low=True, high=3.4e38)
NON_NEGATIVE = Bound(0, "must be >= 0")
AT_LEAST_1 = Bound(1, "must be >= 1")
FRACTION = Bound(0, "must be in [0, 1)", high=1)
SEED = Bound(0, "must be in [0, 2**32)", high=2**32)


def _regex(value: Any) -> None:
    try:
        re.compile(value)
    except re.error as err:
        hint = "set --lora-targets to a regex over module names"
        raise Mismatch(f"is not a valid regular expression ({err})", hint=hint) from None


# What a value must satisfy beyond its type, where the meaning requires it (fields of other transformers
# versions are simply never met).
CHECKS: dict[str, Callable[[Any], None]] = {
    "learning_rate": RATE,
    "num_train_epochs": POSITIVE,
    "adam_epsilon": POSITIVE,
    "max_steps": Bound(0, "must be positive (or -1: train by epochs)", open_low=True, also=(-1,)),
    "warmup_steps": NON_NEGATIVE,
    "warmup_ratio": FRACTION,
    "weight_decay": NON_NEGATIVE,
    "adam_beta1": FRACTION,
    "adam_beta2": FRACTION,
    "max_grad_norm": NON_NEGATIVE,
    "label_smoothing_factor": FRACTION,
    "neftune_noise_alpha": POSITIVE,
    "per_device_train_batch_size": AT_LEAST_1,
    "per_device_eval_batch_size": AT_LEAST_1,
    "logging_steps": POSITIVE,
    "save_steps": POSITIVE,
    "eval_steps": POSITIVE,
    "eval_delay": NON_NEGATIVE,
    "save_total_limit": AT_LEAST_1,
    "seed": SEED,
    "data_seed": SEED,
    "dataloader_num_workers": NON_NEGATIVE,
    "dataloader_prefetch_factor": AT_LEAST_1,
    "torch_empty_cache_steps": AT_LEAST_1,
    "eval_accumulation_steps": AT_LEAST_1,
    "ddp_timeout": POSITIVE,
    "ddp_bucket_cap_mb": POSITIVE,
    "global_batch_size": AT_LEAST_1,
    "max_length": AT_LEAST_1,
    "lora_r": AT_LEAST_1,
    "lora_alpha": POSITIVE,
    "lora_dropout": FRACTION,
    "lora_targets": _regex,
    "lr_scheduler_kwargs": check_phases,
}
NO_EVAL = "dpa train has no evaluation set; evaluate with `dpa eval`"
# Trainer features dpa train does not use: (the values that work, why).
UNSUPPORTED: dict[str, tuple[tuple[Any, ...], str]] = {
    "eval_strategy": (("no",), NO_EVAL),
    "do_eval": ((False,), NO_EVAL),
    "eval_on_start": ((False,), NO_EVAL),
    "load_best_model_at_end": ((False,), NO_EVAL),
    "save_strategy": (("no", "steps", "epoch"), NO_EVAL),
    "push_to_hub": ((False,), "dpa works offline; upload the exported model yourself"),
    "fsdp": ((None, "", False), "dpa shards training with DeepSpeed: use --deepspeed zero3"),
    "train_sampling_strategy": (
        ("random", "sequential", "group_by_length"),
        "dpa samples randomly, in order, or grouped by length (group_by_length)",
    ),
}
# Packages a setting needs when it is on: (import name, pip name); transformers would fail only at Trainer init.
REQUIRES = {"use_liger_kernel": ("liger_kernel", "liger-kernel")}


def _compile_modes() -> list[str]:
    import torch._inductor

    return list(torch._inductor.list_mode_options())


def _compile_backends() -> list[str]:
    import torch._dynamo

    return list(torch._dynamo.list_backends(exclude_tags=()))


# Choices torch knows only at run time (asked only when the key is set).
CHOICES: dict[str, Callable[[], list[str]]] = {
    "torch_compile_mode": _compile_modes,
    "torch_compile_backend": _compile_backends,
}


@functools.cache
def training_fields() -> dict[str, tuple[Any, tuple[str, ...]]]:
    """TrainingArguments field -> (type hint, the choices its metadata lists)."""
    from transformers import TrainingArguments

    hints = typing.get_type_hints(TrainingArguments)
    fields = [f for f in dataclasses.fields(TrainingArguments) if f.init]
    return {f.name: (hints[f.name], tuple(f.metadata.get("choices") or ())) for f in fields}


def refusal(key: str, value: Any, bad: Mismatch) -> BadInputError:
    return BadInputError(f"recipe key {key}={value!r} {bad.expected}", hint=bad.hint)


def checked_value(key: str, value: Any, hint: Any, choices: tuple[str, ...] = ()) -> Any:
    """One key's value coerced to its type and checked; BadInputError naming the key."""
    try:
        typed = coerce(value, hint)
        finite_everywhere(typed)
        if typed is not None and (choices or key in CHOICES):
            choice(typed, list(choices) or CHOICES[key](), f"a valid {key}")
        CHECKS.get(key, lambda _: None)(typed)
    except Mismatch as bad:
        raise refusal(key, value, bad) from None
    allowed, why = UNSUPPORTED.get(key, ((typed,), ""))
    if typed not in allowed:
        raise BadInputError(f"recipe key {key}={value!r} is not supported by dpa train", hint=f"{why}; remove it")
    if typed and key in REQUIRES and importlib.util.find_spec(REQUIRES[key][0]) is None:
        raise not_installed(key, value, REQUIRES[key][1], "remove it")
    return typed


def finite_everywhere(value: Any) -> None:
    """No NaN or inf anywhere, also inside mappings and lists (`lr_scheduler_kwargs: {min_lr: .nan}`)."""
    if isinstance(value, float) and not math.isfinite(value):
        raise Mismatch("holds a number that is not finite")
    for item in value.values() if isinstance(value, dict) else value if isinstance(value, list) else ():
        finite_everywhere(item)


def not_installed(key: str, value: Any, package: str, instead: str) -> BadInputError:
    hint = f"pip install {package}, or {instead}"
    return BadInputError(f"recipe key {key}={value!r}: {package} is not installed", hint=hint)


def check_recipe(data: dict[str, Any], texts: dict[str, str]) -> dict[str, Any]:
    """The recipe with every value typed and checked; `texts` are the `--set` values as typed, for keys that
    take text (`--set run_name=2024-01-01` is a name, not a YAML date)."""
    fields = training_fields()
    checked = {
        "trainable": _trainable(data.get("trainable")),
        "learning_rates": _learning_rates(data.get("learning_rates")),
    }
    for key, value in data.items():
        if key in checked:
            continue
        hint, choices = (OWN_TYPES[key], ()) if key in OWN_TYPES else fields[key]
        if key in texts and value is not None and only_text(hint):
            value = texts[key]
        checked[key] = checked_value(key, value, hint, choices)
    if not any(mode != PartMode.FROZEN for mode in checked["trainable"].values()):
        hint = "set a part to full or lora, e.g. --set trainable.phi=full"
        raise BadInputError("the recipe trains nothing: every part is frozen", hint=hint)
    training = {key: value for key, value in checked.items() if key in fields}
    _check_report_to(training.get("report_to"))
    dry_run(training)
    return checked


def stage_number(value: Any) -> int | None:
    """A recipe's `stage` as an int (`1.0` is 1), or None when it is not a whole number."""
    try:
        return coerce(value, int)
    except Mismatch:
        return None


def _mapping(key: str, value: Any) -> dict[str, Any]:
    try:
        return coerce({} if value is None else value, dict[str, Any])
    except Mismatch as bad:
        raise refusal(key, value, bad) from None


def _trainable(value: Any) -> dict[str, str]:
    trainable = _mapping("trainable", value)
    for part, mode in trainable.items():
        if part not in PARTS:
            raise BadInputError(f"unknown part trainable.{part}", hint=f"parts: {', '.join(PARTS)}")
        if mode not in MODES:
            raise BadInputError(f"trainable.{part}={mode!r} is not one of {', '.join(MODES)}")
    missing = [p for p in PARTS if p not in trainable]
    if missing:
        raise BadInputError(
            f"the recipe does not say how to train {', '.join(missing)} (under trainable:)",
            hint="give every part a mode: frozen, full or lora",
        )
    return trainable


def _learning_rates(value: Any) -> dict[str, float]:
    rates = _mapping("learning_rates", value)
    for part, rate in rates.items():
        if part not in PARTS:
            raise BadInputError(f"unknown part learning_rates.{part}", hint=f"parts: {', '.join(PARTS)}")
        rates[part] = checked_value(f"learning_rates.{part}", rate, float)
    return rates


CHECKS.update({f"learning_rates.{part}": RATE for part in PARTS})


def _check_report_to(value: Any) -> None:
    """Every backend named must be installed: a missing one would stop the run only once training starts."""
    from transformers.integrations import get_available_reporting_integrations
    from transformers.integrations.integration_utils import INTEGRATION_TO_CALLBACK

    installed = get_available_reporting_integrations()
    for name in [value] if isinstance(value, str) else value or []:
        if name in ("none", "all") or name in installed:
            continue
        try:
            choice(name, ["none", "all", *sorted(INTEGRATION_TO_CALLBACK)], "a reporting backend transformers knows")
        except Mismatch as bad:
            raise refusal("report_to", value, bad) from None
        raise not_installed("report_to", value, PACKAGES.get(name, name), "--set report_to=none")


# What TrainingArguments, the optimizer lookup and the schedulers raise for arguments they refuse.
REFUSALS = (ValueError, TypeError, KeyError, ImportError, RuntimeError, OSError, NotImplementedError, AttributeError)
# The key whose arguments a step takes (`optim_args` for the optimizer, `lr_scheduler_kwargs` for the scheduler).
COMPANIONS = {"optim": "optim_args", "lr_scheduler_type": "lr_scheduler_kwargs"}


def dry_run(training: dict[str, Any]) -> None:
    """Build TrainingArguments, the optimizer class and the scheduler as the run will, on a dummy parameter (over
    max_steps when the recipe sets it: the schedule's phases must fit the run)."""
    import torch
    from transformers import Trainer, TrainingArguments

    kwargs = trainer_kwargs(training, notes=[])
    step = "TrainingArguments"
    try:
        with tempfile.TemporaryDirectory(prefix="dpa-recipe-") as folder:  # a name it needs; nothing is written
            args = TrainingArguments(output_dir=folder, gradient_accumulation_steps=1, **kwargs)
        step = "optim"
        Trainer.get_optimizer_cls_and_kwargs(args)
        step = "lr_scheduler_type"
        optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=args.learning_rate)
        known = args.max_steps > 0  # else epochs decide: the trainer checks the fit once it knows the length
        build_scheduler(args, optimizer, args.max_steps if known else 100, known_total=known)
    except REFUSALS as err:
        raise _refused_by_transformers(step, err, training, kwargs) from None


def _refused_by_transformers(
    step: str, err: Exception, training: dict[str, Any], kwargs: dict[str, Any]
) -> BadInputError:
    """One line naming the key: the step that failed (optimizer, scheduler), or the key the message names."""
    said = " ".join(str(err).split()) or type(err).__name__
    key = step if step != "TrainingArguments" else _named_key(said, training)
    if training.get(COMPANIONS.get(key)) and not isinstance(err, ImportError):
        key = COMPANIONS[key]  # the arguments given to the optimizer or scheduler, not its name
    if key is None:
        hint = "fix the recipe or --set values"
        return BadInputError(f"transformers refuses the recipe's Trainer arguments: {said}", hint=hint)
    value = training[key] if key in training else kwargs.get(key)
    hint = "fix it in the recipe or with --set"
    return BadInputError(f"recipe key {key}={value!r} is refused by transformers: {said}", hint=hint)


def _named_key(message: str, training: dict[str, Any]) -> str | None:
    """The recipe key a transformers message names (`--logging_steps must be ...`), longest name first."""
    names = {key: key for key in training} | {RENAMED[key]: key for key in training if key in RENAMED}
    for name in sorted(names, key=len, reverse=True):
        if re.search(rf"(?<![\w]){re.escape(name)}(?![\w])", message):
            return names[name]
    # Else a file a value names and the message quotes (`accelerator_config: missing.json`).
    quoted = (key for key, value in training.items() if isinstance(value, str) and "." in value and value in message)
    return next(quoted, None)
