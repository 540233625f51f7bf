"""`dpa generate MODEL --image IMG --prompt TEXT`: one answer, streamed as it is decoded (or as JSON)."""

from __future__ import annotations

import sys
from typing import Annotated

import typer

from dpa_cli.cli.options import JsonFlag, TrustRemoteCodeFlag
from dpa_cli.cli.render import err, print_json

RunModelArg = Annotated[
    str,
    typer.Argument(
        help="A workspace (its latest stage, LoRA unmerged), a stage folder, an export, or a model folder / repo id.",
        show_default=False,
    ),
]
StageOpt = Annotated[
    int | None,
    typer.Option("--stage", help="With a workspace: run stage 1 or 2 \\[default: the latest].", show_default=False),
]
DeviceOpt = Annotated[
    str | None, typer.Option("--device", help="cpu or cuda \\[default: cuda when present].", show_default=False)
]
MaxNewTokensOpt = Annotated[int, typer.Option("--max-new-tokens", min=1, help="Stop after this many new tokens.")]
TemperatureOpt = Annotated[
    float,
    typer.Option("--temperature", min=0.0, help="0 decodes greedily (the same tokens every run); above 0 samples."),
]


def describe(runnable) -> str:
    """Which model runs, for the line printed before its answer."""
    source = runnable.source
    what = [source.name] if source.name != "folder" else []
    what += ["LoRA adapter applied unmerged"] if source.adapter_dir else []
    detail = " (" + ", ".join(what) + ")" if what else ""
    return f"{source.model_dir}{detail} on {runnable.device}"


def generate(
    model: RunModelArg,
    prompt: Annotated[str, typer.Option("--prompt", "-p", help="The user's message.", show_default=False)],
    # str, not Path: Path would turn `https://x` into `https:/x`, hiding that a URL was given.
    image: Annotated[
        list[str] | None,
        typer.Option("--image", "-i", help="An image file; repeat for several (in order).", show_default=False),
    ] = None,
    max_new_tokens: MaxNewTokensOpt = 256,
    temperature: TemperatureOpt = 0.0,
    device: DeviceOpt = None,
    stage: StageOpt = None,
    trust_remote_code: TrustRemoteCodeFlag = False,
    json_: JsonFlag = False,
) -> None:
    """Answer one prompt about one or more images, through the model's chat template.

    Works on a workspace (the newest stage as trained), a stage folder, an export, or any DPA checkpoint.

    Examples:
      dpa generate ws --image cat.jpg --prompt "What is in this picture?"
      dpa generate ws/export -i a.png -i b.png -p "What changed?" --device cuda
      dpa generate ws --stage 1 -i cat.jpg -p "Describe it." --json
    """
    from dpa_cli.generate import open_image, open_runnable, processor_inputs, reply, user_turn

    images = [open_image(path) for path in image or []]  # a bad image is named before the model loads
    runnable = open_runnable(model, stage, device, trust_remote_code)
    messages = [user_turn(prompt, images)]
    processor_inputs(runnable.processor, messages)  # a refused prompt is the first line on stderr, not the second
    if json_:
        result = reply(runnable, messages, max_new_tokens, temperature)
        print_json(
            {
                **result,
                "model": str(runnable.source.model_dir),
                "stage": runnable.source.name,
                "adapter": str(runnable.source.adapter_dir) if runnable.source.adapter_dir else None,
                "device": runnable.device,
            }
        )
        return
    err.print(f"[dim]{describe(runnable)}[/]")
    reply(runnable, messages, max_new_tokens, temperature, on_text=_write)
    sys.stdout.write("\n")


def _write(text: str) -> None:
    """Streamed model text goes to stdout as is (no markup: the model may write [brackets])."""
    sys.stdout.write(text)
    sys.stdout.flush()
