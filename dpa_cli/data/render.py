"""One encoded sample shown as a person should see it: the prompt dimmed, what is learned highlighted, image
slots folded into one tag each; and what the perceiver reads for each image, its feature positions highlighted.
`dpa data check` and `dpa train` print it before anything else."""

from __future__ import annotations

from typing import Any

from dpa_cli.data.encode import IGNORE_INDEX

STYLES = {"prompt": "dim", "supervised": "bold black on green", "image": "bold magenta"}


def _ids(value: Any) -> list[int]:
    return value.tolist() if hasattr(value, "tolist") else list(value)


def _runs(tokens: list[tuple[int, str]], tokenizer: Any, folded: int) -> list[tuple[str, str]]:
    """(token id, kind) pairs as (text, kind) runs; a run of `folded` tokens becomes one `<image xN>` tag."""
    runs: list[tuple[str, bool, list[int]]] = []
    for token_id, kind in tokens:
        key = (kind, token_id == folded)
        if runs and runs[-1][:2] == key:
            runs[-1][2].append(token_id)
        else:
            runs.append((*key, [token_id]))
    return [(f"<image x{len(run)}>" if fold else tokenizer.decode(run), kind) for kind, fold, run in runs]


def supervised_segments(processor: Any, features: dict[str, Any]) -> list[tuple[str, str]]:
    """The sample's target sequence as (text, kind) runs, kind `prompt`, `supervised` or `image` (its image slots:
    the image tokens, folded, and the markers when the features fill them too)."""
    slots = set(getattr(processor, "image_slot_token_ids", [processor.image_token_id]))
    tokens = [
        (token_id, "image" if token_id in slots else "prompt" if label == IGNORE_INDEX else "supervised")
        for token_id, label in zip(_ids(features["input_ids"]), _ids(features["labels"]))
    ]
    return _runs(tokens, processor.tokenizer, processor.image_token_id)


def perceiver_segments(processor: Any, features: dict[str, Any]) -> list[list[tuple[str, str]]]:
    """Per image, the perceiver sequence it is encoded in as (text, kind) runs: `image` where the model takes
    features (image tokens folded), `prompt` for the text around them; padding left out."""
    if "perceiver_input_ids" not in features:
        return []
    ids, mask = features["perceiver_input_ids"], features["perceiver_attention_mask"]
    feature = processor.feature_mask(ids, mask)
    images = []
    for row, keep, taken in zip(_ids(ids), _ids(mask), _ids(feature)):
        tokens = [(token_id, "image" if f else "prompt") for token_id, k, f in zip(row, keep, taken) if k]
        images.append(_runs(tokens, processor.perceiver_tokenizer, processor.perceiver_image_token_id))
    return images


TARGET_LEGEND = (("learned", "supervised"), ("masked prompt", "prompt"), ("image slots", "image"))


def render_segments(segments: list, title: str, max_chars: int = 4000, legend: tuple = TARGET_LEGEND) -> Any:
    """A rich panel of (text, kind) segments: what is learned highlighted, the prompt dimmed; `legend` names
    the kinds shown, as (words, kind) pairs."""
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
    key = Text("  ").join(Text(words, style=STYLES[kind]) for words, kind in legend)
    # The title quotes a sample id from the data: plain Text, so brackets in it are not read as markup.
    return Panel(text, title=Text(title), title_align="left", subtitle=key, subtitle_align="right")


def render_supervised(processor: Any, features: dict[str, Any], max_chars: int = 4000) -> Any:
    """A rich renderable of one encoded sample with its supervised span highlighted (see `supervised_segments`)."""
    labels = _ids(features["labels"])
    learned = sum(1 for label in labels if label != IGNORE_INDEX)
    title = f"sample {features.get('sample_id', '?')}: {learned} of {len(labels)} tokens learned"
    return render_segments(supervised_segments(processor, features), title, max_chars)
