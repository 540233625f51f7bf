"""One encoded sample shown as a person should see it: the prompt dimmed, what is learned highlighted, image
slots folded into one tag each. `dpa data check` and `dpa train` print it before anything else."""

from __future__ import annotations

from typing import Any

from dpa_cli.data.encode import IGNORE_INDEX

STYLES = {"prompt": "dim", "supervised": "bold black on green", "image": "bold magenta"}


def _ids(value: Any) -> list[int]:
    return value.tolist() if hasattr(value, "tolist") else list(value)


def supervised_segments(processor: Any, features: dict[str, Any]) -> list[tuple[str, str]]:
    """The sample's target sequence as (text, kind) runs, kind `prompt`, `supervised` or `image`."""
    ids, labels = _ids(features["input_ids"]), _ids(features["labels"])
    runs: list[tuple[str, list[int]]] = []
    for token_id, label in zip(ids, labels):
        kind = "prompt" if label == IGNORE_INDEX else "supervised"
        kind = "image" if token_id == processor.image_token_id else kind
        if runs and runs[-1][0] == kind:
            runs[-1][1].append(token_id)
        else:
            runs.append((kind, [token_id]))
    decode = processor.tokenizer.decode
    return [(f"<image x{len(run)}>" if kind == "image" else decode(run), kind) for kind, run in runs]


def render_segments(segments: list, title: str, max_chars: int = 4000) -> Any:
    """A rich panel of (text, kind) segments: what is learned highlighted, the prompt dimmed."""
    from rich.panel import Panel
    from rich.text import Text

    text, shown = Text(), 0
    for segment, kind in segments:
        if shown + len(segment) > max_chars:
            text.append(segment[: max(0, max_chars - shown)], style=STYLES[kind])
            text.append(" ...", style="italic")
            break
        text.append(segment, style=STYLES[kind])
        shown += len(segment)
    legend = Text.assemble(("learned", STYLES["supervised"]), "  ", ("masked prompt", STYLES["prompt"]), "  ",
                           ("image slots", STYLES["image"]))  # fmt: skip
    # The title quotes a sample id from the data: plain Text, so brackets in it are not read as markup.
    return Panel(text, title=Text(title), title_align="left", subtitle=legend, subtitle_align="right")


def render_supervised(processor: Any, features: dict[str, Any], max_chars: int = 4000) -> Any:
    """A rich renderable of one encoded sample with its supervised span highlighted (see `supervised_segments`)."""
    labels = _ids(features["labels"])
    learned = sum(1 for label in labels if label != IGNORE_INDEX)
    title = f"sample {features.get('sample_id', '?')}: {learned} of {len(labels)} tokens learned"
    return render_segments(supervised_segments(processor, features), title, max_chars)
