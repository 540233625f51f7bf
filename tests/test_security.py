"""Nothing let in: no pickle is unpickled, no model code but dpa's own runs, no socket is opened offline.

(Image paths that leave --image-root are refused in tests/test_bad_inputs.py.)
"""

from __future__ import annotations

import hashlib
import json
import pickle
import re
import shutil
import socket
from pathlib import Path

import pytest
import yaml
from blake3 import blake3
from PIL import Image
from typer.testing import CliRunner

from dpa_cli.cli.app import app
from tests.factories import copy_checkpoint

runner = CliRunner()
PACKAGE = Path(__file__).resolve().parents[1] / "dpa_cli"
# Text shown to users (card.py, export_cmd.py), and probe_check.py: the fresh process where plain transformers
# reloads the export dpa has just written, as a user would.
TEXT_ONLY = ("card.py", "export_cmd.py", "probe_check.py")


class Booby:
    """Unpickling this runs code: it writes `marker` (what a malicious checkpoint would do, harmlessly)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.write_text, (self.marker, "unpickled"))


def test_no_pickle_is_ever_unpickled(tiny_checkpoint, tmp_path):
    marker = tmp_path / "pwned"
    both = copy_checkpoint(tiny_checkpoint("llava_next"), tmp_path / "both")
    (both / "pytorch_model.bin").write_bytes(pickle.dumps({"w": Booby(marker)}))
    only = tmp_path / "only"
    only.mkdir()
    shutil.copy(both / "config.json", only / "config.json")
    (only / "pytorch_model.bin").write_bytes(pickle.dumps({"w": Booby(marker)}))
    perceiver = f"vit=target,lm={tiny_checkpoint('causal_lm_qwen3')}"
    assert runner.invoke(app, ["inspect", str(both), "--json"]).exit_code == 0
    result = runner.invoke(app, ["upgrade", str(both), "--perceiver", perceiver, "-o", str(tmp_path / "ws")])
    assert result.exit_code == 0, result.output
    refused = runner.invoke(app, ["upgrade", str(only), "--perceiver", perceiver, "-o", str(tmp_path / "ws2")])
    assert refused.exit_code == 2 and "safetensors" in refused.stderr
    assert not marker.exists()


def test_the_library_unpickles_nothing_and_trusts_no_input_code():
    """Every torch.load passes weights_only=True; remote code is trusted only through dpa_cli.loading."""
    for path in PACKAGE.rglob("*.py"):
        text = path.read_text(encoding="utf-8")
        for call in re.findall(r"torch\.load\([^)]*\)", text):
            assert "weights_only=True" in call, f"{path}: {call}"
        assert not re.search(r"\bpickle\.loads?\(", text), path
        if path.parent.name not in ("model", "bench") and path.name not in TEXT_ONLY:
            loads = re.findall(r"from_pretrained\([^)]*trust_remote_code=True", text)
            assert not loads, f"{path} trusts a folder's code without checking it: {loads}"


def _tampered(dpa_workspace, tmp_path: Path, marker: Path) -> Path:
    folder = shutil.copytree(dpa_workspace("next_qwen") / "model", tmp_path / "tampered")
    with open(folder / "modeling_dpa.py", "a", encoding="utf-8") as handle:
        handle.write(f"\n__import__('pathlib').Path({str(marker)!r}).write_text('ran')\n")
    return folder


def test_a_folders_altered_model_code_never_runs(dpa_workspace, tmp_path):
    marker = tmp_path / "ran"
    folder = _tampered(dpa_workspace, tmp_path, marker)
    image = tmp_path / "red.png"
    Image.new("RGB", (40, 32), (220, 30, 30)).save(image)
    ask = ["generate", str(folder), "--image", str(image), "--prompt", "Colour?", "--max-new-tokens", "2", "--json"]
    result = runner.invoke(app, ask)
    assert result.exit_code == 0, result.output
    assert not marker.exists(), "the folder's altered model code ran"
    from dpa_cli.loading import may_run_code

    assert may_run_code(dpa_workspace("next_qwen") / "model")  # dpa's own code, byte for byte
    assert not may_run_code(folder)
    assert may_run_code(folder, allow_code=True)  # --trust-remote-code: the user's decision
    assert runner.invoke(app, [*ask, "--trust-remote-code"]).exit_code == 0


def test_a_whole_pipeline_opens_no_socket_offline(monkeypatch, tiny_checkpoint, tmp_path):
    attempts: list[str] = []

    def refuse(*args, **kwargs):
        attempts.append(repr(args[:2]))
        raise OSError("network access during an offline run")

    for name in ("connect", "connect_ex"):
        monkeypatch.setattr(socket.socket, name, refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")

    ws, data = tmp_path / "ws", tmp_path / "data"
    (data / "images").mkdir(parents=True)
    Image.new("RGB", (48, 40), (30, 60, 220)).save(data / "images" / "blue.png")
    sample = {
        "image": "blue.png",
        "conversations": [
            {"from": "human", "value": "<image>\nDescribe it."},
            {"from": "gpt", "value": "A blue picture."},
        ],
    }
    (data / "captions.json").write_text(json.dumps([{"id": f"s{i}", **sample} for i in range(4)]))
    perceiver = f"vit=target,lm={tiny_checkpoint('causal_lm_qwen3')}"
    steps = [
        ["upgrade", str(tiny_checkpoint("llava_next")), "--perceiver", perceiver, "-o", str(ws)],
        [
            "train",
            "--stage",
            "1",
            "-w",
            str(ws),
            "--data",
            str(data / "captions.json"),
            "--image-root",
            str(data / "images"),
            "--max-steps",
            "1",
            "--set",
            "global_batch_size=2",
            "--set",
            "per_device_train_batch_size=2",
            "--set",
            "gradient_checkpointing=false",
        ],
        ["export", "-w", str(ws), "--no-verify"],  # --verify reloads in a child process, outside this check
        [
            "generate",
            str(ws / "export"),
            "--image",
            str(data / "images" / "blue.png"),
            "--prompt",
            "Colour?",
            "--max-new-tokens",
            "2",
        ],
        ["verify", str(ws)],
    ]
    for args in steps:
        result = runner.invoke(app, args)
        assert result.exit_code == 0, (args[0], result.output)
    assert attempts == []


@pytest.mark.parametrize("edit", ["changed", "missing", "extra"])
def test_verify_names_every_file_that_changed_went_missing_or_appeared(dpa_workspace, tmp_path, edit):
    ws = shutil.copytree(dpa_workspace("next_qwen"), tmp_path / "ws")
    assert runner.invoke(app, ["verify", str(ws)]).exit_code == 0
    target = ws / "model" / "config.json"
    if edit == "changed":
        target.write_text(target.read_text() + " ")
    elif edit == "missing":
        target.unlink()
    else:
        target = ws / "model" / "notes.txt"
        target.write_text("hi")
    result = runner.invoke(app, ["verify", str(ws), "--json"])
    assert result.exit_code == 1
    report = json.loads(result.stdout)
    assert report[edit] == [f"model/{target.name}"] and not report["clean"]
    assert runner.invoke(app, ["verify", str(tmp_path / "nowhere")]).exit_code == 2


def test_verify_checks_each_digest_with_the_algorithm_it_names(dpa_workspace, tmp_path):
    """New records hold BLAKE3 digests; records of earlier versions (bare sha256) and `sha256:` ones (inputs taken
    from the Hugging Face cache) are checked with sha256; an algorithm dpa does not know is refused by key."""
    ws = shutil.copytree(dpa_workspace("next_qwen"), tmp_path / "ws")
    manifest = yaml.safe_load((ws / "dpa.yaml").read_text())
    sums = manifest["checksums"]
    assert sums and all(value.startswith("blake3:") for value in sums.values())
    assert sums["model/config.json"] == "blake3:" + blake3((ws / "model/config.json").read_bytes()).hexdigest()
    names = sorted(sums)
    for i, name in enumerate(names):  # every other file as an older dpa wrote it, the rest labelled sha256
        sha = hashlib.sha256((ws / name).read_bytes()).hexdigest()
        sums[name] = sha if i % 2 else f"sha256:{sha}"
    (ws / "dpa.yaml").write_text(yaml.safe_dump(manifest, sort_keys=False))
    assert runner.invoke(app, ["verify", str(ws)]).exit_code == 0
    for name in names[:2]:  # one bare, one labelled
        (ws / name).write_bytes((ws / name).read_bytes() + b" ")
    report = json.loads(runner.invoke(app, ["verify", str(ws), "--json"]).stdout)
    assert report["changed"] == names[:2]
    sums[names[0]] = "md5:" + "0" * 64
    (ws / "dpa.yaml").write_text(yaml.safe_dump(manifest, sort_keys=False))
    result = runner.invoke(app, ["verify", str(ws)])
    assert result.exit_code == 2 and "must be a file digest" in result.output and names[0] in result.output
