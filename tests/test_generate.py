"""`dpa generate` and `dpa chat`: the workspace's stage as trained (LoRA unmerged) and its export answer with the
same greedy tokens; chat keeps the conversation, takes images by path and streams its replies."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from dpa_cli.cli.app import app
from dpa_cli.generate import ChatSession, open_image, open_runnable, reply, user_turn
from tests.tiny_processors import example_image
from tests.trained_workspace import add_lora_stage2, add_stage1, upgraded

runner = CliRunner()
PROMPT = "What is in the picture?"


@pytest.fixture(scope="module")
def ws(tiny_checkpoint, tmp_path_factory) -> Path:
    """A LoRA stage-2 workspace with its export (verified in test_export; here only its tokens matter)."""
    ws = upgraded(tiny_checkpoint, "llava_next", tmp_path_factory.mktemp("gen") / "ws")
    add_stage1(ws)
    add_lora_stage2(ws, seed=1)
    assert runner.invoke(app, ["export", "-w", str(ws), "--no-verify"]).exit_code == 0
    example_image(50, 40).save(ws.parent / "image.png")
    return ws


def generate(*args: str) -> dict:
    result = runner.invoke(app, ["generate", *args, "--max-new-tokens", "6", "--json"])
    assert result.exit_code == 0, result.stderr
    return json.loads(result.stdout)


def test_the_workspace_as_trained_and_its_export_give_the_same_greedy_tokens(ws):
    image = str(ws.parent / "image.png")
    trained = generate(str(ws), "-i", image, "-p", PROMPT)
    exported = generate(str(ws / "export"), "-i", image, "-p", PROMPT)
    assert trained["stage"] == "stage2" and trained["adapter"] == str(ws / "stage2" / "adapter")
    assert exported["adapter"] is None and exported["device"] == "cpu"
    assert len(trained["token_ids"]) == 6 and trained["token_ids"] == exported["token_ids"]
    assert trained["text"] == exported["text"]


def test_a_stage_is_found_by_flag_by_folder_and_by_its_model_folder(ws):
    image = str(ws.parent / "image.png")
    by_flag = generate(str(ws), "--stage", "1", "-i", image, "-p", PROMPT)
    by_folder = generate(str(ws / "stage1"), "-i", image, "-p", PROMPT)
    assert by_flag["model"] == by_folder["model"] == str(ws / "stage1" / "model")
    assert by_flag["token_ids"] == by_folder["token_ids"]
    # A LoRA stage's model folder alone would be the model without its adapter: it is applied.
    by_model_folder = generate(str(ws / "stage2" / "model"), "-i", image, "-p", PROMPT)
    assert by_model_folder["adapter"] == str(ws / "stage2" / "adapter")


def test_generate_streams_the_reply_to_stdout(ws):
    image = str(ws.parent / "image.png")
    expected = generate(str(ws), "-i", image, "-p", PROMPT)["text"]
    result = runner.invoke(app, ["generate", str(ws), "-i", image, "-p", PROMPT, "--max-new-tokens", "6"])
    assert result.exit_code == 0, result.stderr
    assert result.stdout == expected + "\n"
    assert "stage2, LoRA adapter applied unmerged" in result.stderr


def test_generate_without_an_image_and_with_sampling(ws):
    assert len(generate(str(ws), "-p", "Hello", "--temperature", "0.7")["token_ids"]) <= 6


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["-i", "{dir}/missing.png"], "no such image"),
        (["-i", "{dir}/ws/dpa.yaml"], "not a readable image"),
        (["--device", "tpu"], "--device 'tpu' is not one of cpu, cuda"),
        (["--stage", "3"], "stages 1 and 2"),
    ],
)
def test_generate_refusals_name_the_problem(ws, args, message):
    result = runner.invoke(app, ["generate", str(ws), "-p", PROMPT, *[a.format(dir=ws.parent) for a in args]])
    assert result.exit_code == 2 and message in result.stderr, result.stderr


def test_stage_is_for_workspaces_and_cuda_must_exist(ws):
    result = runner.invoke(app, ["generate", str(ws / "export"), "-p", PROMPT, "--stage", "1"])
    assert result.exit_code == 2 and "--stage applies to a workspace" in result.stderr
    if not torch.cuda.is_available():
        result = runner.invoke(app, ["generate", str(ws), "-p", PROMPT, "--device", "cuda"])
        assert result.exit_code == 2 and "no CUDA GPU" in result.stderr


def test_a_chat_session_keeps_the_conversation_and_streams(ws):
    runnable = open_runnable(str(ws))
    session = ChatSession(runnable, max_new_tokens=5)
    session.add_image(ws.parent / "image.png")
    pieces: list[str] = []
    first = session.ask(PROMPT, on_text=pieces.append)
    assert "".join(pieces) == first["text"] and session.pending == []
    second = session.ask("And the colours?")
    assert [m["role"] for m in session.messages] == ["user", "assistant", "user", "assistant"]
    image = open_image(ws.parent / "image.png")
    history = [
        user_turn(PROMPT, [image]),
        {"role": "assistant", "content": [{"type": "text", "text": first["text"]}]},
        user_turn("And the colours?", []),
    ]
    assert reply(runnable, history, max_new_tokens=5)["token_ids"] == second["token_ids"]


def test_chat_reads_turns_and_commands_from_stdin(ws):
    image = ws.parent / "image.png"
    lines = [f"/image {image}", PROMPT, "/image nowhere.png", "/bogus", "/reset", "Hello again", "/exit", "never read"]
    result = runner.invoke(app, ["chat", str(ws), "--max-new-tokens", "6"], input="\n".join(lines) + "\n")
    assert result.exit_code == 0, result.stderr
    expected = generate(str(ws), "-i", str(image), "-p", PROMPT)["text"]
    replies = result.stdout.split("\n")
    assert replies[0] == expected and len(replies) == 3 and replies[2] == ""  # two replies, each ending a line
    assert "image added to your next message" in result.stderr and "no such image" in result.stderr
    assert "unknown command '/bogus'" in result.stderr and "conversation cleared" in result.stderr


@pytest.mark.parametrize("command", ["export", "generate", "chat"])
def test_help_has_examples(command):
    result = runner.invoke(app, [command, "--help"], env={"COLUMNS": "120"})
    assert result.exit_code == 0 and "Examples" in result.stdout and "[default:" in result.stdout
