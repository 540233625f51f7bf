"""The learning-rate schedule: its phase lengths resolved for the run's own length, in one place.

A recipe may give `warmup_steps` and warmup_stable_decay's `num_decay_steps` / `num_stable_steps` (in
`lr_scheduler_kwargs`) as steps, or as fractions of the run below 1 (rounded up, as transformers does for
`warmup_steps`). A recipe that also gives `max_steps` writes its steps for a run of that length, as the
official scripts do (PT_DPA_4node.sh: warmup 440, decay 1170 of 2180 steps): a run of another length
(`--max-steps`, `--set max_steps`, training by epochs) keeps the schedule's shape, because those file values
become fractions of the file's `max_steps`. Values given with `--set` are taken as they are.

The recipe gate's dry run and the trainer build the scheduler through `build_scheduler`, so what the gate
accepted is what the run uses.
"""

from __future__ import annotations

import json
import math
from typing import Any

from dpa_cli.errors import BadInputError
from dpa_cli.train.fieldtypes import Mismatch

WSD = "warmup_stable_decay"
PHASES = ("num_decay_steps", "num_stable_steps")  # warmup_stable_decay's phase lengths besides the warmup
KWARGS = "lr_scheduler_kwargs"


def _number(value: Any) -> float | None:
    """A plain int or float (never a bool), else None."""
    return value if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def _whole(value: Any) -> int | None:
    number = _number(value)
    return int(number) if number is not None and math.isfinite(number) and number == int(number) else None


def _as_mapping(value: Any) -> dict[str, Any] | None:
    """lr_scheduler_kwargs as a mapping (TrainingArguments reads text that starts with `{` as JSON)."""
    if isinstance(value, str) and value.lstrip().startswith("{"):
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            return None  # the type gate names it
    return value if isinstance(value, dict) else None


def check_phases(kwargs: Any) -> None:
    """Mismatch unless every phase length in lr_scheduler_kwargs is steps (>= 1) or a fraction (>= 0, < 1)."""
    for name in PHASES:
        value = (_as_mapping(kwargs) or {}).get(name)
        if value is None:
            continue
        number = _number(value)
        if number is None or not math.isfinite(number) or number < 0 or (number >= 1 and number != int(number)):
            raise Mismatch(
                f"has {name}={value!r}: it must be steps (a whole number) or a fraction of all steps below 1"
            )


def rescale(file: dict[str, Any], data: dict[str, Any], overridden: set[str]) -> tuple[dict[str, Any], int | None]:
    """`data` (the recipe with overrides applied) with the file's schedule steps as fractions of the file's
    max_steps, when the run's max_steps differs from it; and that file max_steps (None when nothing changed)."""
    written = _whole(file.get("max_steps"))
    if written is None or written <= 0 or _whole(data.get("max_steps")) == written:
        return data, None
    data, scaled = dict(data), False
    warmup = _number(file.get("warmup_steps"))
    if "warmup_steps" not in overridden and warmup is not None and warmup >= 1:
        data["warmup_steps"], scaled = warmup / written, True
    kwargs = _as_mapping(file.get(KWARGS))
    if KWARGS not in overridden and kwargs:
        phases = {k: v / written for k, v in kwargs.items() if k in PHASES and (_number(v) or 0) >= 1}
        if phases:
            data[KWARGS], scaled = {**kwargs, **phases}, True
    return data, written if scaled else None


def phase_steps(value: float, total: int) -> int:
    """A phase length in steps: `value` itself (>= 1), or that fraction of `total` rounded up."""
    return int(value) if value >= 1 else math.ceil(total * value)


def scheduler_kwargs(scheduler: str, kwargs: Any, warmup: int, total: int, known_total: bool = True) -> dict[str, Any]:
    """The scheduler's own arguments for a run of `total` steps after `warmup`, phase fractions resolved.

    A phase given as a fraction is cut to what the run leaves (a 1-step run of the stage-1 recipe still works);
    phases given as steps that do not fit the run are refused, when the run's length is known.
    """
    resolved = dict(_as_mapping(kwargs) or {})
    given = [name for name in PHASES if resolved.get(name) is not None]
    scheduler = getattr(scheduler, "value", scheduler)  # TrainingArguments holds a SchedulerType
    if given and scheduler != WSD:
        raise BadInputError(
            f"recipe key {KWARGS} holds {', '.join(given)}, which only lr_scheduler_type={WSD} takes, and the "
            f"recipe's lr_scheduler_type is {scheduler}",
            hint=f"remove them from {KWARGS} (e.g. --set {KWARGS}={{}}) when you change lr_scheduler_type",
        )
    left = max(total - warmup, 0)
    for name in given:
        value = resolved[name]
        resolved[name] = min(phase_steps(value, total), left) if value < 1 else int(value)
        if value < 1:
            left -= resolved[name]
    steps = warmup + sum(resolved[name] for name in given)
    if known_total and steps > total:
        phases = ", ".join(f"{name} {resolved[name]}" for name in given)
        raise BadInputError(
            f"the schedule does not fit the run: warmup {warmup} + {phases} is {steps} steps, and the run has {total}",
            hint=f"shorten warmup_steps or {KWARGS}, or give them as fractions of the run (below 1)",
        )
    return resolved


def build_scheduler(args: Any, optimizer: Any, total: int, known_total: bool = True) -> Any:
    """transformers' scheduler for TrainingArguments `args` over `total` steps, as the trainer and the gate use it."""
    from transformers import get_scheduler

    warmup = args.get_warmup_steps(total)
    kwargs = scheduler_kwargs(args.lr_scheduler_type, args.lr_scheduler_kwargs, warmup, total, known_total)
    return get_scheduler(
        args.lr_scheduler_type,
        optimizer=optimizer,
        num_warmup_steps=warmup,
        num_training_steps=total,
        scheduler_specific_kwargs=kwargs,
    )


def schedule_note(written: int | None) -> str | None:
    """What the resolved recipe says about a rescaled schedule."""
    if written is None:
        return None
    return (
        f"the recipe's schedule is written for {written} steps: its warmup and decay are scaled to this run's "
        "length (fractions of it)"
    )
