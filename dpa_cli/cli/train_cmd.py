"""`dpa train --stage 1|2`: the two-stage recipe on the workspace, optionally relaunched under torchrun."""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from dpa_cli.cli.inspect_cmd import human_count
from dpa_cli.cli.options import JsonFlag
from dpa_cli.cli.render import err, out, print_json
from dpa_cli.defaults import OnBadSample
from dpa_cli.errors import BadInputError, DpaError
from dpa_cli.train.config_file import OPTIONS


def train(
    ctx: typer.Context,
    config_file: Annotated[
        Path | None,
        typer.Argument(
            metavar="CONFIG",
            help="A YAML file holding this command's options and recipe values (flags win).",
            show_default=False,
        ),
    ] = None,
    config: Annotated[
        Path | None, typer.Option("--config", help="The same as CONFIG, as an option.", show_default=False)
    ] = None,
    stage: Annotated[
        int | None, typer.Option("--stage", help="1: align phi on captions; 2: instruction tuning.", show_default=False)
    ] = None,
    data: Annotated[
        str | None,
        typer.Option("--data", help="LLaVA JSON/JSONL file or a Hugging Face datasets folder.", show_default=False),
    ] = None,
    workspace: Annotated[
        Path | None, typer.Option("--workspace", "-w", help="Workspace (default: found like git finds a repo).")
    ] = None,
    image_root: Annotated[
        str | None, typer.Option(metavar="DIR", help="Folder the data's image paths are relative to.")
    ] = None,
    recipe: Annotated[
        str | None, typer.Option(help="stage1, stage2-full, stage2-lora or a YAML file (default: by stage).")
    ] = None,
    lora: Annotated[
        bool, typer.Option("--lora", help="LoRA adapters (stage2-lora: every linear layer of every part).")
    ] = False,
    full: Annotated[bool, typer.Option("--full", help="Full fine-tuning of the target LLM (stage2-full).")] = False,
    freeze_perceiver: Annotated[
        bool, typer.Option("--freeze-perceiver", help="Keep the whole perceiver frozen.")
    ] = False,
    lora_targets: Annotated[
        str | None, typer.Option(help="Regex over module names for LoRA adapters, or all-linear.")
    ] = None,
    deepspeed: Annotated[str | None, typer.Option(help="zero2, zero3 or a DeepSpeed JSON file.")] = None,
    nproc: Annotated[int, typer.Option(min=1, help="Processes on this node (relaunches under torchrun).")] = 1,
    resume: Annotated[bool, typer.Option("--resume", help="Continue the stage from its latest checkpoint.")] = False,
    restart: Annotated[bool, typer.Option("--restart", help="Discard the stage's run and start it over.")] = False,
    max_steps: Annotated[int | None, typer.Option(help="Stop after N optimizer steps (wins over epochs).")] = None,
    from_model: Annotated[
        str | None, typer.Option("--from", help="Start from: model (the upgrade), stage1, or a folder.")
    ] = None,
    on_bad_sample: Annotated[
        str, typer.Option(help="fail (before training starts) or skip (counted, reported).")
    ] = "fail",
    pack: Annotated[
        bool, typer.Option("--pack", help="Pack several samples per row up to max_length (recipe key pack).")
    ] = False,
    report_to: Annotated[
        str | None,
        typer.Option(
            "--report-to",
            help="tensorboard, wandb, mlflow or none "
            "(default: tensorboard when installed; events in WORKSPACE/stageN/runs/).",
            show_default=False,
        ),
    ] = None,
    set_: Annotated[
        list[str] | None, typer.Option("--set", help="Override a recipe key: --set learning_rate=2e-5.")
    ] = None,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Check everything and print the plan; load and write nothing.")
    ] = False,
    gpu_memory: Annotated[
        str | None,
        typer.Option(
            help="--dry-run: memory of one GPU, e.g. 80GB, 24GiB [default: 80GB, an A100-80GB].", show_default=False
        ),
    ] = None,
    gpu_tflops: Annotated[
        float | None,
        typer.Option(help="--dry-run: dense bf16 TFLOP/s of one GPU [default: 312, an A100].", show_default=False),
    ] = None,
    json_: JsonFlag = False,
) -> None:
    """Train stage 1 or 2 of the DPA recipe; the result lands in WORKSPACE/stageN/ for the next command.

    Stage 1 trains phi (and a freshly composed perceiver's phi_p) on captions; everything else stays frozen.

    Stage 2 starts from stage 1's result and trains the perceiver, phi and the LLM (or LoRA on the LLM).

    Before step 1: one sample with its supervised span highlighted and the trainable parameters per part.

    CONFIG (or --config FILE) holds the same options and any recipe key, LLaMA-Factory style; flags win.

    --dry-run also estimates memory per GPU (DeepSpeed's estimators, activations with and without gradient
    checkpointing) and the step time, and refuses a run that does not fit in --gpu-memory.

    Examples:
      dpa train --stage 1 --data captions.json --image-root images/
      dpa train stage2.yaml --max-steps 100
      dpa train --stage 2 --data instruct.json --image-root images/ --deepspeed zero3 --nproc 8
      dpa train --stage 2 --data instruct.json --lora --set learning_rate=1e-4 --resume
      dpa train --stage 2 --data instruct.json --nproc 8 --deepspeed zero3 --dry-run --gpu-memory 40GB
      dpa train --stage 2 --data instruct.json --set train_sampling_strategy=group_by_length
      dpa train --stage 2 --data instruct.json --pack
    """
    from dpa_cli.workspace.manifest import find_workspace

    given = {k: v for k, v in locals().items() if k in TRAIN_OPTIONS}
    options, values, sets = _with_config_file(ctx, given, config_file, config)
    stage, data, nproc = options["stage"], options["data"], options["nproc"]
    _check_flags(
        stage, data, options["lora"], options["full"], options["resume"], options["restart"], options["on_bad_sample"]
    )
    if not dry_run and (gpu_memory, gpu_tflops) != (None, None):
        flag = "--gpu-memory" if gpu_memory is not None else "--gpu-tflops"
        raise BadInputError(f"{flag} is read by --dry-run only", hint="add --dry-run to see whether the run fits")
    # Before the heavy imports below: the launcher itself does not train. A process a launcher started (LOCAL_RANK
    # set) never relaunches: a config file's `nproc:` reaches the workers too, which must train, not launch.
    if nproc > 1 and not dry_run and "LOCAL_RANK" not in os.environ:
        raise typer.Exit(_relaunch(nproc, find_workspace(options["workspace"]), stage))

    from dpa_cli.train.stage import TrainRequest

    image_root = options["image_root"]
    request = TrainRequest(
        stage=stage,
        data=data,
        workspace=find_workspace(options["workspace"]),
        image_root=str(image_root) if image_root else None,
        recipe=options["recipe"],
        overrides=[*sets, *([f"report_to={report_to}"] if report_to else []), *(set_ or [])],
        values=values,
        lora=True if options["lora"] else (False if options["full"] else None),
        freeze_perceiver=options["freeze_perceiver"],
        lora_targets=options["lora_targets"],
        deepspeed=options["deepspeed"],
        resume=options["resume"],
        restart=options["restart"],
        max_steps=options["max_steps"],
        from_model=options["from_model"],
        on_bad_sample=options["on_bad_sample"],
        pack=pack,
    )
    if dry_run:
        from dpa_cli.train.plan import dry_run as plan_only

        plan = plan_only(request, processes=nproc, gpu=_gpu(gpu_memory, gpu_tflops))
        print_json(plan) if json_ else _print_plan(plan)
        return
    from dpa_cli.train.run import run_stage

    main = int(os.environ.get("RANK", "0")) == 0
    try:
        summary = run_stage(request, reporter=RichReporter(quiet=json_ or not main))
    finally:
        _leave_process_group()
    if json_ and main:
        print_json(summary)


# The parameters a config file may set (its keys map to them: `from` is --from).
TRAIN_OPTIONS = tuple(name for name, _ in OPTIONS.values())


def _with_config_file(
    ctx: typer.Context, given: dict[str, Any], positional: Path | None, option: Path | None
) -> tuple[dict[str, Any], dict[str, Any], list[str]]:
    """The options after the config file (flags typed on the command line win), its recipe values and its
    `set:` items; without a file, the options as given."""
    from dpa_cli.cli.usage import click

    if positional is not None and option is not None and positional != option:
        raise BadInputError(f"two config files: {positional} and --config {option}", hint="pass one of them")
    path = positional or option
    if path is None:
        return given, {}, []
    from dpa_cli.train.config_file import merged, read_train_config

    config = read_train_config(path)
    unsaid = (click.core.ParameterSource.DEFAULT, None)  # a default is no flag: the file's value stands
    explicit = {name for name in given if ctx.get_parameter_source(name) not in unsaid}
    return merged(given, explicit, config), config.values, config.sets


def _gpu(memory: str | None, tflops: float | None) -> Any:
    """The GPU a dry run checks the plan against: the flags, else an A100-80GB."""
    from dpa_cli.train import fit

    named = memory is None and tflops is None
    memory = fit.parse_memory(fit.DEFAULT_MEMORY if memory is None else memory)
    tflops = fit.check_tflops(fit.DEFAULT_TFLOPS if tflops is None else tflops)
    return fit.Gpu(memory, tflops, fit.DEFAULT_GPU if named else "GPU")


def _leave_process_group() -> None:
    """Shut the process group down before the interpreter exits: left to process teardown, gloo's threads can
    abort a worker that has finished (SIGABRT, "terminate called without an active exception")."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def _print_plan(plan: dict[str, Any]) -> None:
    """`dpa train --dry-run` for people: where from and to, the recipe after flags and --set, what trains."""
    recipe = plan["recipe"]
    out.print(f"[bold]stage {plan['stage']}[/] from {plan['source']} -> {plan['output']} (recipe {recipe['name']})")
    if plan["builds_in"] != plan["output"]:
        out.print(f"built in {plan['builds_in']}, put in place when finished (the old stage stays until then)")
    out.print(f"resume from: {plan['resume_from'] or 'no (a fresh run)'}")
    out.print(f"data: {plan['data']} ({plan['samples'] if plan['samples'] is not None else 'streamed'} samples)")
    out.print(
        f"{plan['world_size']} process(es), gradient accumulation {plan['gradient_accumulation_steps']}, "
        f"DeepSpeed {plan['deepspeed'] or 'off'}"
    )
    values = Table("key", "value", title="recipe (after flags and --set)", title_justify="left")
    for key, value in recipe.items():
        values.add_row(key, str(value))
    out.print(values)
    _trainable_table(plan["trainable"])
    _fit_table(plan["fit"])
    for note in plan["notes"]:
        out.print(f"[yellow]note:[/] {note}")
    out.print("dry run: nothing was loaded or written")


def _trainable_table(trainable: dict[str, dict[str, Any]]) -> None:
    table = Table("part", "mode", "params", "trainable", title="trainable parameters", title_justify="left")
    for part, row in trainable.items():
        table.add_row(part, row["mode"], human_count(row["params"]), human_count(row["trainable"]))
    out.print(table)


def _fit_table(fit: dict[str, Any]) -> None:
    """Per-GPU memory under the chosen ZeRO stage, activations both ways, and the step time at the stated MFU."""
    chosen = "with" if fit["gradient_checkpointing"] else "without"
    table = Table(
        "per GPU",
        "GiB",
        title=f"will it fit: {fit['gpus']} x {fit['gpu']} ({fit['gpu_memory_gib']} GiB, "
        f"{fit['gpu_tflops']:g} TFLOP/s), ZeRO-{fit['zero_stage']}, {fit['dtype']}",
        title_justify="left",
    )
    table.add_row("model states", str(fit["model_states_gib"]))
    for key, words in (("without_checkpointing", "without"), ("with_checkpointing", "with")):
        mark = " (this run)" if words == chosen else ""
        table.add_row(f"activations {words} checkpointing{mark}", str(fit["activations_gib"][key]))
    table.add_row("total", f"{fit['total_gib']} ({'fits' if fit['fits'] else 'does not fit'})")
    out.print(table)
    out.print(
        f"model states: {fit['model_states_how']}; trainable {human_count(fit['trainable'])}, frozen "
        f"{human_count(fit['frozen'])} (no gradients or optimizer states)"
    )
    out.print(
        f"activations: micro batch {fit['micro_batch']} x max_length {fit['max_length']}; step about "
        f"{fit['step_seconds']:.3g} s at {fit['mfu']:.0%} MFU ({fit['tokens_per_gpu_step']} tokens per GPU per step)"
    )


def _check_flags(
    stage: int | None, data: str | None, lora: bool, full: bool, resume: bool, restart: bool, on_bad_sample: str
) -> None:
    for value, flag, key in ((stage, "--stage", "stage"), (data, "--data", "data")):
        if value is None:
            hint = f"pass {flag}, or write `{key}:` in a config file (dpa train CONFIG.yaml)"
            raise BadInputError(f"missing option {flag}", hint=hint)
    if stage not in (1, 2):
        raise BadInputError(f"--stage {stage}: the recipe has stages 1 and 2")
    for a, b, names in ((lora, full, "--lora and --full"), (resume, restart, "--resume and --restart")):
        if a and b:
            raise BadInputError(f"{names} contradict each other", hint="pass one of them")
    if on_bad_sample not in OnBadSample.names():
        raise BadInputError(f"--on-bad-sample {on_bad_sample!r} is not fail or skip")


def without_nproc(argv: list[str]) -> list[str]:
    kept, skip = [], False
    for arg in argv:
        if skip or arg.startswith("--nproc="):
            skip = False
            continue
        skip = arg == "--nproc"
        if not skip:
            kept.append(arg)
    return kept


def _relaunch(nproc: int, workspace: Path, stage: int) -> int:
    """Run this same command (without --nproc) under torchrun's launcher with `nproc` processes on this node.

    The launcher runs in this process, so a failed worker is reported in one line naming its rank (a worker
    refusing bad input has printed its own message; its exit code 2 is passed on).
    """
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    from dpa_cli.train.stage import resume_hint

    args = without_nproc(sys.argv[1:])
    err.print(f"relaunching under torchrun with {nproc} processes")
    try:
        run(parse_args([f"--nproc_per_node={nproc}", "-m", "dpa_cli", *args]))
    except ChildFailedError as failed:
        causes = {f.exitcode for f in failed.failures.values()} - {-signal.SIGTERM}  # SIGTERM: the launcher's
        if causes == {BadInputError.exit_code}:  # refused input: every worker has said why
            return BadInputError.exit_code
        raise DpaError(_failure_line(failed.failures), hint=resume_hint(workspace, stage)) from None
    except SignalException as stopped:
        raise DpaError(f"training stopped by {stopped.sigval.name}", hint=resume_hint(workspace, stage)) from None
    return 0


def _failure_line(failures: dict[int, Any]) -> str:
    """The failed ranks, the cause first: a rank killed by a signal other than the SIGTERM with which the
    launcher stops the rest, then one that exited with an error, then the ones the launcher stopped."""

    def order(rank: int) -> tuple[int, int]:
        code = failures[rank].exitcode
        return (0 if code < 0 and code != -signal.SIGTERM else 1 if code > 0 else 2), rank

    said = []
    for rank in sorted(failures, key=order):
        f = failures[rank]
        how = f"was killed by {f.signal_name()}" if f.exitcode < 0 else f"exited with code {f.exitcode}"
        said.append(f"rank {rank} (pid {f.pid}) {how}")
    return "training process " + "; then ".join(said)


class RichReporter:
    """Draws a run for people: the sample, the trainable table, then a progress bar with live metrics."""

    def __init__(self, quiet: bool):
        self.quiet = quiet
        self.progress: Progress | None = None
        self.task = None

    def before_training(self, info: dict[str, Any]) -> None:
        if self.quiet:
            return
        recipe = info["recipe"]
        out.print(
            f"[bold]stage {recipe['stage']}[/] from {info['source']} (recipe {recipe['name']}, "
            f"{info['world_size']} process(es))"
        )
        out.print(info["sample"])
        _trainable_table(info["trainable"])
        for note in info["notes"]:
            out.print(f"[yellow]note:[/] {note}")
        if info["resume_from"]:
            out.print(f"resuming from {info['resume_from']}")
        self.progress = Progress(
            TextColumn("training"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            TextColumn("{task.fields[metrics]}"),
            console=err,
        )
        self.progress.start()

    def on_log(self, step: int, max_steps: int, metrics: dict[str, Any]) -> None:
        if self.progress is None:
            return
        if self.task is None:
            self.task = self.progress.add_task("train", total=max_steps, metrics="")
        shown = [
            f"loss {metrics['loss']:.4f}" if "loss" in metrics else "",
            f"gnorm {metrics['grad_norm']:.3g}" if "grad_norm" in metrics else "",
            f"lr {metrics['learning_rate']:.2e}" if "learning_rate" in metrics else "",
            f"{metrics['tokens_per_second']:.0f} tok/s" if "tokens_per_second" in metrics else "",
            f"MFU {metrics['mfu']:.1%}" if "mfu" in metrics else "",
        ]
        self.progress.update(self.task, completed=step, metrics="  ".join(s for s in shown if s))

    def after_training(self, summary: dict[str, Any]) -> None:
        if self.progress is not None:
            self.progress.stop()
        if self.quiet:
            return
        out.print(
            f"[green]done[/]: {summary['steps']} steps in {summary['seconds']:.1f} s, final loss "
            f"{summary['final_loss']}, {summary['tokens_seen']} tokens"
        )
        skipped = summary["skipped_samples"]
        if skipped:
            out.print(f"[yellow]skipped[/] {skipped['count']} bad samples: {skipped['by_kind']}")
