"""`dpa demo --steps-scale 0.1`: the whole pipeline through the real commands, end to end, in about a minute."""

from __future__ import annotations

import json

from typer.testing import CliRunner

from dpa_cli.cli.app import app

ORDER = [
    "inspect",
    "upgrade",
    "upgrade",
    "data",
    "train",
    "train",
    "export",
    "train",
    "train",
    "export",
    "generate",
    "generate",
    "generate",
]


def test_quick_demo_runs_every_command_and_writes_its_report(tmp_path):
    result = CliRunner().invoke(app, ["demo", "--steps-scale", "0.1", "-o", str(tmp_path / "demo"), "--json"])
    assert result.exit_code == 0, result.stderr[-3000:]
    report = json.loads(result.stdout)
    assert [command.split()[1] for command in report["commands"]] == ORDER
    assert set(report["scores"]) == {"DPA", "ViT-only", "chance"}
    assert (tmp_path / "demo" / "loss.png").stat().st_size > 10_000
    text = (tmp_path / "demo" / "report.md").read_text()
    assert "Held-out accuracy" in text and "| DPA |" in text and "dpa upgrade" in text
    for name in ("dpa", "vit-only"):
        assert (tmp_path / "demo" / name / "export" / "config.json").is_file()
    instruct = json.loads((tmp_path / "demo" / "data" / "instruct.json").read_text())
    assert instruct[0]["conversations"][0]["value"].startswith("<image>")
    questions = {
        turn["value"].removeprefix("<image>\n") for sample in instruct for turn in sample["conversations"][::2]
    }
    assert {
        "What colour are the shapes?",
        "What kind of shape is in the picture?",
        "How many shapes are there?",
    } <= questions
    assert any("image" not in sample for sample in instruct) and any(len(s["conversations"]) == 4 for s in instruct)
    chance = report["scores"]["chance"]
    assert set(chance["accuracy"]) == {"colour", "shape", "count"} and 0.25 < chance["overall"] < 0.5


def test_demo_refuses_to_overwrite_without_force(tmp_path):
    (tmp_path / "demo").mkdir()
    (tmp_path / "demo" / "notes.txt").write_text("mine")
    result = CliRunner().invoke(app, ["demo", "-o", str(tmp_path / "demo")])
    assert result.exit_code == 2 and "already exists" in result.stderr
    forced = CliRunner().invoke(app, ["demo", "-o", str(tmp_path / "demo"), "--force"])
    assert forced.exit_code == 2 and "not one" in forced.stderr
    assert (tmp_path / "demo" / "notes.txt").read_text() == "mine"
    (tmp_path / "file").write_text("mine")
    refused = CliRunner().invoke(app, ["demo", "-o", str(tmp_path / "file"), "--force"])
    assert refused.exit_code == 2 and "is a file" in refused.stderr and "Traceback" not in refused.stderr
