"""`dpa demo`: build the inputs, then drive the real commands in order, as a user would type them.

inspect -> upgrade (DPA, and the ViT-only baseline) -> data check -> train stage 1 -> train stage 2 ->
export -> generate; then score both exports on held-out questions and write the report.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dpa_cli import __version__
from dpa_cli.errors import DpaError
from dpa_cli.workspace.layout import METRICS_FILE, stage_dir

# The DPA export must beat chance by this much (absolute accuracy) at full scale. Runs on this budget and
# close ones scored 0.30-0.54 above chance (colour and count are learned first, shape last); float
# arithmetic differs between CPUs and thread counts, hence the headroom.
LEARNED_MARGIN = 0.20


DEMO_RECORD = "dpa_demo.json"  # written last: a folder holding it is a whole demo dpa wrote


class DemoFailed(DpaError):
    """A step of the demo failed, or the model did not learn."""


@dataclass(frozen=True)
class Budget:
    stage1_steps: int
    stage2_steps: int
    train_images: int = 2000
    heldout_images: int = 40
    batch: int = 8

    @classmethod
    def scaled(cls, scale: float) -> Budget:
        """`--steps-scale`: 1.0 is the documented run; 0.1 is the quick one (under a minute)."""
        return cls(max(2, round(300 * scale)), max(4, round(1600 * scale)), heldout_images=40 if scale >= 0.5 else 10)


def _train_flags(budget: Budget) -> list[str]:
    return [
        "--set",
        f"global_batch_size={budget.batch}",
        "--set",
        f"per_device_train_batch_size={budget.batch}",
        "--set",
        "max_length=256",
        "--set",
        "gradient_checkpointing=false",
        "--set",
        "save_steps=100000",
        "--set",
        "logging_steps=5",
        "--set",
        "warmup_steps=0.05",
    ]


class Driver:
    """Runs `dpa ...` commands through the real command line (`cli`, handed in by the caller), in this process,
    and keeps the list."""

    def __init__(self, cli: Callable[..., Any], say: Callable[[str], None], stdout_to_stderr: bool = False):
        self.cli = cli
        self.say = say
        self.stdout_to_stderr = stdout_to_stderr  # `dpa demo --json`: stdout holds only the demo's JSON
        self.commands: list[str] = []

    def __call__(self, *args: Any) -> None:
        words = [str(a) for a in args]
        self.commands.append("dpa " + " ".join(words))
        self.say(f"$ dpa {' '.join(words)}")
        output = contextlib.redirect_stdout(sys.stderr) if self.stdout_to_stderr else contextlib.nullcontext()
        with output:
            code = self.cli(args=words, standalone_mode=False, prog_name="dpa")
        if code not in (None, 0):
            raise DemoFailed(f"`dpa {words[0]}` exited with code {code}", hint="see its message above")


def is_demo_folder(folder: Path) -> bool:
    """Whether `folder` is one `dpa demo` wrote (its record says so): the only kind `--force` may replace."""
    try:
        record = json.loads((Path(folder) / DEMO_RECORD).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError):
        return False
    return isinstance(record, dict) and record.get("dpa_demo") == 1


def _train_and_export(dpa: Driver, workspace: Path, data: dict[str, Path], budget: Budget) -> Path:
    flags = _train_flags(budget)
    dpa(
        "train",
        "--stage",
        1,
        "--workspace",
        workspace,
        "--data",
        data["captions"],
        "--image-root",
        data["images"],
        *flags,
        "--max-steps",
        budget.stage1_steps,
        "--set",
        "learning_rate=2e-3",
    )
    dpa(
        "train",
        "--stage",
        2,
        "--workspace",
        workspace,
        "--data",
        data["instruct"],
        "--image-root",
        data["images"],
        *flags,
        "--max-steps",
        budget.stage2_steps,
        "--set",
        "learning_rate=1e-3",
        "--set",
        "learning_rates.vit=1e-3",
        "--set",
        "learning_rates.phi_p=1e-3",
    )
    dpa("export", "--workspace", workspace)
    return workspace / "export"


def _three_images(held: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One question on each of three different held-out images, a different kind of question each."""
    images = sorted({item["image"] for item in held})[:3]
    return [
        next(item for item in held if item["image"] == image and item["kind"] == kind)
        for image, kind in zip(images, ("colour", "shape", "count"))
    ]


def _loss_fell(workspace: Path) -> bool:
    losses = [
        json.loads(line).get("loss") for line in (stage_dir(workspace, 2) / METRICS_FILE).read_text().splitlines()
    ]
    losses = [loss for loss in losses if loss is not None]
    return len(losses) >= 2 and losses[-1] < losses[0]


def run_demo(
    folder: Path,
    cli: Callable[..., Any],
    scale: float = 1.0,
    say: Callable[[str], None] = print,
    json_output: bool = False,
) -> dict[str, Any]:
    """The whole pipeline in `folder`, driving `cli` (the `dpa` command line) as a user would type it.

    The commands run inside `folder` with relative paths, so the folder can be renamed into place afterwards and
    the commands in its report still work there. Paths in the result are relative to `folder`; whether the model
    learned is judged by `check_learned`. `json_output`: the commands' own output goes to stderr, leaving stdout
    to the caller's JSON."""
    with _inside(folder):
        return _run(cli, scale, say, json_output)


@contextlib.contextmanager
def _inside(folder: Path):
    previous = Path.cwd()
    os.chdir(folder)
    try:
        yield
    finally:
        os.chdir(previous)


def _run(cli: Callable[..., Any], scale: float, say: Callable[[str], None], json_output: bool) -> dict[str, Any]:
    from dpa_cli.demo.build import build_models
    from dpa_cli.demo.evaluate import chance, score
    from dpa_cli.demo.report import plot_losses, write_report
    from dpa_cli.demo.shapes import write_dataset

    started, budget = time.perf_counter(), Budget.scaled(scale)
    say("building the synthetic dataset and the starting models")
    data = write_dataset(Path("data"), budget.train_images, budget.heldout_images)
    target, lm = build_models(Path("models"))
    dpa = Driver(cli, say, stdout_to_stderr=json_output)
    dpa("inspect", target)
    perceiver = f"vit=target,lm={lm}"
    workspaces = {"DPA": Path("dpa"), "ViT-only": Path("vit-only")}
    dpa("upgrade", target, "--perceiver", perceiver, "-o", workspaces["DPA"])
    dpa("upgrade", target, "--perceiver", perceiver, "-o", workspaces["ViT-only"], "--perceiver-layers", 0)
    dpa(
        "data",
        "check",
        data["instruct"],
        "--workspace",
        workspaces["DPA"],
        "--image-root",
        data["images"],
        "--limit",
        200,
    )
    exports = {name: _train_and_export(dpa, ws, data, budget) for name, ws in workspaces.items()}
    held = json.loads(data["heldout"].read_text())
    examples = _three_images(held)
    for item in examples:
        dpa(
            "generate",
            exports["DPA"],
            "--image",
            data["images"] / item["image"],
            "--prompt",
            item["question"],
            "--max-new-tokens",
            4,
        )
    scores = {name: score(path, data["heldout"], data["images"]) for name, path in exports.items()}
    scores["chance"] = chance(held)
    plot_losses(workspaces, Path("loss.png"))
    facts = {
        "train_images": budget.train_images,
        "heldout_questions": len(held),
        "stage1_steps": budget.stage1_steps,
        "stage2_steps": budget.stage2_steps,
        "batch": budget.batch,
        "commands": dpa.commands,
        "seconds": time.perf_counter() - started,
    }
    answers = {(a["image"], a["question"]): a for a in scores["DPA"]["answers"]}
    report = write_report(Path("."), scores, [answers[(e["image"], e["question"])] for e in examples], facts)
    result = {
        "scores": {k: {"accuracy": v["accuracy"], "overall": v["overall"]} for k, v in scores.items()},
        "report": str(report),
        "plot": "loss.png",
        "scale": scale,
        "stage2_loss_fell": _loss_fell(workspaces["DPA"]),
        **facts,
    }
    Path(DEMO_RECORD).write_text(json.dumps({"dpa_demo": 1, "dpa": __version__, **result}, indent=2) + "\n")
    return result


def check_learned(result: dict[str, Any]) -> None:
    """Raise DemoFailed when the demo did not learn: below chance + LEARNED_MARGIN at full scale, or (the quick
    run, too short to score) when the stage-2 loss did not fall."""
    if result["scale"] < 1.0:
        if not result["stage2_loss_fell"]:
            raise DemoFailed("the quick demo's stage-2 loss did not fall")
        return
    dpa, chance = result["scores"]["DPA"]["overall"], result["scores"]["chance"]["overall"]
    if dpa < chance + LEARNED_MARGIN:
        raise DemoFailed(f"the DPA model did not learn: held-out accuracy {dpa:.0%}, chance {chance:.0%}")
