"""`dpa data check`: every kind of problem found at the right samples (exit 2), a clean dataset passes (exit 0),
the rendered sample first, and `--fast` counting image slots exactly from image headers."""

from __future__ import annotations

import json

import pytest
from PIL import Image
from typer.testing import CliRunner

from dpa_cli.cli.app import app
from dpa_cli.data import PROBLEMS, FeatureCounter, ImageRef, SampleEncoder, load_processor
from dpa_cli.data.samples import Sample
from tests.fixtures.data import SEEDED_KINDS, SEEDED_MAX_LENGTH, write_json

runner = CliRunner()


def check(*args: str):
    return runner.invoke(app, ["data", "check", *args])


def check_json(*args: str) -> tuple[int, dict]:
    result = check(*args, "--json")
    return result.exit_code, json.loads(result.stdout)


@pytest.mark.parametrize("fast", [False, True])
def test_each_seeded_problem_is_found_at_its_sample(dpa_workspace, data_files, fast):
    args = [
        str(data_files / "seeded.json"),
        "--image-root",
        str(data_files / "images"),
        "-w",
        str(dpa_workspace("next_qwen")),
        "--max-length",
        str(SEEDED_MAX_LENGTH),
    ]
    code, result = check_json(*args, *(["--fast"] if fast else []))
    assert code == 2
    found = {p["kind"]: p for p in result["problems"]}
    expected = dict(SEEDED_KINDS)
    if fast:  # headers only: a truncated file reads as whole
        expected.pop("truncated_image")
    assert set(found) == set(expected)
    for kind, ids in expected.items():
        assert found[kind]["examples"] == ids and found[kind]["count"] == len(ids), kind
        assert found[kind]["severity"] == PROBLEMS[kind][0]
    assert {p["severity"] for p in result["problems"] if p["kind"].startswith("converted_")} == {"warning"}
    assert result["samples"] == 21 and result["errors"] > 0 and result["warnings"] == 5  # cut_at_max_length too
    assert result["sample"]["id"] == "clean" and result["mode"] == ("fast" if fast else "decode")


def test_a_clean_dataset_passes_and_shows_a_sample_first(dpa_workspace, data_files):
    workspace = str(dpa_workspace("next_qwen"))
    args = [str(data_files / "clean.json"), "--image-root", str(data_files / "images"), "-w", workspace]
    result = check(*args)
    assert result.exit_code == 0, result.output
    out = result.stdout
    assert out.index("sample one-image") < out.index("prompt") < out.index("checked 4 samples")
    assert "A red square.<|im_end|>" in out and "samples per CPU-second" in out and "no errors" in out
    code, payload = check_json(*args)
    assert code == 0 and payload["samples"] == 4 and payload["problems"] == []
    stats = payload["stats"]
    assert stats["images"] == 5 and stats["text_only_samples"] == 1 and stats["max_length"] == 8192
    assert stats["answer_tokens"]["total"] > 0 and stats["image_tokens"]["total"] > 0
    assert stats["length"]["p50"] <= stats["length"]["p90"] <= stats["length"]["max"]
    segments = payload["sample"]["segments"]
    assert ["A red square.<|im_end|>", "supervised"] in segments


def test_fast_mode_gives_the_same_token_counts_as_decoding(dpa_workspace, data_files):
    for name in ("next_qwen", "next_composed"):
        workspace = str(dpa_workspace(name))
        args = [str(data_files / "clean.jsonl"), "--image-root", str(data_files / "images"), "-w", workspace]
        _, decoded = check_json(*args)
        _, fast = check_json(*args, "--fast")
        assert fast["stats"] == decoded["stats"]


def test_warnings_alone_exit_0_and_limit_stops_early(tmp_path, dpa_workspace, data_files):
    turns = [{"from": "human", "value": "<image>\nWhat?"}, {"from": "gpt", "value": "Gray."}]
    samples = [{"id": f"g{i}", "image": "gray.png", "conversations": turns} for i in range(5)]
    data = write_json(tmp_path / "gray.json", samples)
    code, result = check_json(
        str(data),
        "--image-root",
        str(data_files / "images"),
        "-w",
        str(dpa_workspace("llama3_qwen")),
        "--limit",
        "3",
        "--stage",
        "1",
    )
    assert code == 0 and result["samples"] == 3 and result["total_samples"] == 5
    assert [(p["kind"], p["count"]) for p in result["problems"]] == [("converted_grayscale", 3)]
    assert result["stats"]["max_length"] == 2048 and result["errors"] == 0


@pytest.mark.parametrize(
    "content, words",
    [
        (b"\xff\xfe[\x00]\x00", "UTF-16 text, not UTF-8"),
        (b"\x80[]", "not UTF-8"),
        (b'{"data": []}', "top level is a JSON object"),
        (b"", "empty"),
    ],
)
def test_files_that_are_not_data_fail_in_one_line(tmp_path, dpa_workspace, content, words):
    path = tmp_path / "bad.json"
    path.write_bytes(content)
    result = check(str(path), "-w", str(dpa_workspace("next_qwen")))
    assert result.exit_code == 2 and result.stdout == ""
    assert words in result.stderr and "Traceback" not in result.stderr
    assert result.stderr.startswith("error:")


def test_without_a_workspace_it_says_how_to_get_one(tmp_path, monkeypatch, data_files):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("DPA_WORKSPACE", raising=False)
    result = check(str(data_files / "clean.json"))
    assert result.exit_code == 2 and "no dpa workspace" in result.stderr


def test_help_has_examples():
    result = runner.invoke(app, ["data", "check", "--help"])
    assert result.exit_code == 0 and "Examples" in result.stdout and "--fast" in result.stdout


@pytest.mark.parametrize("name", ["next_qwen", "next_composed", "next_qwen_early"])
def test_feature_counts_from_image_sizes_equal_the_processors(dpa_workspace, name):
    processor = load_processor(dpa_workspace(name))
    counter = FeatureCounter(processor)
    encoder = SampleEncoder(processor, stage=2, max_length=1 << 20)
    messages = [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "?"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "!"}]},
    ]
    for size in [(28, 28), (60, 40), (40, 60), (123, 45), (200, 200), (640, 480), (17, 300)]:
        features = encoder(Sample("s", [ImageRef(image=Image.new("RGB", size))], messages))
        assert counter(size) == int((features["input_ids"] == processor.image_token_id).sum()), size
