"""What a run shows and keeps: metrics.jsonl in the stage folder, and a reporter the CLI renders."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Protocol

from transformers import TrainerCallback

from dpa_cli.workspace.layout import METRICS_FILE


class Reporter(Protocol):
    """Where the library sends what a person watching a run should see (the CLI draws it)."""

    def before_training(self, info: dict[str, Any]) -> None: ...

    def on_log(self, step: int, max_steps: int, metrics: dict[str, Any]) -> None: ...

    def after_training(self, summary: dict[str, Any]) -> None: ...


class QuietReporter:
    def before_training(self, info: dict[str, Any]) -> None:
        pass

    def on_log(self, step: int, max_steps: int, metrics: dict[str, Any]) -> None:
        pass

    def after_training(self, summary: dict[str, Any]) -> None:
        pass


def part_rates(optimizer: Any) -> dict[str, float]:
    """Each part's current learning rate, from the optimizer's groups (named by train/freeze.parameter_groups)."""
    rates: dict[str, float] = {}
    for group in getattr(optimizer, "param_groups", None) or []:
        name = group.get("name")
        if isinstance(name, str):
            rates.setdefault(name.removesuffix(" (no decay)"), float(group["lr"]))
    return rates


class MetricsCallback(TrainerCallback):
    """Appends one JSON line per log to metrics.jsonl (main process only) with tokens/s, and reports it."""

    def __init__(self, stage_dir: Path, reporter: Reporter, peak_flops: float | None, flops_per_token: float):
        self.path = Path(stage_dir) / METRICS_FILE
        self.reporter = reporter
        self.peak_flops = peak_flops
        self.flops_per_token = flops_per_token
        self.last: tuple[float, int] | None = None
        self.final_loss: float | None = None
        self.rates: dict[str, float] = {}

    def on_optimizer_step(self, args, state, control, optimizer=None, **kwargs):
        # The rates this step used: the Trainer steps the scheduler after this, and logs `learning_rate` the same way.
        self.rates = part_rates(optimizer)

    def on_train_begin(self, args, state, control, **kwargs):
        self.last = (time.perf_counter(), state.num_input_tokens_seen)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or not logs:
            return
        now, tokens = time.perf_counter(), state.num_input_tokens_seen
        metrics = {"step": state.global_step, "epoch": state.epoch, **logs, "tokens_seen": tokens}
        if "learning_rate" in logs and self.rates:  # `learning_rate` is the first group's: each part's too
            metrics["learning_rates"] = self.rates
        if self.last is not None and now > self.last[0] and tokens > self.last[1]:
            rate = (tokens - self.last[1]) / (now - self.last[0])
            metrics["tokens_per_second"] = rate
            if self.peak_flops:
                metrics["mfu"] = rate * self.flops_per_token / self.peak_flops
        self.last = (now, tokens)
        if "loss" in logs:
            self.final_loss = logs["loss"]
        with self.path.open("a", encoding="utf-8") as handle:
            handle.write(json.dumps(metrics) + "\n")
        self.reporter.on_log(state.global_step, state.max_steps, metrics)
