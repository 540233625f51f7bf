"""`dpa chat MODEL`: a multi-turn conversation on the terminal; `/image PATH` adds an image to the next message."""

from __future__ import annotations

import sys

from rich.markup import escape

from dpa_cli.cli.generate_cmd import DeviceOpt, MaxNewTokensOpt, RunModelArg, StageOpt, TemperatureOpt, _write, describe
from dpa_cli.cli.options import TrustRemoteCodeFlag
from dpa_cli.cli.render import err
from dpa_cli.errors import BadInputError

COMMANDS = "/image PATH adds an image to your next message, /reset starts over, /exit ends"


def chat(
    model: RunModelArg,
    max_new_tokens: MaxNewTokensOpt = 256,
    temperature: TemperatureOpt = 0.0,
    device: DeviceOpt = None,
    stage: StageOpt = None,
    trust_remote_code: TrustRemoteCodeFlag = False,
) -> None:
    """Chat with the model: each reply streams as it is decoded, and the conversation is kept.

    Type a message and press Enter. /image PATH adds an image to your next message (repeat for several).

    /reset forgets the conversation; /exit (or Ctrl-D) ends it. Lines can also be piped in.

    Examples:
      dpa chat ws
      dpa chat ws/export --device cuda
      printf '/image cat.jpg\\nWhat is this?\\n' | dpa chat ws
    """
    from dpa_cli.generate import ChatSession, open_runnable

    session = ChatSession(open_runnable(model, stage, device, trust_remote_code), max_new_tokens, temperature)
    err.print(f"[dim]{describe(session.runnable)}[/]\n{COMMANDS}")
    while (line := _read()) is not None:
        if not line:
            continue
        if line.startswith("/"):
            if not _command(session, line):
                break
            continue
        waiting = len(session.pending)
        try:
            session.ask(line, on_text=_write)
        except BadInputError as exc:  # the turn is refused, the conversation goes on
            _say_error(exc, f"{waiting} waiting image(s) dropped" if waiting else None)
            continue
        sys.stdout.write("\n")


def _read() -> str | None:
    """The next line typed (or piped), stripped; None at the end of input."""
    err.print("[bold]>[/] ", end="")
    line = sys.stdin.readline()
    return line.strip() if line else None


def _command(session, line: str) -> bool:
    """Run one /command; False ends the chat. A bad image is reported and the chat goes on."""
    name, _, argument = line.partition(" ")
    if name in ("/exit", "/quit"):
        return False
    if name == "/image" and argument.strip():
        try:
            session.add_image(argument.strip())
        except BadInputError as exc:
            _say_error(exc)
            return True
        err.print(f"image added to your next message ({len(session.pending)} waiting)")
    elif name == "/reset":
        session.reset()
        err.print("conversation cleared")
    else:
        err.print(f"unknown command {line!r}: {COMMANDS}", markup=False)
    return True


def _say_error(exc: BadInputError, note: str | None = None) -> None:
    """One `error:` line (the message is the user's text: never read as markup), the chat goes on."""
    err.print(f"[bold red]error:[/] {escape(exc.message)}" + (f" ({note})" if note else ""), highlight=False)
