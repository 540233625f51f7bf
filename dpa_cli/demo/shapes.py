"""The demo's dataset: pictures of 1-3 identical shapes on a plain background, deterministic from a seed.

Written in the LLaVA JSON format with image files, so it doubles as an example of the format: stage-1
captions ("two red circles."), stage-2 instructions (colour / shape / count questions, some multi-turn,
some text-only), and a held-out set of questions the finished model is scored on.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageDraw

COLOURS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (50, 80, 220), "yellow": (230, 200, 30)}
SHAPES = ("circle", "square", "triangle")
COUNTS = {1: "one", 2: "two", 3: "three"}
QUESTIONS = {
    "colour": "What colour are the shapes?",
    "shape": "What kind of shape is in the picture?",
    "count": "How many shapes are there?",
}
CHANCE = {"colour": 1 / len(COLOURS), "shape": 1 / len(SHAPES), "count": 1 / len(COUNTS)}
TEXT_ONLY = [
    ("Which colours can the shapes have?", "red, green, blue or yellow."),
    ("Which shapes can appear?", "circles, squares or triangles."),
    ("How many shapes can a picture hold?", "one, two or three."),
]
SIZE = 56  # pixels; the demo ViT sees 28-pixel tiles of it, in 14-pixel patches
CELL, CELLS, SHAPE = 14, 4, 11
# One plain background: before the LLM learns where to look it averages over all image tokens, and a
# constant background leaves shape and count as clean directions in that average.
BACKGROUND = (235, 235, 235)


@dataclass(frozen=True)
class Scene:
    colour: str
    shape: str
    count: int
    positions: tuple[tuple[int, int], ...]

    def answer(self, kind: str) -> str:
        return {"colour": self.colour, "shape": self.shape, "count": COUNTS[self.count]}[kind]

    def caption(self) -> str:
        plural = "s" if self.count > 1 else ""
        return f"{COUNTS[self.count]} {self.colour} {self.shape}{plural}."


def random_scene(rng: random.Random) -> Scene:
    # One shape per 14-pixel cell of a 4x4 grid: each sits inside one ViT patch, which a small random ViT
    # learns to tell apart in a few hundred steps (shapes straddling patches take far longer).
    count = rng.randint(1, 3)
    cells = rng.sample([(x, y) for x in range(CELLS) for y in range(CELLS)], count)
    positions = tuple((CELL * x + rng.randint(0, 2), CELL * y + rng.randint(0, 2)) for x, y in cells)
    return Scene(rng.choice(list(COLOURS)), rng.choice(SHAPES), count, positions)


def draw(scene: Scene) -> Image.Image:
    image = Image.new("RGB", (SIZE, SIZE), BACKGROUND)
    pen = ImageDraw.Draw(image)
    fill = COLOURS[scene.colour]
    for x, y in scene.positions:
        box = (x, y, x + SHAPE, y + SHAPE)
        if scene.shape == "circle":
            pen.ellipse(box, fill=fill)
        elif scene.shape == "square":
            pen.rectangle(box, fill=fill)
        else:
            pen.polygon([(x + SHAPE // 2, y), (x, y + SHAPE), (x + SHAPE, y + SHAPE)], fill=fill)
    return image


def _turns(pairs: list[tuple[str, str]], image: bool) -> list[dict[str, str]]:
    turns = []
    for i, (question, answer) in enumerate(pairs):
        prefix = "<image>\n" if image and i == 0 else ""
        turns += [{"from": "human", "value": prefix + question}, {"from": "gpt", "value": answer}]
    return turns


def write_dataset(folder: Path, train: int, heldout: int, seed: int = 0) -> dict[str, Path]:
    """Images + captions.json + instruct.json (training) + heldout.json (scored); returns the files."""
    rng = random.Random(seed)
    images = Path(folder) / "images"
    images.mkdir(parents=True, exist_ok=True)
    captions, instruct, scored = [], [], []
    for i in range(train + heldout):
        scene, name = random_scene(rng), f"{i:05d}.png"
        draw(scene).save(images / name)
        if i >= train:
            scored += [
                {
                    "id": f"held-{i}-{kind}",
                    "image": name,
                    "kind": kind,
                    "question": question,
                    "answer": scene.answer(kind),
                }
                for kind, question in QUESTIONS.items()
            ]
            continue
        captions.append(
            {"id": f"cap-{i}", "image": name, "conversations": _turns([("Describe the image.", scene.caption())], True)}
        )
        kinds = rng.sample(list(QUESTIONS), rng.choice((1, 2)))  # some conversations are multi-turn
        pairs = [(QUESTIONS[kind], scene.answer(kind) + ".") for kind in kinds]
        instruct.append({"id": f"ins-{i}", "image": name, "conversations": _turns(pairs, True)})
        if rng.random() < 0.05:
            instruct.append({"id": f"txt-{i}", "conversations": _turns([rng.choice(TEXT_ONLY)], False)})
    files = {"captions": "captions.json", "instruct": "instruct.json", "heldout": "heldout.json"}
    for data, key in ((captions, "captions"), (instruct, "instruct"), (scored, "heldout")):
        (Path(folder) / files[key]).write_text(json.dumps(data, indent=1) + "\n")
    return {key: Path(folder) / name for key, name in files.items()} | {"images": images}


def corpus() -> tuple[str, ...]:
    """Every word the demo's conversations use, for training its tokenizer (so answers are few tokens)."""
    words = [
        *COLOURS,
        *SHAPES,
        *(s + "s" for s in SHAPES),
        *COUNTS.values(),
        *QUESTIONS.values(),
        "Describe the image.",
    ]
    return tuple(words + [q + " " + a for q, a in TEXT_ONLY])
