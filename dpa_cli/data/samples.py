"""Samples in one shape, whatever the file format: an id, image references and a chat in transformers' format.

LLaVA records (`from: human|gpt`, `<image>` markers in the text) and Hugging Face rows (`messages` in the
OpenAI / transformers chat format, or LLaVA-style `conversations`) both become a `Sample`. Conversion never
raises for a malformed record: what is wrong is kept in `Sample.problems`, so `dpa data check` can list every
bad sample and training can skip or refuse it by name. Image values of any shape become `ImageRef`s through
`dpa_cli.data.image_refs`, the one resolver every consumer shares.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dpa_cli.data.image_refs import VIDEO_BLOCKS, VIDEO_FIX, ImageRef, image_refs
from dpa_cli.errors import BadInputError

IMAGE_MARKER = "<image>"  # LLaVA's marker in the data, whatever the target's own image token is
VIDEO_MARKER = "<video>"  # LLaVA-Video / ms-swift / LLaMA-Factory write it where a video goes
VIDEO_KEYS = ("video", "videos")  # ShareGPT (LLaMA-Factory) and ms-swift rows
ROLES = {
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "model": "assistant",
    "system": "system",
}


class BadSampleError(BadInputError):
    """One sample cannot be trained on. `kind` is a problem kind of `dpa data check` (see PROBLEMS)."""

    def __init__(self, sample_id: str | None, kind: str, message: str, hint: str | None = None):
        where = f"sample {sample_id}: " if sample_id is not None else ""
        super().__init__(f"{where}{message}", hint=hint)
        self.sample_id = sample_id
        self.kind = kind
        self.detail = message


@dataclass
class Sample:
    """One training sample. `messages` are in transformers' chat format: `{"role": "system"|"user"|"assistant",
    "content": [{"type": "image"} | {"type": "text", "text": ...}]}`; image blocks are in reading order and
    match `images` one to one (when the data is right)."""

    id: str
    images: list[ImageRef]
    messages: list[dict]
    index: int = -1
    problems: list[tuple[str, str]] = field(default_factory=list)  # (kind, message) found while converting


def text_blocks(text: str) -> list[dict]:
    """`"<image>\\nWhat is it?"` -> `[{"type": "image"}, {"type": "text", "text": "What is it?"}]`.

    The newline LLaVA data writes next to a marker belongs to the marker (chat templates add their own).
    """
    parts = text.split(IMAGE_MARKER)
    blocks: list[dict] = []
    for i, part in enumerate(parts):
        if i > 0:
            blocks.append({"type": "image"})
            part = part[1:] if part.startswith("\n") else part
        if i < len(parts) - 1:
            part = part[:-1] if part.endswith("\n") else part
        if part.strip():
            blocks.append({"type": "text", "text": part})
    return blocks


def message_text(message: dict) -> str:
    """The text of a message's text blocks, joined by newlines (the perceiver text of early fusion)."""
    return "\n".join(b["text"] for b in message.get("content", []) if b.get("type") == "text")


def image_blocks(message: dict) -> int:
    return sum(1 for b in message.get("content", []) if b.get("type") == "image")


def _sample_id(record: dict, index: int) -> str:
    value = record.get("id")
    return str(value) if value is not None and str(value) != "" else f"#{index}"


def from_llava(record: Any, index: int, root: Path | None) -> Sample:
    """A LLaVA record: `{"id", "image": path | [paths], "conversations": [{"from", "value"}, ...]}`."""
    if not isinstance(record, dict):
        return Sample(
            f"#{index}", [], [], index, [("bad_record", f"a sample is a JSON {type(record).__name__}, not an object")]
        )
    conversation = record.get("conversations")
    if conversation is None and "messages" in record:
        return from_chat(record, index, root)
    problems = video_problems(record, conversation, index)
    images = image_refs(record.get("image", record.get("images")), root)
    if not isinstance(conversation, list):
        problems.append(("bad_record", "no `conversations` list"))
        conversation = []
    messages = []
    for turn_index, turn in enumerate(conversation):
        role = ROLES.get(str(turn.get("from", turn.get("role", ""))).lower()) if isinstance(turn, dict) else None
        value = turn.get("value", turn.get("content")) if isinstance(turn, dict) else None
        if role is None or not isinstance(value, str):
            problems.append(
                ("bad_record", f"conversations[{turn_index}] needs `from` (human|gpt|system) and a string `value`")
            )
            continue
        messages.append({"role": role, "content": text_blocks(value)})
    return Sample(_sample_id(record, index), images, with_system(record, messages, problems), index, problems)


def _chat_blocks(content: Any) -> list[dict] | None:
    """transformers content (a string, or a list of blocks) as blocks; None when it is neither."""
    if isinstance(content, str):
        return text_blocks(content)
    if not isinstance(content, list):
        return None
    blocks = []
    for block in content:
        kind = block.get("type") if isinstance(block, dict) else None
        if kind == "image":
            blocks.append({"type": "image"})
        elif kind == "text" and isinstance(block.get("text"), str):
            blocks.extend(text_blocks(block["text"]))
        else:
            return None
    return blocks


def from_chat(record: dict, index: int, root: Path | None) -> Sample:
    """A chat row: `{"id"?, "images" | "image", "messages": [{"role", "content"}, ...]}`."""
    if "messages" not in record and "conversations" in record:
        return from_llava(record, index, root)
    problems = video_problems(record, record.get("messages"), index)
    video = bool(problems)
    images = image_refs(record.get("images", record.get("image")), root)
    raw = record.get("messages")
    if not isinstance(raw, list):
        problems.append(("bad_record", "no `messages` list"))
        raw = []
    messages = []
    for turn_index, message in enumerate(raw):
        role = ROLES.get(str(message.get("role", "")).lower()) if isinstance(message, dict) else None
        blocks = _chat_blocks(message.get("content")) if isinstance(message, dict) else None
        if role is None or blocks is None:
            if blocks is None and video:  # a video block: the video is the sample's problem, said once
                continue
            problems.append(
                (
                    "bad_record",
                    f"messages[{turn_index}] needs a role (system|user|assistant) and "
                    "content (a string or a list of image/text blocks)",
                )
            )
            continue
        messages.append({"role": role, "content": blocks})
    return Sample(_sample_id(record, index), images, with_system(record, messages, problems), index, problems)


def video_problems(record: dict, turns: Any, index: int) -> list[tuple[str, str]]:
    """A video sample, however it is written (a `video` / `videos` entry, a `<video>` marker, a video content
    block): named with the sample's index, never trained as text with a literal marker."""
    where = f"sample #{index} is a video sample"
    for key in VIDEO_KEYS:
        if record.get(key) not in (None, "", [], ()):
            return [("video_sample", f"{where} (its `{key}` entry): {VIDEO_FIX}")]
    for turn_index, turn in enumerate(turns if isinstance(turns, list) else []):
        value = turn.get("value", turn.get("content")) if isinstance(turn, dict) else None
        blocks = value if isinstance(value, list) else [{"type": "text", "text": value}]
        for block in blocks:
            kind = block.get("type") if isinstance(block, dict) else None
            text = block.get("text") if isinstance(block, dict) else None
            if kind in VIDEO_BLOCKS or (isinstance(text, str) and VIDEO_MARKER in text.lower()):
                what = f"a {VIDEO_MARKER} marker" if kind not in VIDEO_BLOCKS else f"a {kind} block"
                return [("video_sample", f"{where} ({what} in turn {turn_index}): {VIDEO_FIX}")]
    return []


def with_system(record: dict, messages: list[dict], problems: list[tuple[str, str]]) -> list[dict]:
    """A top-level `system` (ShareGPT, ms-swift) as the conversation's first turn, the template's system turn."""
    system = record.get("system")
    if system is None or system == "":
        return messages
    if not isinstance(system, str):
        problems.append(("bad_record", f"`system` is a {type(system).__name__}, not a string"))
    elif any(m["role"] == "system" for m in messages):
        problems.append(("bad_record", "a top-level `system` and a system turn in the conversation: keep one"))
    else:
        return [{"role": "system", "content": [{"type": "text", "text": system}]}, *messages]
    return messages


def structural_problems(sample: Sample) -> list[tuple[str, str]]:
    """What is wrong with a sample without reading an image or tokenizing: (kind, message) pairs."""
    problems = list(sample.problems)
    if not sample.messages:
        if not problems:
            problems.append(("empty_conversation", "the conversation is empty"))
        return problems
    markers = sum(image_blocks(m) for m in sample.messages)
    if any(m["role"] == "assistant" and image_blocks(m) for m in sample.messages):
        problems.append(("image_in_assistant", "an <image> marker is inside an assistant turn"))
    elif markers != len(sample.images):
        problems.append(("marker_mismatch", f"{markers} <image> marker(s) but {len(sample.images)} image(s)"))
    if not any(m["role"] == "assistant" and message_text(m).strip() for m in sample.messages):
        problems.append(("no_assistant", "no assistant turn with text: nothing to learn"))
    return problems
