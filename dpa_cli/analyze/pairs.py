"""Image-text pairs for the analysis: the first samples of a dataset that hold images, decoded up front.

A pair is one sample's whole conversation with its images in place, in transformers' chat format, so it is
rendered by the model's own chat template exactly as training renders it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dpa_cli.errors import BadInputError

FIX_HINT = "find every bad sample with `dpa data check DATA --image-root DIR`"


@dataclass(frozen=True)
class Pair:
    id: str
    messages: list[dict[str, Any]]  # images in place: {"type": "image", "image": PIL image}


def _with_images(messages: list[dict], images: list[Any]) -> list[dict]:
    left = iter(images)
    filled = []
    for message in messages:
        content = [{"type": "image", "image": next(left)} if b["type"] == "image" else b for b in message["content"]]
        filled.append({"role": message["role"], "content": content})
    return filled


def load_pairs(data: str | Path, image_root: str | Path | None = None, limit: int = 32) -> list[Pair]:
    """The first `limit` samples of `data` with at least one image (text-only samples are passed over)."""
    from dpa_cli.data.formats import open_samples
    from dpa_cli.data.images import ImageError, load_image
    from dpa_cli.data.samples import structural_problems

    pairs: list[Pair] = []
    for sample in open_samples(data, image_root, streaming=True):
        if not sample.images:
            continue
        problems = [p for p in structural_problems(sample) if p[0] != "no_assistant"]  # a question alone is text
        if problems:
            raise BadInputError(f"{data}: sample {sample.id}: {problems[0][1]}", hint=FIX_HINT)
        try:
            images = [load_image(ref)[0] for ref in sample.images]
        except ImageError as err:
            raise BadInputError(f"{data}: sample {sample.id}: {err.message}", hint=FIX_HINT) from None
        pairs.append(Pair(sample.id, _with_images(sample.messages, images)))
        if len(pairs) == limit:
            break
    if not pairs:
        raise BadInputError(f"{data}: no sample with an image", hint="the analysis needs image-text pairs")
    return pairs


def pair_inputs(processor: Any, messages: list[dict[str, Any]]) -> Any:
    """Model inputs for a whole conversation (answers included, no generation prompt)."""
    from dpa_cli.generate import build_inputs

    if processor.chat_template:
        return processor.apply_chat_template(
            messages, add_generation_prompt=False, tokenize=True, return_dict=True, return_tensors="pt"
        )
    # No template: one user turn holding the images and all the text, as `dpa generate` would send it.
    images = [b["image"] for m in messages for b in m["content"] if b["type"] == "image"]
    text = "\n".join(b["text"] for m in messages for b in m["content"] if b["type"] == "text")
    return build_inputs(
        processor,
        [
            {
                "role": "user",
                "content": [*({"type": "image", "image": i} for i in images), {"type": "text", "text": text}],
            }
        ],
    )
