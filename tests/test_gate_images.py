"""Gate 1 of issue 14: one resolver for every image reference, one gate before any image is read.

The bad references are generated: ways to reach a file outside --image-root (absolute, `..`, `~`, `file:`,
Windows, percent-encoded, symlinked file or folder) crossed with every shape data may give them (string, list,
`{"path"}`, `{"bytes": None, "path"}`, chat / OpenAI blocks); URLs and videos crossed with the same shapes; and
junk (numbers, nested lists, base64 text, control characters, overlong paths, broken `data:` URIs). Each
consumer (data check, train, eval, analyze, generate, chat) must refuse each by kind with one line naming the
sample and the reference, before any model is loaded, writing nothing. The file outside the root is a valid
image, so only a refusal tells it apart, and an audit hook proves it is never opened.
"""

from __future__ import annotations

import base64
import functools
import io
import json
import os
import re
import shutil
import sys
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from PIL import Image
from typer.testing import CliRunner

from dpa_cli.cli.app import app
from dpa_cli.data import image_refs as refs_module
from dpa_cli.data.check import PROBLEMS
from dpa_cli.data.image_refs import ImageError, check_ref, image_refs
from tests.fixtures.data import noise_bytes
from tests.test_bad_inputs import png_claiming, tree_hash

runner = CliRunner()
QUESTION = [{"from": "human", "value": "<image>\nWhat is it?"}, {"from": "gpt", "value": "A square."}]
GATE_KINDS = ("unsafe_image_path", "unsupported_image", "bad_image_ref", "image_too_large")

# --- a record of every file this process opens (the sentinel outside the root must never be among them) ------
_OPENED: list[str] | None = None


def _audit(event: str, args: tuple) -> None:
    if event == "open" and _OPENED is not None and args and isinstance(args[0], (str, bytes, os.PathLike)):
        _OPENED.append(os.fsdecode(args[0]))


sys.addaudithook(_audit)  # audit hooks cannot be removed: it records only inside `opens()`


@contextmanager
def opens() -> Iterator[list[str]]:
    global _OPENED
    _OPENED = []
    try:
        yield _OPENED
    finally:
        _OPENED = None


@pytest.fixture(scope="module", autouse=True)
def command_built_once() -> Iterator[None]:
    """typer rebuilds the click command on every invoke (~0.1 s here); the per-variant runs share one build."""
    import typer.testing

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(typer.testing, "_get_command", functools.lru_cache(maxsize=None)(typer.testing._get_command))
        yield


def png(size: tuple[int, int] = (32, 24)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, (200, 30, 30)).save(buffer, format="PNG")
    return buffer.getvalue()


# --- the sandbox: an image root, and outside it a valid image that must never be read ------------------------
@dataclass(frozen=True)
class Box:
    folder: Path
    root: Path
    secret: Path

    def outside_opened(self, opened: list[str]) -> list[str]:
        outside = os.path.realpath(self.secret.parent)
        return [path for path in opened if os.path.realpath(path).startswith(outside)]


@pytest.fixture(scope="module")
def box(tmp_path_factory) -> Box:
    folder = tmp_path_factory.mktemp("gate-images")
    root, outside = folder / "root", folder / "outside"
    (root / "sub").mkdir(parents=True)
    outside.mkdir()
    (root / "red.png").write_bytes(png())
    (root / "sub" / "blue.png").write_bytes(png((20, 30)))
    secret = outside / "secret.png"
    secret.write_bytes(png())  # readable: were it read, the sample would pass
    os.symlink(secret, root / "escape.png")
    os.symlink(secret, root / "sub" / "escape.png")
    os.symlink(outside, root / "linkdir")
    return Box(folder, root, secret)


# --- generated variants --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Variant:
    id: str
    value: Any  # the sample's `image` value
    kind: str
    needle: str  # what the message must quote of the reference


def _needle(text: str) -> str:
    if not text.strip():
        return "an empty image path"
    if text[:5].lower() == "data:":
        return text.split(",")[0].split(";")[0]
    return text[:20] if text.isprintable() and len(text) <= 300 else repr(text[:10])[1:-1]


def escapes(secret: Path) -> list[str]:
    """Every way we know to name a file outside the root (all must be `unsafe_image_path`)."""
    absolute, rel = str(secret), "../outside/secret.png"
    forms = [absolute, "/" + absolute, absolute.replace("/", "//"), "~/secret.png", "~root/secret.png", "~"]
    forms += [prefix + rel for prefix in ("", "./", "sub/../", "sub/./../", "./sub/../../")]
    forms += [rel.replace("/", "\\"), "sub\\..\\..\\outside\\secret.png", "..\\" + absolute.lstrip("/")]
    forms += [
        rel.replace("..", "%2e%2e"),
        rel.replace("..", "%2E%2E"),
        rel.replace("/", "%2F"),
        rel.replace("/", "%5C"),
        "%2e%2e%2foutside%2fsecret.png",
        "%2F" + absolute.lstrip("/"),
    ]
    forms += [f"file://{absolute}", f"file:{absolute}", f"FILE://localhost{absolute}", "file:../outside/secret.png"]
    forms += [
        "C:\\outside\\secret.png",
        "c:/outside/secret.png",
        "\\\\server\\share\\secret.png",
        "\\outside\\secret.png",
        "//server/share/secret.png",
    ]
    forms += ["escape.png", "sub/escape.png", "linkdir/secret.png", "./linkdir/secret.png", "sub/../linkdir/secret.png"]
    return forms


URLS = [
    "http://example.com/x.png",
    "https://example.com/x.jpg?size=2",
    "HTTPS://EXAMPLE.COM/X.PNG",
    "ftp://host/x.png",
    "s3://bucket/x.png",
    "gs://bucket/x.png",
    "hf://datasets/u/d/x.png",
]
VIDEOS = ["clip.mp4", "sub/clip.MOV", "a.webm", "b.avi", "c.mkv", "d.m4v"]
OTHER_DATA = ["data:text/plain;base64,aGk=", "data:video/mp4;base64,AAAA", "data:application/pdf;base64,JVBERi0="]
BLOB = base64.b64encode(png()).decode()
JUNK_TEXT = [
    "",
    "   ",
    "red\x00.png",
    "red\n.png",
    "red\x1b[0m.png",
    "a" * 300 + ".png",
    "d/" * 2100 + "x.png",
    BLOB,
    BLOB[:60] + "\n" + BLOB[60:],
    "data:image/png;base64,@@@!",
    "data:image/png,raw",
    "data:image/png",
]
JUNK_VALUES = [
    (3, "a number (3)"),
    (2.5, "a number (2.5)"),
    (True, "a number (True)"),
    ([["red.png"]], "a nested list"),
    ([[]], "a nested list"),
    ({}, "an object (no keys) without"),
    ({"foo": "red.png"}, "an object (foo) without"),
    ({"bytes": "aGk="}, "`bytes` holds a str"),
    ({"bytes": 5}, "`bytes` holds a int"),
    ({"bytes": None, "path": None}, "an object (bytes, path) without"),
    ({"image": {"image": {"image": {"image": "red.png"}}}}, "nested 4 levels deep"),
]
VIDEO_BLOCKS = [
    {"video": "clip.mp4"},
    {"type": "video", "video": "clip.mp4"},
    {"type": "video"},
    {"type": "video_url", "video_url": {"url": "https://example.com/v.mp4"}},
]
WRAPPERS: dict[str, Callable[[str], Any]] = {
    "str": lambda s: s,
    "list": lambda s: [s],
    "path": lambda s: {"path": s},
    "cell": lambda s: {"bytes": None, "path": s},
    "block": lambda s: {"type": "image", "image": s},
    "url": lambda s: {"url": s},
    "image_url": lambda s: {"type": "image_url", "image_url": {"url": s}},
    "image_url_flat": lambda s: [{"type": "image_url", "image_url": s}],
}
RED_URI = "data:image/png;base64," + BLOB
GOOD = [
    "red.png",
    "./red.png",
    "sub/blue.png",
    ["sub/blue.png"],
    {"path": "red.png"},
    {"bytes": None, "path": "red.png"},
    {"url": "sub/blue.png"},
    RED_URI,
    {"type": "image_url", "image_url": {"url": RED_URI}},
    {"type": "image", "image": "red.png"},
    "data:image/png;base64," + base64.urlsafe_b64encode(png()).decode(),
]
OVER_CAP = "data:image/png;base64," + "A" * 4000  # 3,000 bytes once decoded: over the test's 1,000-byte cap


def text_variants(secret: Path, wrappers: tuple[str, ...] = tuple(WRAPPERS)) -> list[Variant]:
    """Reference texts crossed with the shapes that may hold them."""
    classes = [
        ("unsafe_image_path", escapes(secret)),
        ("unsupported_image", URLS + VIDEOS + OTHER_DATA),
        ("bad_image_ref", JUNK_TEXT),
    ]
    found = []
    for kind, texts in classes:
        for text in texts:
            for name in wrappers:
                found.append(Variant(f"{kind}-{len(found)}-{name}", WRAPPERS[name](text), kind, _needle(text)))
    return found


def all_variants(secret: Path) -> list[Variant]:
    found = text_variants(secret)
    found += [Variant(f"bad_image_ref-v{i}", v, "bad_image_ref", n) for i, (v, n) in enumerate(JUNK_VALUES)]
    found += [
        Variant(f"unsupported_image-v{i}", v, "unsupported_image", "a video block") for i, v in enumerate(VIDEO_BLOCKS)
    ]
    found.append(Variant("image_too_large-cap", OVER_CAP, "image_too_large", "data:image/png"))
    return found


def few_variants(secret: Path) -> list[Variant]:
    """For consumers run once per variant: every text in two shapes, every shape once, every junk value."""
    found = text_variants(secret, ("str", "path"))
    for name in WRAPPERS:
        found.append(
            Variant(
                f"unsafe_image_path-{name}",
                WRAPPERS[name]("../outside/secret.png"),
                "unsafe_image_path",
                "../outside/secret.png",
            )
        )
    found += [v for v in all_variants(secret) if "-v" in v.id or v.id == "image_too_large-cap"]
    return found


@pytest.fixture
def small_cap(monkeypatch) -> None:
    monkeypatch.setattr(refs_module, "MAX_EMBEDDED_BYTES", 1000)


def sample(value: Any, sample_id: str) -> dict:
    return {"id": sample_id, "image": value, "conversations": QUESTION}


# --- the resolver itself: every variant, by kind and naming its reference ------------------------------------
def test_the_resolver_names_every_generated_variant_by_kind(box, small_cap):
    variants = all_variants(box.secret)
    assert len(variants) > 300
    with opens() as opened:
        for variant in variants:
            (ref,) = image_refs(variant.value, box.root)
            with pytest.raises(ImageError) as caught:
                check_ref(ref)
            assert caught.value.kind == variant.kind, (variant, caught.value.message)
            assert variant.needle in caught.value.message and "\n" not in caught.value.message, variant
        for value in GOOD:
            assert len(image_refs(value, box.root)) == 1
            check_ref(image_refs(value, box.root)[0])
    assert box.outside_opened(opened) == []
    assert all(kind in PROBLEMS and PROBLEMS[kind][0] == "error" for kind in GATE_KINDS)


# --- data check: JSON, JSONL, a datasets folder and parquet --------------------------------------------------
def _conversations_dataset(rows: list[tuple[str, Any]], folder: Path, cell: str, kind: str) -> Path:
    """Rows (id, image cell) as a datasets folder or parquet file: cells are strings or {"bytes", "path"} structs
    (what an undecoded datasets Image column holds)."""
    from datasets import Dataset, Features, List, Value

    image = Value("string") if cell == "string" else {"bytes": Value("binary"), "path": Value("string")}
    features = Features(
        {
            "id": Value("string"),
            "image": image,
            "conversations": List({"from": Value("string"), "value": Value("string")}),
        }
    )
    columns = {"id": [r[0] for r in rows], "image": [r[1] for r in rows], "conversations": [QUESTION] * len(rows)}
    dataset = Dataset.from_dict(columns, features=features)
    if kind == "parquet":
        folder.mkdir(parents=True)
        dataset.to_parquet(str(folder / "train.parquet"))
        return folder / "train.parquet"
    dataset.save_to_disk(str(folder))
    return folder


def data_file(box: Box, tmp: Path, form: str) -> tuple[Path, Counter]:
    """A dataset in `form` holding every generated variant the form can hold, plus good samples; the expected
    count per kind."""
    if form in ("json", "jsonl"):
        variants = all_variants(box.secret)
        records = [sample(v.value, v.id) for v in variants] + [sample(g, f"good-{i}") for i, g in enumerate(GOOD)]
        path = tmp / f"data.{form}"
        path.write_text(json.dumps(records) if form == "json" else "".join(json.dumps(r) + "\n" for r in records))
        return path, Counter(v.kind for v in variants)
    cell, kind = form.split("-")
    variants = text_variants(box.secret, ("str",))
    wrap = (lambda s: s) if cell == "string" else (lambda s: {"bytes": None, "path": s})
    rows = [(v.id, wrap(v.value)) for v in variants] + [("good", wrap("red.png"))]
    if cell == "struct":  # embedded bytes are data: the path beside them is only a name, wherever it points
        rows.append(("good-embedded", {"bytes": png(), "path": str(box.secret)}))
    return _conversations_dataset(rows, tmp / f"data-{form}", cell, kind), Counter(v.kind for v in variants)


DATA_FORMS = ["json", "jsonl", "string-disk", "struct-disk", "struct-parquet", "string-parquet"]


@pytest.mark.parametrize("form", DATA_FORMS)
def test_data_check_reports_every_bad_reference_by_kind(box, dpa_workspace, tmp_path, small_cap, form):
    data, expected = data_file(box, tmp_path, form)
    before = tree_hash(box.folder, tmp_path)
    argv = [
        "data",
        "check",
        str(data),
        "--image-root",
        str(box.root),
        "-w",
        str(dpa_workspace("next_qwen")),
        "--json",
        *(["--fast"] if form == "jsonl" else []),
    ]
    with opens() as opened:
        result = runner.invoke(app, argv)
    assert result.exit_code == 2 and "Traceback" not in result.stderr, result.stderr
    problems = {p["kind"]: p for p in json.loads(result.stdout)["problems"]}
    assert {kind: p["count"] for kind, p in problems.items()} == dict(expected)  # every variant, no good sample
    for kind, problem in problems.items():
        assert all(example.startswith(kind) for example in problem["examples"]), problem
    assert "secret.png" in problems["unsafe_image_path"]["message"]
    assert box.outside_opened(opened) == [] and tree_hash(box.folder, tmp_path) == before


# --- train: refused before the model loads, every bad sample counted by kind ---------------------------------
@pytest.fixture
def no_model_load(monkeypatch) -> None:
    """Loading a model is the one thing these refusals must never reach."""

    def refuse(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("a model was loaded before the data was refused")

    monkeypatch.setattr("dpa_cli.train.run.load_model", refuse)
    monkeypatch.setattr("dpa_cli.generate.open_runnable", refuse)
    monkeypatch.setattr("dpa_cli.evaluation.batch.open_model", refuse)


def refused(result: Any) -> str:
    """The one-line refusal (exit 2, `error:` first, at most a hint after it, no traceback)."""
    stderr = result.stderr
    assert "Traceback" not in stderr and (result.exception is None or isinstance(result.exception, SystemExit)), stderr
    assert result.exit_code == 2, (result.exit_code, stderr)
    lines = stderr.strip().splitlines()
    assert lines and lines[0].startswith("error:") and len(lines) <= 2, stderr
    return lines[0]


@pytest.mark.parametrize("form", ["json", "jsonl", "string-disk", "struct-parquet"])
def test_train_refuses_every_bad_reference_before_loading_the_model(
    box, dpa_workspace, tmp_path, small_cap, no_model_load, form
):
    data, expected = data_file(box, tmp_path, form)
    workspace = Path(shutil.copytree(dpa_workspace("next_qwen"), tmp_path / "ws"))
    before = tree_hash(box.folder, tmp_path)
    argv = [
        "train",
        "--stage",
        "1",
        "-w",
        str(workspace),
        "--data",
        str(data),
        "--image-root",
        str(box.root),
        "--max-steps",
        "1",
    ]
    with opens() as opened:
        line = refused(runner.invoke(app, argv))
    first = line.split(". Bad samples: ")[0]
    assert re.match(r"error: sample unsafe_image_path-0\S*: .*secret\.png", first), line
    counted = {kind: int(count) for count, kind in re.findall(r"(\d+) (\w+) \(", line.split("Bad samples:")[1])}
    assert counted == dict(expected)
    assert box.outside_opened(opened) == [] and tree_hash(box.folder, tmp_path) == before


# --- eval and analyze: one run per variant, refused before any model loads -----------------------------------
def _eval(box: Box, tmp: Path, variant: Variant) -> list[str]:
    data = tmp / "items.jsonl"
    data.write_text(
        json.dumps({"id": "good", "question": "Q?", "answer": "a", "image": "red.png"})
        + "\n"
        + json.dumps({"id": variant.id, "question": "Q?", "answer": "a", "image": variant.value})
        + "\n"
    )
    return ["eval", str(box.root), "--data", str(data), "--image-root", str(box.root), "-o", str(tmp / "pred.jsonl")]


def _analyze(box: Box, tmp: Path, variant: Variant) -> list[str]:
    data = tmp / "pairs.json"
    data.write_text(json.dumps([sample("red.png", "good"), sample(variant.value, variant.id)]))
    return [
        "analyze",
        "modality-gap",
        str(box.root),
        "--data",
        str(data),
        "--image-root",
        str(box.root),
        "--baseline",
        str(box.root),
        "-o",
        str(tmp / "gap"),
        "--limit",
        "2",
    ]


@pytest.mark.parametrize("consumer", [_eval, _analyze], ids=["eval", "analyze"])
def test_eval_and_analyze_refuse_every_bad_reference_naming_item_and_reference(
    box, tmp_path, small_cap, no_model_load, consumer
):
    # `"image": ""` is an item without an image to eval (as an empty CSV column), not a bad reference.
    variants = [v for v in few_variants(box.secret) if not (consumer is _eval and v.value == "")]
    assert len(variants) > 100 and set(GATE_KINDS) == {v.kind for v in variants}
    before = tree_hash(box.folder)  # (outside the recording: hashing reads the sentinel)
    written = []
    with opens() as opened:
        for variant in variants:
            argv = consumer(box, tmp_path, variant)
            inputs = names(tmp_path)
            line = refused(runner.invoke(app, argv))
            assert f"{variant.id}: " in line and variant.needle in line, (variant, line)
            written += [name for name in names(tmp_path) if name not in inputs]
    assert box.outside_opened(opened) == [] and written == [] and tree_hash(box.folder) == before


# --- generate and chat: the user's own --image path, through the same checks ---------------------------------
def bad_image_files(folder: Path) -> list[tuple[str, str]]:
    """(path, what the message must say) for files generate and chat must refuse; generated by kind."""
    folder.mkdir(exist_ok=True)
    found = []
    for width, height in [(20_000, 20_000), (10_000, 10_000), (100_000_000, 1), (1, 90_000_000)]:
        path = folder / f"bomb-{width}x{height}.png"
        path.write_bytes(png_claiming(width, height))
        found.append((str(path), "decompression bomb"))
    whole = noise_bytes()
    files = {
        "text.png": (b"not an image\n", "not a readable image"),
        "empty.jpg": (b"", "empty (0 bytes)"),
        "cut.jpg": (whole[: len(whole) // 2], "truncated"),
        "clip.mp4": (b"\x00\x00\x00\x18ftypmp42", "a video"),
        "zero.png": (png_claiming(0, 5), "not a readable image"),
        "br[/b].png": (b"junk", "not a readable image"),
    }
    for name, (content, needle) in files.items():
        (folder / name).parent.mkdir(exist_ok=True)  # `br[/b].png` is b].png in folder br[: markup, if not escaped
        (folder / name).write_bytes(content)
        found.append((str(folder / name), needle))
    (folder / "folder.png").mkdir(exist_ok=True)
    if not (folder / "pipe.png").exists():
        os.mkfifo(folder / "pipe.png")  # opening it would block forever: refused from stat
    found += [
        (str(folder / "folder.png"), "a folder"),
        (str(folder / "pipe.png"), "not a regular file"),
        (str(folder / "missing.png"), "no such image"),
        ("https://example.com/cat.png", "a URL"),
        (f"file://{folder}/text.png", "a file: URI"),
        ("x" * 5000, "too long"),
        ("sub/red\x00.png", "control"),
    ]
    return found


def names(folder: Path) -> list[str]:
    """Everything under `folder` by name (the FIFO among the bad files cannot be hashed: reading it blocks)."""
    return sorted(str(path.relative_to(folder)) for path in folder.rglob("*"))


def test_generate_refuses_every_bad_image_in_one_line_before_the_model_loads(box, tmp_path, no_model_load):
    cases = bad_image_files(tmp_path / "files")
    before = tree_hash(box.folder), names(tmp_path)
    for path, needle in cases:
        line = refused(runner.invoke(app, ["generate", str(box.root), "-i", path, "-p", "What is it?"]))
        assert needle in line and (_needle(Path(path).name) in line or len(path) > 300), (path, line)
    assert (tree_hash(box.folder), names(tmp_path)) == before


def test_chat_reports_each_bad_image_in_one_line_and_goes_on(box, dpa_workspace, tmp_path):
    cases = [(p, n) for p, n in bad_image_files(tmp_path / "files") if "\x00" not in p]
    Image.new("RGB", (3000, 10), (10, 200, 10)).save(tmp_path / "sliver.png")  # the perceiver refuses 300:1
    lines = [f"/image {path}" for path, _ in cases]
    lines += [
        f"/image {tmp_path / 'sliver.png'}",
        "Describe it.",
        f"/image {box.root / 'red.png'}",
        "What is it?",
        "/exit",
    ]
    before = tree_hash(box.folder), names(tmp_path)
    result = runner.invoke(
        app,
        ["chat", str(dpa_workspace("next_qwen")), "--max-new-tokens", "2", "--device", "cpu"],
        input="\n".join(lines) + "\n",
    )
    assert result.exit_code == 0 and "Traceback" not in result.stderr, result.stderr
    errors = [line for line in result.stderr.splitlines() if "error:" in line]
    assert len(errors) == len(cases) + 1, errors
    for (path, needle), line in zip(cases, errors):
        assert needle in line, (path, line)
    assert "the processor refuses" in errors[-1] and "1 waiting image(s) dropped" in errors[-1]
    assert result.stderr.count("image added to your next message") == 2
    assert result.stdout.endswith("\n")  # the reply to the question after the good image, ended
    assert (tree_hash(box.folder), names(tmp_path)) == before
