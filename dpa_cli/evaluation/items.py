"""Evaluation items from local files: VQA / multiple-choice JSONL or JSON, MMLU-style CSV, or a datasets folder.

Field names follow the common benchmark exports: `question`, `answer` (a string, a list of strings, a letter or
an option index), `image` (any shape training data may use; a path is relative to --image-root and kept
inside it), `options` / `choices` (a list, or a dict by letter, or `A`..`D` columns, or inline "A. ..." lines in
the question), `id`, `category` / `subject`. An item that cannot be scored is a `BadInputError` naming the file
and the item.
"""

from __future__ import annotations

import csv
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dpa_cli.data.image_refs import ImageRef, image_refs
from dpa_cli.errors import BadInputError
from dpa_cli.evaluation.metrics import LETTERS, normalize_answer
from dpa_cli.jsonio import PARSE_ERRORS, parse_json, read_regular, reason

_INLINE_OPTION = re.compile(r"^\s*\(?([A-Z])[.):]\s*(.+?)\s*$")
_LETTER = re.compile(r"^\s*\(?([A-Z])\)?[.:]?\s*$")


@dataclass
class Item:
    id: str
    question: str  # without inline options (they are in `options`)
    answers: list[str]  # gold answers; for multiple choice the gold letter
    image: ImageRef | None = None
    options: list[str] = field(default_factory=list)
    category: str | None = None
    prompt: str | None = None  # the record's own prompt, sent as it is


def _first(record: dict, *names: str) -> Any:
    return next((record[name] for name in names if record.get(name) not in (None, "")), None)


def _image_ref(value: Any, root: Path) -> ImageRef | None:
    """The item's image (the first, when the record lists several), by the resolver training data uses."""
    refs = image_refs(value, root)
    return refs[0] if refs else None


class _ItemError(ValueError):
    """What is wrong with one item's fields; `to_item` names the file and the item."""


def _scalar(value: Any) -> bool:
    """Text or a number: what a question id, an answer or an option can be (a bool, list or object cannot)."""
    return isinstance(value, (str, int, float)) and not isinstance(value, bool)


def _shown(value: Any) -> str:
    text = json.dumps(value, default=str)
    return f"{type(value).__name__} {text[:40]}{'...' if len(text) > 40 else ''}"


def _options(record: dict, question: str) -> tuple[list[str], str]:
    """The options and the question without inline option lines."""
    value = _first(record, "options", "choices")
    if isinstance(value, str):
        try:
            value = parse_json(value)
        except PARSE_ERRORS:
            raise _ItemError("`options` is text, not a list of options (nor one written as JSON)") from None
    if isinstance(value, dict):
        value = [value[key] for key in sorted(value)]
    if value is not None and not (isinstance(value, list) and all(_scalar(option) for option in value)):
        raise _ItemError(f"`options` must be a list of texts, not {_shown(value)}")
    if value and len(value) > len(LETTERS):
        raise _ItemError(f"{len(value)} options, more than the {len(LETTERS)} letters A-{LETTERS[-1]}")
    if value:
        return [str(option) for option in value], question
    columns = [record[letter] for letter in LETTERS[:10] if record.get(letter) not in (None, "")]  # MMBench style
    if len(columns) >= 2:
        return [str(option) for option in columns], question
    lines, inline = question.splitlines(), []
    for line in lines:
        match = _INLINE_OPTION.match(line)
        if match and match.group(1) == LETTERS[len(inline)]:
            inline.append(match.group(2))
    if len(inline) < 2:
        return [], question
    kept = [
        line for line in lines if not (_INLINE_OPTION.match(line) and _INLINE_OPTION.match(line).group(2) in inline)
    ]
    return inline, "\n".join(kept).strip()


def _gold_letter(answer: Any, options: list[str]) -> str | None:
    """The gold option letter from a letter ("B", "(B)"), an option's text, or a 0-based option index."""
    if isinstance(answer, list):
        answer = answer[0] if answer else None
    if isinstance(answer, bool) or answer is None:
        return None
    if isinstance(answer, int):
        return LETTERS[answer] if 0 <= answer < len(options) else None
    match = _LETTER.match(str(answer))
    if match and match.group(1) in LETTERS[: len(options)]:
        return match.group(1)
    wanted = normalize_answer(str(answer))
    found = [letter for letter, option in zip(LETTERS, options) if normalize_answer(option) == wanted]
    if len(found) == 1:
        return found[0]
    return _gold_letter(int(answer), options) if str(answer).strip().isdigit() else None


def to_item(record: Any, index: int, root: Path, where: str) -> Item:
    if not isinstance(record, dict):
        raise BadInputError(f"{where}: item {index} is a JSON {type(record).__name__}, not an object")
    raw_id = _first(record, "id", "question_id", "index")
    item_id = str(raw_id or f"#{index}")
    try:
        return _item(record, item_id, raw_id, root, where)
    except _ItemError as err:
        raise BadInputError(f"{where}: item {item_id}: {err}", hint="fix the item or drop it") from None


def _item(record: dict, item_id: str, raw_id: Any, root: Path, where: str) -> Item:
    if raw_id is not None and not _scalar(raw_id):
        raise _ItemError(f"`id` must be text or a number, not {_shown(raw_id)}")
    question = _first(record, "question", "query", "text")
    if not isinstance(question, str):
        raise BadInputError(
            f"{where}: item {item_id} has no `question`", hint="each item needs `question` and `answer`"
        )
    answer = _first(record, "answer", "answers", "label")
    if answer is not None and not (_scalar(answer) or (isinstance(answer, list) and all(map(_scalar, answer)))):
        raise _ItemError(f"`answer` must be text, a number or a list of them, not {_shown(answer)}")
    options, question = _options(record, question)
    image = _image_ref(_first(record, "image", "image_path", "images"), root)
    category = _first(record, "category", "subject")
    item = Item(
        item_id, question, [], image, options, str(category) if category is not None else None, _first(record, "prompt")
    )
    if options:
        gold = _gold_letter(answer, options)
        if gold is None:
            raise BadInputError(
                f"{where}: item {item_id}: answer {answer!r} is neither an option letter "
                f"({LETTERS[0]}-{LETTERS[len(options) - 1]}), an option index nor an option's text"
            )
        item.answers = [gold]
    elif isinstance(answer, list) and answer:
        item.answers = [str(value) for value in answer]
    elif answer is not None:
        item.answers = [str(answer)]
    else:
        raise BadInputError(f"{where}: item {item_id} has no `answer`", hint="each item needs `question` and `answer`")
    return item


def _read_records(path: Path) -> list[Any]:
    if path.is_dir():
        return _read_dataset(path)
    try:
        text = read_regular(path).decode("utf-8-sig")
    except UnicodeDecodeError as err:
        raise BadInputError(f"{path}: {reason(err)}") from None
    except OSError as err:
        raise BadInputError(f"{path}: cannot read it ({err.strerror or err})") from None
    if path.suffix.lower() == ".csv":
        try:
            return _read_csv(text)
        except _ItemError as err:
            raise BadInputError(f"{path}: {err}") from None
    if path.suffix.lower() not in (".jsonl", ".ndjson") and text.lstrip().startswith("["):
        try:
            return parse_json(text, max_depth=None)
        except PARSE_ERRORS as err:
            raise BadInputError(f"{path}: {reason(err)}") from None
    rows = []
    for number, line in enumerate(text.splitlines(), 1):
        try:
            rows += [parse_json(line, max_depth=None)] if line.strip() else []
        except PARSE_ERRORS as err:
            raise BadInputError(f"{path}: line {number}: {reason(err)}", hint="one JSON object per line") from None
    return rows


def _read_csv(text: str) -> list[dict]:
    """MMLU's own CSV: question, A, B, C, D, answer, no header (a header row with these names is fine too)."""
    rows = [row for row in csv.reader(text.splitlines()) if row]
    if rows and rows[0][0].strip().lower() == "question":
        names = [name.strip() for name in rows[0]]
        return [dict(zip(names, row)) for row in rows[1:]]
    for number, row in enumerate(rows, 1):
        if not 4 <= len(row) <= len(LETTERS) + 2:
            raise _ItemError(
                f"CSV row {number} has {len(row)} columns; MMLU's CSV is question, 2 or more options, answer"
            )
    letters = lambda row: LETTERS[: len(row) - 2]  # noqa: E731
    return [{"question": row[0], **dict(zip(letters(row), row[1:-1])), "answer": row[-1]} for row in rows]


def _read_dataset(path: Path) -> list[dict]:
    try:
        import datasets
    except ImportError:
        raise BadInputError(
            f"{path}: a folder needs the `datasets` package to read",
            hint="pip install datasets, or export the items as JSONL",
        ) from None
    try:
        loaded = datasets.load_from_disk(str(path))
    except MemoryError:
        raise
    except Exception as err:  # noqa: BLE001  any loader failure on the user's folder (features of the wrong shape)
        said = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise BadInputError(f"{path}: not a folder saved with datasets' save_to_disk ({said})") from None
    if isinstance(loaded, datasets.DatasetDict):
        split = next((name for name in ("test", "validation", "train") if name in loaded), next(iter(loaded)))
        loaded = loaded[split]
    # Rows as stored: image cells stay {"bytes", "path"} for the resolver (datasets' own decoding would open
    # any stored path, even one outside --image-root).
    return loaded.with_format("arrow")[:].to_pylist()


def load_items(data: str | Path, image_root: str | Path | None = None, limit: int | None = None) -> list[Item]:
    from dpa_cli.data.formats import refuse_urls

    refuse_urls(data, image_root)
    path = Path(data).expanduser()
    if not path.exists():
        raise BadInputError(f"{path}: no such file or folder")
    root = Path(image_root).expanduser() if image_root is not None else (path if path.is_dir() else path.parent)
    records = _read_records(path)
    if not isinstance(records, list):
        raise BadInputError(f"{path}: the top level is not a list of items")
    items = [to_item(record, i, root, str(path)) for i, record in enumerate(records[:limit])]
    if not items:
        raise BadInputError(f"{path}: no items")
    ids = [item.id for item in items]
    if len(set(ids)) != len(ids):
        duplicate = next(i for i in ids if ids.count(i) > 1)
        raise BadInputError(f"{path}: item id {duplicate!r} appears more than once", hint="ids must be unique")
    return items
