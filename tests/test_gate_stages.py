"""Stage results are never lost (issue 14): a refused, crashed or killed `--restart` leaves the finished stage and
dpa.yaml byte for byte as they were; `--resume` refuses a damaged or foreign checkpoint by name before loading
anything; a full disk mid-run is one line; `export` never silently falls back past a started but unfinished
stage; `--from` must hold this workspace's DPA model; stage 1 trains on data with text-only samples.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from dpa_cli.cli.app import app
from dpa_cli.workspace.layout import latest_checkpoint
from dpa_cli.workspace.manifest import read_manifest
from tests.fault_kit import Runner, tree_hash
from tests.finished_stage import SMALL, own, train_args
from tests.test_train import weights

runner = CliRunner()


@pytest.fixture(scope="module")
def data(stage_data: Path) -> Path:
    """The captions and images of tests.finished_stage (the data `finished` was trained on)."""
    return stage_data


def one_line(result, code: int = 2) -> str:
    lines = result.stderr.strip().splitlines()
    assert result.exit_code == code, (result.exit_code, result.stderr[-2000:])
    assert "Traceback" not in result.stderr and lines[0].startswith("error:") and len(lines) <= 2, result.stderr
    return result.stderr


# --- --restart: the old stage stays until the new one is done --------------------------------------------
def test_a_restart_that_fails_mid_run_leaves_the_stage_and_dpa_yaml_as_they_were(finished, data, tmp_path):
    ws = own(finished, tmp_path)
    before = tree_hash(ws)
    # The first sample is fine (training starts), the second has a truncated image: refused in the first batches.
    result = runner.invoke(app, train_args(ws, data, "--restart", "--max-steps", "3", file="bad_second.json"))
    assert "truncated" in one_line(result)
    assert tree_hash(ws) == before


def test_a_killed_restart_keeps_the_stage_and_resume_finishes_it_in_its_place(finished, data, tmp_path):
    ws = own(finished, tmp_path)
    before, old_model = tree_hash(ws), weights(ws / "stage1" / "model")
    kit = Runner(tmp_path / "child.log")
    pending = ws / ".stage1.restart"
    outcome = kit.run(
        train_args(ws, data, "--restart", "--max-steps", "6"),
        kill_after=0.05,
        when=lambda: latest_checkpoint(pending) is not None,
    )
    assert outcome.killed
    assert tree_hash(ws, skip=(".stage1.restart",)) == before  # stage1/ and dpa.yaml untouched
    refused = runner.invoke(app, train_args(ws, data, "--max-steps", "6"))
    assert "--resume to continue the interrupted --restart run" in one_line(refused)
    resumed = runner.invoke(app, train_args(ws, data, "--resume", "--max-steps", "6", "--json"))
    assert resumed.exit_code == 0, resumed.stderr
    assert not pending.exists() and read_manifest(ws)["stages"]["stage1"]["steps"] == 6
    new_model = weights(ws / "stage1" / "model")
    assert any(not torch.equal(old_model[k], new_model[k]) for k in old_model)
    verified = runner.invoke(app, ["verify", str(ws)])
    assert verified.exit_code == 0, verified.stdout


def test_a_second_restart_clears_an_interrupted_one_and_replaces_the_stage(finished, data, tmp_path):
    ws = own(finished, tmp_path)
    (ws / ".stage1.restart" / "checkpoint-9").mkdir(parents=True)  # left by a killed restart
    result = runner.invoke(app, train_args(ws, data, "--restart", "--max-steps", "2", "--json"))
    assert result.exit_code == 0, result.stderr
    assert not (ws / ".stage1.restart").exists() and read_manifest(ws)["stages"]["stage1"]["steps"] == 2
    assert sorted(p.name for p in (ws / "stage1").glob("checkpoint-*")) == ["checkpoint-1", "checkpoint-2"]


# --- --resume: the checkpoint is checked before anything loads -------------------------------------------
def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: max(1, path.stat().st_size // 3)])


def _garble(path: Path) -> None:
    path.write_bytes(b"\x00garbage\xff" * 7)


def _foreign(tiny_checkpoint):
    def swap(path: Path) -> None:
        shutil.copy2(next(tiny_checkpoint("llava_next").glob("*.safetensors")), path)

    return swap


def _reshaped(path: Path) -> None:
    tensors = load_file(path)
    name = next(k for k in tensors if "multi_modal_projector" in k and k.endswith("weight"))
    tensors[name] = torch.zeros(tensors[name].shape[0] + 1, *tensors[name].shape[1:])
    save_file(tensors, path, metadata={"format": "pt"})


DAMAGE = {"truncated": _truncate, "garbled": _garble, "deleted": Path.unlink}
FILES = ["trainer_state.json", "model.safetensors", "optimizer.pt", "scheduler.pt", "rng_state.pth"]


@pytest.mark.parametrize("file", FILES)
@pytest.mark.parametrize("damage", DAMAGE)
def test_resume_from_a_damaged_checkpoint_is_refused_naming_it(finished, data, tmp_path, file, damage):
    ws = own(finished, tmp_path)
    shutil.rmtree(ws / "stage1" / "model")  # interrupted after checkpoint-3
    target = ws / "stage1" / "checkpoint-3" / file
    DAMAGE[damage](target)
    before = tree_hash(ws)
    result = runner.invoke(app, train_args(ws, data, "--resume", "--max-steps", "4"))
    stderr = one_line(result)
    assert "cannot resume from" in stderr and "checkpoint-3" in stderr, stderr
    assert file in stderr or (damage == "deleted" and "holds no weights" in stderr), stderr
    assert tree_hash(ws) == before


@pytest.mark.parametrize("how", ["foreign", "reshaped"])
def test_resume_from_another_models_checkpoint_is_refused(finished, data, tmp_path, tiny_checkpoint, how):
    ws = own(finished, tmp_path)
    shutil.rmtree(ws / "stage1" / "model")
    ({"foreign": _foreign(tiny_checkpoint), "reshaped": _reshaped}[how])(
        ws / "stage1" / "checkpoint-3" / "model.safetensors"
    )
    before = tree_hash(ws)
    stderr = one_line(runner.invoke(app, train_args(ws, data, "--resume", "--max-steps", "4")))
    assert "comes from another model" in stderr and "model.safetensors" in stderr
    assert tree_hash(ws) == before


# --- a full disk while training ----------------------------------------------------------------------------
def test_a_full_disk_while_training_is_one_line_and_loses_nothing(finished, data, tmp_path):
    ws = own(finished, tmp_path)
    before = tree_hash(ws)
    log = tmp_path / "log"
    # Room for dpa.yaml and metrics, not for a checkpoint's weights (the model file is about 1 MB).
    code = Runner(log, file_size_limit=200_000).run(train_args(ws, data, "--restart", "--max-steps", "2")).code
    text = log.read_text()
    errors = [line for line in text.splitlines() if line.startswith("error:")]
    assert code == 1 and "Traceback" not in text, text[-3000:]
    assert len(errors) == 1 and ("File too large" in errors[0] or "No space left" in errors[0]), text[-2000:]
    assert "free some disk space" in text
    assert tree_hash(ws, skip=(".stage1.restart",)) == before
    assert not (ws / ".stage1.restart").exists()  # it held no checkpoint yet: nothing to resume, removed


# --- export: the latest stage must be finished ------------------------------------------------------------
def _killed_before_its_result(ws: Path) -> None:
    shutil.rmtree(ws / "stage1" / "model")


def _killed_before_a_checkpoint(ws: Path) -> None:
    for folder in [p for p in (ws / "stage1").iterdir() if p.is_dir()]:  # metrics.jsonl stays
        shutil.rmtree(folder)


def _stage2_started(ws: Path) -> None:
    (ws / "stage2").mkdir()
    (ws / "stage2" / "metrics.jsonl").write_text("")


def _recorded_but_gone(ws: Path) -> None:
    shutil.rmtree(ws / "stage1")


@pytest.mark.parametrize(
    "state",
    [_killed_before_its_result, _killed_before_a_checkpoint, _stage2_started, _recorded_but_gone],
    ids=lambda f: f.__name__.strip("_"),
)
@pytest.mark.parametrize("command", ["export", "generate"])
def test_a_started_but_unfinished_stage_is_never_skipped_silently(finished, data, tmp_path, state, command):
    ws = own(finished, tmp_path)
    state(ws)
    before = tree_hash(ws)
    if command == "export":
        argv = ["export", "-w", str(ws), "-o", str(tmp_path / "out"), "--no-verify"]
    else:
        argv = ["generate", str(ws), "--image", str(data / "images" / "red.png"), "--prompt", "Hi"]
    stderr = one_line(runner.invoke(app, argv))
    assert "was started in" in stderr and "but has not finished" in stderr, stderr
    assert tree_hash(ws) == before and not (tmp_path / "out").exists()


# --- --from ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("source", ["llava_next", "causal_lm_qwen3", "qwen2_5_vl", "other_width"])
def test_from_a_folder_that_is_not_this_workspaces_dpa_model_is_refused(
    finished, data, tiny_checkpoint, tmp_path, source, dpa_workspace
):
    folder = dpa_workspace("llama3_qwen") / "model" if source == "other_width" else tiny_checkpoint(source)
    ws = own(finished, tmp_path)
    before = tree_hash(ws)
    argv = [
        "train",
        "--stage",
        "2",
        "-w",
        str(ws),
        "--data",
        str(data / "captions.json"),
        "--image-root",
        str(data / "images"),
        *SMALL,
        "--from",
        str(folder),
        "--max-steps",
        "1",
    ]
    stderr = one_line(runner.invoke(app, argv))
    assert stderr.startswith(f"error: --from {folder} holds a"), stderr
    assert any(words in stderr for words in ("not the DPA model of this workspace", "another model than this"))
    assert tree_hash(ws) == before


# --- text-only samples in stage 1 -------------------------------------------------------------------------
def test_stage1_on_data_with_text_only_samples_trains_phi(finished, data, tmp_path):
    ws = own(finished, tmp_path)
    result = runner.invoke(app, train_args(ws, data, "--restart", "--max-steps", "3", "--json", file="with_text.json"))
    assert result.exit_code == 0, result.stderr[-3000:]
    summary = json.loads(result.stdout)
    assert summary["text_only_batches"][0] >= 1 and summary["steps"] == 3
    before, after = weights(ws / "model"), weights(ws / "stage1" / "model")
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all("multi_modal_projector" in k or "perceiver" in k for k in changed), changed


def test_from_a_folder_holding_this_workspaces_model_trains(finished, data, tmp_path):
    ws = own(finished, tmp_path)
    copy = Path(shutil.copytree(ws / "stage1" / "model", tmp_path / "elsewhere"))
    argv = [
        "train",
        "--stage",
        "2",
        "-w",
        str(ws),
        "--data",
        str(data / "captions.json"),
        "--image-root",
        str(data / "images"),
        *SMALL,
        "--from",
        str(copy),
        "--max-steps",
        "1",
        "--json",
    ]
    result = runner.invoke(app, argv)
    assert result.exit_code == 0, result.stderr[-2000:]
    assert json.loads(result.stdout)["source"] == str(copy)
