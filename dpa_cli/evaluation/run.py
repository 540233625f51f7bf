"""`dpa eval`: score a model (and optionally the original beside it) on local VQA / multiple-choice items.

Items with options are scored by option letter: by default from the log-likelihood of each letter as the
answer's first token (the standard MMLU way, one forward pass), or with `scoring="generate"` from a greedy
reply parsed for its letter. Other items are answered greedily and scored by exact match or ANLS.
"""

from __future__ import annotations

import json
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from dpa_cli.checkpoint.atomic import write_text_atomic
from dpa_cli.errors import BadInputError
from dpa_cli.evaluation import batch as calls
from dpa_cli.evaluation.items import Item, load_items
from dpa_cli.evaluation.metrics import METRICS, anls, choice_score, exact_match, parse_choice

SCORINGS = ("loglik", "generate")
Progress = Callable[[str, int, int], None]  # (model role, items done, items in all)


def pick_metric(items: list[Item], metric: str | None) -> str:
    """`choice` when the items have options, else `exact`; a chosen metric must fit the items."""
    with_options = sum(bool(item.options) for item in items)
    if metric is None:
        return "choice" if with_options else "exact"
    if metric not in METRICS:
        raise BadInputError(f"--metric {metric!r} is not one of {', '.join(METRICS)}")
    if metric == "choice" and with_options < len(items):
        first = next(item for item in items if not item.options)
        raise BadInputError(
            f"--metric choice: item {first.id} has no options",
            hint="give each item `options` (or `choices`, or inline 'A. ...' lines)",
        )
    return metric


def score_text(metric: str, prediction: str, item: Item) -> tuple[float, str | None]:
    """(score, parsed letter) of one generated answer."""
    if metric == "choice":
        letter = parse_choice(prediction, item.options)
        return choice_score(letter, item.answers[0]), letter
    return (anls if metric == "anls" else exact_match)(prediction, item.answers), None


def _images(items: list[Item]) -> list[Any]:
    """Every item's image, decoded before a model loads, so a bad file is named first."""
    from dpa_cli.data.images import ImageError, load_image

    images = []
    for item in items:
        try:
            images.append(load_image(item.image)[0] if item.image is not None else None)
        except ImageError as err:
            raise BadInputError(f"item {item.id}: {err.message}", hint="fix the image or drop the item") from None
    return images


def _batches(count: int, images: list[Any], size: int) -> Iterator[list[int]]:
    """Consecutive item indices, `size` at a time, never mixing items with and without an image."""
    current: list[int] = []
    for index in range(count):
        if current and (len(current) == size or (images[current[0]] is None) != (images[index] is None)):
            yield current
            current = []
        current.append(index)
    if current:
        yield current


def predict(
    runnable: Any,
    items: list[Item],
    images: list[Any],
    metric: str,
    scoring: str,
    settings: dict,
    on_done: Callable[[int], None] | None = None,
) -> list[dict[str, Any]]:
    """One prediction row per item: the answer (or letter log-likelihoods) and its score."""
    rows: list[dict[str, Any]] = []
    for indices in _batches(len(items), images, settings["batch_size"]):
        chunk = [items[i] for i in indices]
        texts = [calls.prompt_text(item, settings["instruction"]) for item in chunk]
        pictures = [images[i] for i in indices]
        if metric == "choice" and scoring == "loglik":
            for item, logprobs in zip(
                chunk, calls.letter_logprobs(runnable, texts, pictures, [len(i.options) for i in chunk])
            ):
                letter = max(logprobs, key=logprobs.get)
                rows.append(_row(item, letter, choice_score(letter, item.answers[0]), letter, logprobs))
        else:
            answers = calls.generate_answers(runnable, texts, pictures, settings["max_new_tokens"])
            for item, answer in zip(chunk, answers):
                rows.append(_row(item, answer, *score_text(metric, answer, item)))
        if on_done:
            on_done(len(rows))
    return rows


def _row(item: Item, prediction: str, score: float, letter: str | None = None, logprobs: dict | None = None) -> dict:
    row = {
        "id": item.id,
        "question": item.question,
        "answers": item.answers,
        "prediction": prediction,
        "score": score,
        "category": item.category,
    }
    if item.options:
        row.update(options=item.options, choice=letter, logprobs=logprobs)
    return row


def summarise(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Mean score in percent, overall and per category (when the items name one)."""
    by_category: dict[str, list[float]] = defaultdict(list)
    for row in rows:
        if row["category"] is not None:
            by_category[row["category"]].append(row["score"])
    percent = lambda scores: round(100 * sum(scores) / len(scores), 2)  # noqa: E731
    return {
        "score": percent([row["score"] for row in rows]),
        "items": len(rows),
        "categories": {name: percent(scores) for name, scores in sorted(by_category.items())},
    }


def check_output(path: Path, force: bool) -> None:
    if path.is_dir():
        raise BadInputError(f"-o {path}: a folder", hint="pass a file name for the predictions, e.g. pred.jsonl")
    if path.exists() and not force:
        raise BadInputError(f"{path} exists", hint="pass --force to replace it, or another -o")


def evaluate(
    model: str,
    data: str | Path,
    output: Path,
    metric: str | None = None,
    scoring: str = "loglik",
    baseline: str | None = None,
    image_root: str | Path | None = None,
    limit: int | None = None,
    batch_size: int = 8,
    max_new_tokens: int = 32,
    instruction: str | None = None,
    device: str | None = None,
    force: bool = False,
    progress: Progress | None = None,
    allow_code: bool = False,
) -> dict[str, Any]:
    """Predictions of MODEL (and `baseline`) on every item, written as JSONL, and the scores. `allow_code`
    (--trust-remote-code) lets both models' folders run their own model code."""
    started = time.perf_counter()
    if scoring not in SCORINGS:
        raise BadInputError(f"--scoring {scoring!r} is not one of {', '.join(SCORINGS)}")
    check_output(Path(output), force)
    items = load_items(data, image_root, limit)
    metric = pick_metric(items, metric)
    scoring = scoring if metric == "choice" else "generate"
    images = _images(items)
    settings = {"batch_size": batch_size, "max_new_tokens": max_new_tokens, "instruction": instruction}
    models, lines = [], []
    from dpa_cli.generate import check_runnable

    specs = [("model", model), *([("baseline", baseline)] if baseline else [])]
    for _, spec in specs:  # a model the trust gate refuses is named before the first one works
        check_runnable(spec, allow_code)
    for role, spec in specs:
        runnable = calls.open_model(spec, device, allow_code)
        done = (lambda n, role=role: progress(role, n, len(items))) if progress else None
        rows = predict(runnable, items, images, metric, scoring, settings, done)
        lines += [json.dumps({"model": role, **row}, ensure_ascii=False) for row in rows]
        models.append({"role": role, "path": str(runnable.source.model_dir), **summarise(rows)})
        del runnable
    Path(output).parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(Path(output), "\n".join(lines) + "\n")
    return {
        "metric": metric,
        "scoring": scoring,
        "data": str(data),
        "items": len(items),
        "models": models,
        "predictions": str(output),
        "seconds": round(time.perf_counter() - started, 3),
    }
