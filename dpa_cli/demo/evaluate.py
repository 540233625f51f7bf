"""Held-out accuracy: ask the finished model each held-out question and compare its first word."""

from __future__ import annotations

import json
import re
from collections import defaultdict
from pathlib import Path
from typing import Any

from dpa_cli.demo.shapes import CHANCE


def first_word(text: str) -> str:
    match = re.search(r"[a-z]+", text.lower())
    return match.group(0) if match else ""


def score(model_dir: Path, heldout: Path, image_root: Path) -> dict[str, Any]:
    """Accuracy per question kind and overall, with every answer the model gave (greedy decoding)."""
    from dpa_cli.generate import open_image, open_runnable, reply, user_turn

    runnable = open_runnable(str(model_dir), device="cpu")
    right: dict[str, list[bool]] = defaultdict(list)
    answers = []
    for item in json.loads(Path(heldout).read_text()):
        image = open_image(Path(image_root) / item["image"])
        text = reply(runnable, [user_turn(item["question"], [image])], max_new_tokens=4)["text"]
        right[item["kind"]].append(first_word(text) == item["answer"])
        answers.append({**item, "reply": text})
    by_kind = {kind: sum(hits) / len(hits) for kind, hits in right.items()}
    overall = sum(sum(hits) for hits in right.values()) / sum(len(hits) for hits in right.values())
    return {"accuracy": by_kind, "overall": overall, "answers": answers}


def chance(heldout: list[dict[str, Any]]) -> dict[str, Any]:
    """Guessing uniformly among each question's possible answers, weighted like the held-out questions."""
    kinds = [item["kind"] for item in heldout]
    return {
        "accuracy": {kind: CHANCE[kind] for kind in dict.fromkeys(kinds)},
        "overall": sum(CHANCE[kind] for kind in kinds) / len(kinds),
    }
