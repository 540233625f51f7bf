"""Inputs no earlier catalogue tried (red-teaming the command-line contract): each class below ended in a
traceback, an exit code of 1, or a silent success before its gate existed.

Every variant is generated (many spellings of one mistake) and must meet the standard of
tests/test_bad_inputs.py: exit 2, an `error:` line (plus at most a hint) naming the file / flag, no
traceback, and every input byte-identical. The gates:

- a model folder's config files (tokenizer_config.json, generation_config.json, ...) that are JSON but not an
  object: `describe.check_json_files`, which every loader and `dpa upgrade` go through;
- a tokenizer.json / chat template that makes transformers' loader fail: `loading._from_pretrained` and its
  chat-template check, for every tokenizer and processor dpa loads (upgrade inputs, workspaces, stages);
- weight files that list no tensors: `checkpoint.reader.read_checkpoint_index`;
- weight files a model is about to be loaded from, cut or padded: `loading.load_as_trained`;
- outputs that can only fail to be written and argument bytes that are not UTF-8: `cli.usage`, right after
  parsing, for every command;
- a JSONL file with a byte-order mark (its first sample was lost as a bad record) and dataset folders the
  `datasets` loader crashes on: `data.formats`.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from typer.testing import CliRunner

from dpa_cli.cli.app import app
from tests.test_gate_boundary import (  # noqa: F401  (_command_built_once: the module-wide autouse fixture)
    COMMANDS,
    IDS,
    WITH_OUTPUT,
    _annotation,
    _command_built_once,
    _dummy,
    _options,
    _required,
    assert_all_refused,
    refusal_problem,
)

runner = CliRunner()
NOT_OBJECTS = ([], [{"a": 1}], "text", 5, 2.5, None, True)


@pytest.fixture(scope="module")
def target(tiny_checkpoint, tmp_path_factory) -> Path:
    """A private copy of the tiny LLaVA target (its files are damaged one at a time, then restored)."""
    return Path(shutil.copytree(tiny_checkpoint("llava"), tmp_path_factory.mktemp("unseen-target") / "llava"))


@pytest.fixture(scope="module")
def workspace(dpa_workspace, tmp_path_factory) -> Path:
    """A private copy of an upgraded workspace (the files of its model/ are damaged one at a time, then restored)."""
    return Path(shutil.copytree(dpa_workspace("next_qwen"), tmp_path_factory.mktemp("unseen-ws") / "ws"))


@contextmanager
def written(path: Path, content: str | bytes) -> Iterator[None]:
    """`path` holds `content` while the block runs (which must leave it as written); then what was there before."""
    original = path.read_bytes() if path.exists() else None
    data = content.encode() if isinstance(content, str) else content
    path.write_bytes(data)
    try:
        yield
        assert path.read_bytes() == data, f"{path.name} was changed by the run"
    finally:
        path.unlink()
        if original is not None:
            path.write_bytes(original)


def upgrade(target: Path, tiny_checkpoint, tmp_path: Path, *extra: str) -> list[str]:
    return ["upgrade", str(target), "-p", str(tiny_checkpoint("qwen2_5_vl")), "-o", str(tmp_path / "out"), *extra]


def readers(workspace: Path, images: Path) -> list[list[str]]:
    """Commands that load a workspace's model folder (config and processor) before any weights."""
    return [
        ["generate", str(workspace), "-p", "What is it?", "-i", str(images / "red.png"), "--max-new-tokens", "1"],
        ["data", "check", str(images.parent / "clean.json"), "--image-root", str(images), "-w", str(workspace)],
    ]


# --- config files that are JSON, but not an object ------------------------------------------------------------
TARGET_FILES = ("tokenizer_config.json", "generation_config.json", "preprocessor_config.json", "processor_config.json")
WORKSPACE_FILES = (
    "tokenizer_config.json",
    "generation_config.json",
    "processor_config.json",
    "perceiver_tokenizer/tokenizer_config.json",
)


def test_a_config_file_that_is_json_but_not_an_object_is_named(
    target, workspace, data_files, tiny_checkpoint, tmp_path
):
    failures, count = [], 0
    for name in TARGET_FILES:
        for value in NOT_OBJECTS:
            with written(target / name, json.dumps(value)):
                argv = upgrade(target, tiny_checkpoint, tmp_path)
                failures.append(refusal_problem(argv, (f"{name}: not a JSON object",), (target, tmp_path)))
                count += 1
    images = data_files / "images"
    for name in WORKSPACE_FILES:
        for value in NOT_OBJECTS[::2]:
            with written(workspace / "model" / name, json.dumps(value)):
                for argv in readers(workspace, images):
                    failures.append(refusal_problem(argv, (f"{name}: not a JSON object",), (workspace, images)))
                    count += 1
    assert_all_refused(failures, count)


# --- a tokenizer.json or a chat template that breaks the loader -------------------------------------------------
BROKEN_TOKENIZERS = (
    "{}",
    '{"model": {}}',
    '{"added_tokens": 5}',
    '{"added_tokens": [], "model": 5}',
    '{"added_tokens": [{"id": "x"}], "model": {"type": "BPE"}}',
    "[]",
    '"tokenizer"',
    "null",
)
BROKEN_TEMPLATES = (
    "{% for %}",
    "{{ messages",
    "{% if messages %}open",
    "{% endfor %}",
    "{% for m in messages %}{{ m.content }}",
    "{{ }}",
    "{% set %}",
    "{{ messages | }}",
)


def refusals_in_target_and_workspace(
    name: str, texts: tuple[str, ...], needles: tuple[str, str], target: Path, workspace: Path, env: tuple
) -> None:
    """Each of `texts` as the file `name` of the upgrade target (needle 0) and of the workspace's model/ (needle
    1, for every command in `readers`): all refused the standard way, nothing written."""
    data_files, tiny_checkpoint, tmp_path = env
    images = data_files / "images"
    failures, count = [], 0
    for text in texts:
        with written(target / name, text):
            argv = upgrade(target, tiny_checkpoint, tmp_path)
            failures.append(refusal_problem(argv, (needles[0],), (target, tmp_path)))
        with written(workspace / "model" / name, text):
            for argv in readers(workspace, images):
                failures.append(refusal_problem(argv, (needles[1],), (workspace, images)))
        count += 3
    assert_all_refused(failures, count)
    assert not (tmp_path / "out").exists()


def test_a_tokenizer_json_the_loader_fails_on_is_one_line(target, workspace, data_files, tiny_checkpoint, tmp_path):
    needles = ("cannot load its tokenizer", "model: cannot load its processor")
    env = (data_files, tiny_checkpoint, tmp_path)
    refusals_in_target_and_workspace("tokenizer.json", BROKEN_TOKENIZERS, needles, target, workspace, env)


def test_a_chat_template_that_is_not_jinja_is_named_before_anything_runs(
    target, workspace, data_files, tiny_checkpoint, tmp_path
):
    """`dpa upgrade` refuses such a target before writing; a workspace's is named before the first prompt."""
    needles = ("its chat template is not valid Jinja",) * 2
    env = (data_files, tiny_checkpoint, tmp_path)
    refusals_in_target_and_workspace("chat_template.jinja", BROKEN_TEMPLATES, needles, target, workspace, env)


# --- weights ---------------------------------------------------------------------------------------------------
def _header_only(header: dict) -> bytes:
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw


def test_weight_files_that_list_no_tensors_are_refused(tiny_checkpoint, tmp_path):
    single = Path(shutil.copytree(tiny_checkpoint("llava"), tmp_path / "single"))
    sharded = Path(shutil.copytree(tiny_checkpoint("llava", sharded=True), tmp_path / "sharded"))
    index = sharded / "model.safetensors.index.json"
    headers = [
        {},
        {"__metadata__": {}},
        {"__metadata__": {"format": "pt"}},
        {"__metadata__": {"format": "pt", "a": "b"}},
    ]
    maps = [{}, {"metadata": {"total_size": 0}}]
    failures, count = [], 0
    for commands in ("upgrade", "inspect"):
        for folder, file, contents in (
            *((single, single / "model.safetensors", _header_only(h)) for h in headers),
            *((sharded, index, json.dumps({**m, "weight_map": {}}).encode()) for m in maps),
        ):
            with written(file, contents):
                argv = upgrade(folder, tiny_checkpoint, tmp_path) if commands == "upgrade" else ["inspect", str(folder)]
                failures.append(refusal_problem(argv, ("its weights hold no tensors",), (folder,)))
                count += 1
    assert_all_refused(failures, count)


def test_weights_cut_or_padded_are_named_before_a_model_is_loaded_from_them(workspace, data_files):
    weights = workspace / "model" / "model.safetensors"
    whole = weights.read_bytes()
    (length,) = struct.unpack("<Q", whole[:8])
    variants = [whole[:-1], whole[: len(whole) // 2], whole[: 8 + length], whole + b"\0", whole + b"\0" * 4096]
    images = data_files / "images"
    failures = []
    for contents in variants:
        with written(weights, contents):
            argv = readers(workspace, images)[0]
            failures.append(refusal_problem(argv, ("model.safetensors:",), (workspace,)))
    assert_all_refused(failures, len(variants))


# --- the command line: outputs that can only fail, names that are not UTF-8 ------------------------------------
def _bad_outputs(tmp_path: Path) -> list[tuple[Path, str]]:
    (tmp_path / "loop").symlink_to(tmp_path / "loop")
    (tmp_path / "dangling").symlink_to(tmp_path / "nowhere" / "ws")
    (tmp_path / "a").symlink_to(tmp_path / "b")
    (tmp_path / "b").symlink_to(tmp_path / "a")
    return [
        (tmp_path / "loop", "leads nowhere"),
        (tmp_path / "dangling", "leads nowhere"),
        (tmp_path / "a", "leads nowhere"),
        (tmp_path / ("w" * 240), "more than the"),
        (tmp_path / ("é" * 130), "more than the"),
        (tmp_path / ("d" * 256) / "ws", "more than the"),
        (Path(os.fsdecode(os.fsencode(str(tmp_path)) + b"/ws-\xff\xfe")), "not UTF-8"),
        (Path(os.fsdecode(os.fsencode(str(tmp_path)) + b"/\xe9t\xe9/ws")), "not UTF-8"),
    ]


@pytest.mark.parametrize("path,command", WITH_OUTPUT, ids=[" ".join(p) for p, _ in WITH_OUTPUT])
def test_an_output_that_can_only_fail_to_be_written_is_refused_for_every_command(path, command, tmp_path):
    failures, count = [], 0
    for output, needle in _bad_outputs(tmp_path):
        for param in _options(command):
            for name in set(param.opts) & {"--output", "--workdir", "-o"}:
                argv = [*path, *_required(command), name, str(output)]
                failures.append(refusal_problem(argv, (name if name != "-o" else "--output", needle), (tmp_path,)))
                count += 1
    assert_all_refused(failures, count)


def _path_like(param) -> bool:
    kind = _annotation(param)
    return not getattr(param, "is_flag", False) and ("str" in kind or "Path" in kind)


def _argv(path: list[str], command, bad_param, bad: str) -> list[str]:
    """The command with placeholders for what it requires, and `bad` as the value of `bad_param`."""
    argv = [*path]
    for param in command.params:
        if not (param.required or param is bad_param):
            continue
        value = bad if param is bad_param else _dummy(param)
        argv += [value] if param.param_type_name == "argument" else [param.opts[0], value]
    return argv


def _text_params(command) -> list:
    """The arguments and (visible, not eager) options of `command` that take a path or text."""
    return [
        p
        for p in command.params
        if _path_like(p) and (p.param_type_name == "argument" or (p in _options(command) and not p.is_eager))
    ]


WITH_PATHS = [(path, command) for path, command in COMMANDS if _text_params(command)]
WITH_FLOATS = [
    (path, command) for path, command in COMMANDS if any("float" in _annotation(p) for p in _options(command))
]


@pytest.mark.parametrize("path,command", WITH_PATHS, ids=[" ".join(p) for p, _ in WITH_PATHS])
def test_bytes_that_are_not_utf8_in_any_argument_are_named(path, command, tmp_path):
    """A file name from another system (Latin-1 bytes) reaches every writer and tokenizers' Rust side as text
    they cannot encode; it is named right after parsing, whichever argument or option holds it."""
    bad = os.fsdecode(os.fsencode(str(tmp_path)) + b"/caf\xe9-\xff")
    variants = [
        (
            _argv(path, command, param, bad),
            param.name.upper() if param.param_type_name == "argument" else max(param.opts, key=len),
        )
        for param in _text_params(command)
    ]
    failures = [refusal_problem(argv, (name, "caf\\xe9-\\xff", "not UTF-8"), (tmp_path,)) for argv, name in variants]
    assert_all_refused(failures, len(variants))


@pytest.mark.parametrize("path,command", WITH_FLOATS, ids=[" ".join(p) for p, _ in WITH_FLOATS])
def test_a_number_option_given_as_inf_or_nan_is_refused_for_every_command(path, command, tmp_path):
    """`--temperature inf` passed its `min=0` range and sampled uniformly at random; every float option of every
    command is given each non-finite spelling (some fail the range first: the option is named either way)."""
    variants = []
    for param in _options(command):
        if "float" in _annotation(param):
            for value in ("inf", "Infinity", "+inf", "-inf", "nan", "NaN", "1e999", "-1e999"):
                variants.append((_argv(path, command, param, value), max(param.opts, key=len)))
    failures = [refusal_problem(argv, (name,), (tmp_path,)) for argv, name in variants]
    assert_all_refused(failures, len(variants))


def test_a_prompt_the_processor_refuses_is_the_first_line(workspace, data_files):
    """`<image>` markers typed into the prompt with no image (or more than the images given) are refused before
    `dpa generate` prints which model runs, so the `error:` line is the first one on stderr."""
    images = data_files / "images"
    base = readers(workspace, images)[0]
    variants = [
        [*base[:3], "<image>", *base[6:]],
        [*base[:3], "<image>\n<image>\nCompare.", *base[4:]],
        [*base[:3], "Before <image> and <image> after", *base[4:]],
    ]
    failures = [
        refusal_problem(argv, ("the processor refuses the images or the prompt",), (workspace,)) for argv in variants
    ]
    assert_all_refused(failures, len(variants))


def test_names_in_utf8_beyond_ascii_still_pass_the_gate(tiny_checkpoint, tmp_path):
    output = tmp_path / "données-模型" / "ws"
    result = runner.invoke(
        app, upgrade(tiny_checkpoint("llava"), tiny_checkpoint, tmp_path)[:-2] + ["-o", str(output), "--dry-run"]
    )
    assert result.exit_code == 0, result.stderr
    assert not output.exists()


# --- data ------------------------------------------------------------------------------------------------------
def _jsonl(records: list[dict], bom: bool, newline: str, blank: bool) -> bytes:
    lines = [json.dumps(r) for r in records]
    text = (newline * 2 if blank else "").join(line + newline for line in lines)
    return (b"\xef\xbb\xbf" if bom else b"") + text.encode()


@pytest.mark.parametrize("suffix", [".jsonl", ".ndjson"])
def test_a_jsonl_file_with_a_byte_order_mark_keeps_its_first_sample(workspace, data_files, tmp_path, suffix):
    records = json.loads((data_files / "clean.json").read_text())[:2]
    for newline in ("\n", "\r\n"):
        for blank in (False, True):
            data = tmp_path / f"data{suffix}"
            data.write_bytes(_jsonl(records, True, newline, blank))
            argv = ["data", "check", str(data), "--image-root", str(data_files / "images"), "-w", str(workspace)]
            result = runner.invoke(app, [*argv, "--json"])
            assert result.exit_code == 0, (newline, blank, result.stdout[-600:], result.stderr)
            report = json.loads(result.stdout)
            assert report["samples"] == 2 and report["errors"] == 0, report["problems"]


def _dataset_variants(data_files: Path, tmp_path: Path) -> Iterator[Path]:
    chat = data_files / "chat"
    for features in (5, "messages", [1, 2], {"messages": 5}, {"messages": {"_type": "NoSuchFeature"}}):
        folder = Path(shutil.copytree(chat, tmp_path / f"features-{len(list(tmp_path.iterdir()))}"))
        info = json.loads((folder / "dataset_info.json").read_text())
        (folder / "dataset_info.json").write_text(json.dumps({**info, "features": features}))
        yield folder
    for state in ("[]", '{"_data_files": 5}', '{"_data_files": [{"filename": "../../x.arrow"}]}'):
        folder = Path(shutil.copytree(chat, tmp_path / f"state-{len(list(tmp_path.iterdir()))}"))
        (folder / "state.json").write_text(state)
        yield folder
    for name, contents in (("x.parquet", b"PAR1garbagePAR1"), ("y.parquet", b""), ("z.arrow", b"ARROW1\0\0junk")):
        (tmp_path / name).write_bytes(contents)
        yield tmp_path / name


def test_a_dataset_the_datasets_loader_cannot_read_is_one_line(workspace, data_files, tmp_path):
    failures, count = [], 0
    (tmp_path / "sets").mkdir()
    for data in _dataset_variants(data_files, tmp_path / "sets"):
        argv = ["data", "check", str(data), "--image-root", str(data_files / "images"), "-w", str(workspace)]
        failures.append(refusal_problem(argv, (data.name,), (data_files, workspace)))
        count += 1
    assert_all_refused(failures, count)


# --- evaluation items whose fields are of the wrong kind were scored as garbage -----------------------------------
ITEM_FIELDS = {
    "id": ([1], {"a": 1}, True),
    "answer": ({"a": 1}, [[1]], [{"a": 1}], True),
    "options": ("not a list", "[1, ", [[1], [2]], [{"x": 1}, "b"], [True, False], [str(i) for i in range(27)]),
}


def test_evaluation_items_with_fields_of_the_wrong_kind_are_named(workspace, data_files, tmp_path):
    images = data_files / "images"
    failures, count = [], 0
    for key, values in ITEM_FIELDS.items():
        for value in values:
            item = {"id": "q1", "question": "Which?", "answer": "A", "options": ["yes", "no"], key: value}
            items = tmp_path / "items.jsonl"
            items.write_text(json.dumps(item) + "\n")
            argv = [
                "eval",
                str(workspace),
                "--data",
                str(items),
                "--image-root",
                str(images),
                "-o",
                str(tmp_path / "p"),
            ]
            failures.append(
                refusal_problem(
                    argv,
                    (f"`{key}`" if key != "options" or value != [str(i) for i in range(27)] else "27 options",),
                    (workspace,),
                )
            )
            count += 1
    for rows in ("q,A\n", "only\n", "q,a,b,c\nq2,a\n", "\x00\x01\n"):
        items = tmp_path / "mmlu.csv"
        items.write_text(rows)
        argv = ["eval", str(workspace), "--data", str(items), "--image-root", str(images), "-o", str(tmp_path / "p")]
        failures.append(refusal_problem(argv, ("mmlu.csv", "columns"), (workspace,)))
        count += 1
    assert_all_refused(failures, count)
    assert not (tmp_path / "p").exists()


# --- files that are not regular: a FIFO blocked the reader for ever, /dev/zero never ended ------------------------
@pytest.mark.parametrize("kind", ["fifo", "device"])
def test_a_fifo_or_a_device_given_as_a_file_is_refused_not_read_for_ever(workspace, tmp_path, kind):
    """Run as a user runs it, in a process of its own with a time limit: a gate that fails blocks for ever."""
    import subprocess
    import sys

    special = tmp_path / f"{kind}.jsonl"
    if kind == "fifo":
        os.mkfifo(special)
    else:
        special.symlink_to("/dev/zero")
    runs = [
        (["data", "check", str(special), "-w", str(workspace)], {}),
        (["eval", str(workspace), "--data", str(special), "-o", str(tmp_path / "pred.jsonl")], {}),
        (["catalog"], {"DPA_CATALOG": str(special)}),
    ]
    for argv, env in runs:
        done = subprocess.run(
            [sys.executable, "-m", "dpa_cli", *argv],
            capture_output=True,
            text=True,
            timeout=120,
            env={**os.environ, "HF_HUB_OFFLINE": "1", **env},
        )
        first = [line for line in done.stderr.splitlines() if "WARNING" not in line][:1]
        assert done.returncode == 2 and first and first[0].startswith("error:"), (argv, done.stderr[-500:])
        assert "not a regular file" in done.stderr, (argv, done.stderr[-500:])
    assert not (tmp_path / "pred.jsonl").exists()
