"""`dpa demo`: the whole pipeline on an embedded default, on a laptop CPU, in minutes."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.rule import Rule
from rich.table import Table

from dpa_cli.cli.options import JsonFlag
from dpa_cli.cli.render import err, out, print_json
from dpa_cli.errors import BadInputError


def demo(
    ctx: typer.Context,
    output: Annotated[
        Path, typer.Option("--output", "-o", help="Folder for the demo's data, models and report.")
    ] = Path("dpa-demo"),
    steps_scale: Annotated[
        float, typer.Option(help="Scale the training steps: 1.0 shows learning, 0.1 is a quick check.")
    ] = 1.0,
    force: Annotated[bool, typer.Option("--force", help="Replace an existing demo folder.")] = False,
    json_: JsonFlag = False,
) -> None:
    """Run the whole pipeline on synthetic pictures of shapes: no network, no GPU, a few minutes on 2 cores.

    Builds a small LLaVA-NeXT-style model and a small text LM, then runs the real commands in order.

    inspect, upgrade (DPA and a ViT-only baseline), data check, train stage 1 and 2, export, generate.

    Scores both exports on held-out questions and writes report.md and loss.png; exits 1 if nothing was learned.

    Examples:
      dpa demo
      dpa demo --steps-scale 0.1 -o /tmp/quick-demo
    """
    from dpa_cli.checkpoint.atomic import check_replaceable, staged_folder
    from dpa_cli.demo.run import DEMO_RECORD, check_learned, is_demo_folder, run_demo

    if steps_scale <= 0:
        raise BadInputError(f"--steps-scale {steps_scale} must be positive")
    if not (output.is_dir() and not any(output.iterdir())):  # an empty folder is fine to fill
        not_ours = f"--force replaces only a folder `dpa demo` wrote (it holds {DEMO_RECORD}), and {output} is not one"
        check_replaceable(output, force, is_demo_folder(output), "a demo", not_ours)
    say = (lambda text: err.print(text)) if json_ else (lambda text: out.print(Rule(text, align="left", style="cyan")))
    say(f"building the demo in {output}")
    # Built beside the old folder and swapped in whole when done: a failed or killed run leaves the old one.
    with staged_folder(output, replace=True) as folder:
        # The demo types the real commands into this same command line (the root of the running one).
        cli = ctx.find_root().command.main
        result = run_demo(folder, cli, steps_scale, say, json_output=json_)
    result = {**result, "report": str(output / result["report"]), "plot": str(output / result["plot"])}
    check_learned(result)
    if json_:
        print_json(result)
        return
    kinds = list(result["scores"]["chance"]["accuracy"])
    table = Table("model", *kinds, "overall", title="held-out accuracy")
    for name, scores in result["scores"].items():
        cells = (f"{scores['accuracy'][kind]:.0%}" if kind in scores["accuracy"] else "-" for kind in kinds)
        table.add_row(name, *cells, f"{scores['overall']:.0%}")
    out.print(table)
    out.print(f"report: {result['report']}  loss curves: {result['plot']}  ({result['seconds']:.0f} s)")
