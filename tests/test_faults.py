"""Nothing lost: `dpa upgrade`, `dpa export` and `dpa train` SIGKILLed at seeded random moments, and a full disk.

After every kill the previous state is byte for byte what it was (or the new one, complete and matching
its manifest); training resumes with --resume to the weights of an uninterrupted run; the next successful
command leaves no temporary folder behind. A disk that fills up mid-write gives a one-line error and
changes nothing. Longer runs: `python scripts/fault_trials.py --trials N`.
"""

from __future__ import annotations

import errno
import os
import random
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from dpa_cli.checksums import verify_path
from dpa_cli.cli.app import app
from dpa_cli.workspace.layout import latest_checkpoint
from dpa_cli.workspace.manifest import read_manifest
from tests.fault_kit import Runner, leftovers, tree_hash

SEED = int(os.environ.get("DPA_FAULT_SEED", "20260515"))
KILLS = 5
SMALL = [
    "--set",
    "global_batch_size=4",
    "--set",
    "per_device_train_batch_size=2",
    "--set",
    "logging_steps=1",
    "--set",
    "max_length=512",
    "--set",
    "gradient_checkpointing=false",
    "--set",
    "save_steps=1",
    "--set",
    "learning_rate=1e-2",
    "--max-steps",
    "12",
]  # # room for every kill on a fast machine


@pytest.fixture(scope="module")
def kit(tmp_path_factory) -> Runner:
    runner = Runner(tmp_path_factory.mktemp("faults") / "children.log")
    assert runner.run(["--version"]).code == 0  # starts the fork server, so no trial's timing includes it
    return runner


@pytest.fixture(scope="module")
def inputs(tiny_checkpoint) -> list[str]:
    return [str(tiny_checkpoint("llava_next")), "--perceiver", f"vit=target,lm={tiny_checkpoint('causal_lm_qwen3')}"]


def _no_leftovers(ws: Path) -> None:
    assert leftovers(ws) == [], f"temporaries left after a successful run: {leftovers(ws)}"


def test_upgrade_killed_anywhere_leaves_the_old_workspace_or_the_complete_new_one(kit, inputs, tmp_path):
    ws = tmp_path / "ws"
    upgrade = ["upgrade", *inputs, "-o", ws, "--no-verify-load"]
    assert kit.run(upgrade).code == 0
    warm = kit.run([*upgrade, "--force"])  # the first run pays one-off costs: time the kills on a warm one
    assert warm.code == 0
    rng, kills = random.Random(SEED), 0
    for trial in range(1, KILLS + 1):
        before = tree_hash(ws)
        outcome = kit.run([*upgrade, "--force", "--seed", trial], kill_after=rng.uniform(0.05, 0.8) * warm.seconds)
        kills += outcome.killed
        if tree_hash(ws) != before:  # the kill came after the swap: the new workspace, whole
            assert verify_path(ws).clean and read_manifest(ws)["options"]["seed"] == trial
    assert kills >= KILLS - 1, f"only {kills} kills landed before the command ended"
    assert kit.run([*upgrade, "--force", "--seed", 0]).code == 0
    _no_leftovers(ws)
    assert verify_path(ws).clean


def test_export_killed_anywhere_never_touches_the_workspace_and_keeps_the_old_export_or_the_new(kit, inputs, tmp_path):
    ws = tmp_path / "ws"
    assert kit.run(["upgrade", *inputs, "-o", ws, "--no-verify-load"]).code == 0
    export = ["export", "-w", ws, "--no-verify"]
    assert kit.run(export).code == 0
    warm = kit.run([*export, "--force"])  # the first run pays one-off costs: time the kills on a warm one
    assert warm.code == 0
    outside = ("export", ".export.dpa-")  # the export and its temporary, which the next export sweeps
    workspace = tree_hash(ws, skip=outside)
    rng, kills = random.Random(SEED + 1), 0
    for trial in range(1, KILLS + 1):
        before = tree_hash(ws / "export")
        dtype = "bf16" if trial % 2 else "fp32"
        outcome = kit.run([*export, "--force", "--dtype", dtype], kill_after=rng.uniform(0.05, 0.8) * warm.seconds)
        kills += outcome.killed
        assert tree_hash(ws, skip=outside) == workspace
        if tree_hash(ws / "export") != before:
            assert verify_path(ws / "export").clean
    assert kills >= KILLS - 1, f"only {kills} kills landed before the command ended"
    assert kit.run([*export, "--force"]).code == 0
    _no_leftovers(ws)
    assert verify_path(ws).clean


def _train(ws: Path, data: Path, resume: bool) -> list:
    return [
        "train",
        "--stage",
        "1",
        "--workspace",
        ws,
        "--data",
        data / "captions.json",
        "--image-root",
        data / "images",
        *SMALL,
        *(["--resume"] if resume else []),
    ]


def test_train_killed_anywhere_resumes_to_the_uninterrupted_weights(kit, inputs, tmp_path):
    import dpa_cli.model  # noqa: F401  registers the DPA classes `weights` reads the folders with
    from tests.test_train import COLOURS, weights

    data = _captions(tmp_path / "data", COLOURS)
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    assert kit.run(["upgrade", *inputs, "-o", straight, "--no-verify-load"]).code == 0
    shutil.copytree(straight, killed)
    reference = kit.run(_train(straight, data, resume=False))
    assert reference.code == 0
    # Kill points: while the run sets up (seconds in), and mid-step (just after checkpoint-K is renamed in).
    rng, kills = random.Random(SEED + 2), 0
    plan = rng.sample(["setup", "setup", "step", "step", "step"], KILLS)
    for kind in plan:
        manifest = (killed / "dpa.yaml").read_bytes()
        checkpoint = latest_checkpoint(killed / "stage1") if (killed / "stage1").is_dir() else None
        done = int(checkpoint.name.split("-")[1]) if checkpoint else 0
        if kind == "setup":
            when, delay = None, rng.uniform(0.05, 0.4) * reference.seconds
        else:
            when, delay = (killed / "stage1" / f"checkpoint-{done + 1}").is_dir, rng.uniform(0.0, 0.15)
        outcome = kit.run(_train(killed, data, resume=checkpoint is not None), kill_after=delay, when=when)
        kills += outcome.killed
        if outcome.killed and not (killed / "stage1" / "model").is_dir():
            assert (killed / "dpa.yaml").read_bytes() == manifest  # dpa.yaml changes only once the stage is done
    assert kills == KILLS, f"training finished after {kills} kills"
    resume = latest_checkpoint(killed / "stage1") is not None
    assert kit.run(_train(killed, data, resume=resume)).code == 0
    _no_leftovers(killed)
    assert verify_path(killed).clean
    a, b = weights(straight / "stage1" / "model"), weights(killed / "stage1" / "model")
    assert max(float((a[k] - b[k]).abs().max()) for k in a) <= 1e-5


def _captions(root: Path, colours: dict) -> Path:
    import json

    from PIL import Image

    (root / "images").mkdir(parents=True)
    captions = []
    for i, (name, rgb) in enumerate(colours.items()):
        Image.new("RGB", (48 + 8 * i, 40), rgb).save(root / "images" / f"{name}.png")
        captions.append(
            {
                "id": f"cap-{name}",
                "image": f"{name}.png",
                "conversations": [
                    {"from": "human", "value": "<image>\nDescribe the image."},
                    {"from": "gpt", "value": f"A {name} picture."},
                ],
            }
        )
    (root / "captions.json").write_text(json.dumps(captions * 2))
    return root


# --- a full disk ----------------------------------------------------------------------------------------


class FullDisk:
    """The file system fills up after `room` more bytes: writes through Python files and the kernel's
    copy_file_range and sendfile then fail with ENOSPC, as they would on a real full disk."""

    def __init__(self, monkeypatch, room: int):
        import builtins

        from dpa_cli.checkpoint import writer

        self.room, real_open, real_copy, real_send = room, builtins.open, os.copy_file_range, os.sendfile

        def spend(count: int, name) -> None:
            if count > self.room:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), name)
            self.room -= count

        class File:
            def __init__(self, handle):
                self.handle = handle

            def write(self, data):
                spend(len(data) if isinstance(data, (str, bytes)) else memoryview(data).nbytes, self.handle.name)
                return self.handle.write(data)

            def __getattr__(self, name):
                return getattr(self.handle, name)

            def __enter__(self):
                return self

            def __exit__(self, *exc):
                return self.handle.__exit__(*exc)

        def full_open(file, mode="r", *args, **kwargs):
            handle = real_open(file, mode, *args, **kwargs)
            return File(handle) if any(flag in mode for flag in "wax+") else handle

        def full_copy(src, dst, count, offset_src=None, offset_dst=None):
            spend(count, None)
            return real_copy(src, dst, count, offset_src, offset_dst)

        def full_send(out_fd, in_fd, offset, count, *args, **kwargs):
            spend(count, None)
            return real_send(out_fd, in_fd, offset, count, *args, **kwargs)

        for module in (writer, __import__("dpa_cli.checkpoint.atomic", fromlist=["_"])):
            monkeypatch.setattr(module, "open", full_open, raising=False)
        monkeypatch.setattr(os, "copy_file_range", full_copy)
        monkeypatch.setattr(os, "sendfile", full_send)
        for name in ("write_text", "write_bytes"):  # side files (config.json, index) go through pathlib
            real = getattr(Path, name)

            def through(self, data, *args, _real=real, **kwargs):
                spend(len(data), str(self))
                return _real(self, data, *args, **kwargs)

            monkeypatch.setattr(Path, name, through)


def _refused_whole(result, ws_parent: Path) -> None:
    assert result.exit_code == 1, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) <= 2 and "No space left on device" in lines[0] and "Traceback" not in result.stderr
    assert not [p.name for p in ws_parent.glob(".*dpa-*")], "a temporary survived the failure"


@pytest.mark.parametrize("room", [0, 20_000, 400_000])
def test_a_full_disk_during_upgrade_fails_in_one_line_and_writes_nothing(monkeypatch, inputs, tmp_path, room):
    ws = tmp_path / "ws"
    FullDisk(monkeypatch, room)
    result = CliRunner().invoke(app, ["upgrade", *inputs, "-o", str(ws), "--no-verify-load"])
    _refused_whole(result, tmp_path)
    assert not ws.exists()


def test_a_full_disk_during_upgrade_force_keeps_the_old_workspace(monkeypatch, inputs, tmp_path):
    ws = tmp_path / "ws"
    assert CliRunner().invoke(app, ["upgrade", *inputs, "-o", str(ws), "--no-verify-load"]).exit_code == 0
    before = tree_hash(ws)
    FullDisk(monkeypatch, 300_000)
    result = CliRunner().invoke(app, ["upgrade", *inputs, "-o", str(ws), "--no-verify-load", "--force", "--seed", "1"])
    _refused_whole(result, tmp_path)
    assert tree_hash(ws) == before


@pytest.mark.parametrize("room", [0, 100_000])
def test_a_full_disk_during_export_keeps_the_workspace_and_the_old_export(monkeypatch, inputs, tmp_path, room):
    ws = tmp_path / "ws"
    runner = CliRunner()
    assert runner.invoke(app, ["upgrade", *inputs, "-o", str(ws), "--no-verify-load"]).exit_code == 0
    assert runner.invoke(app, ["export", "-w", str(ws), "--no-verify"]).exit_code == 0
    before = tree_hash(ws)
    FullDisk(monkeypatch, room)
    result = runner.invoke(app, ["export", "-w", str(ws), "--no-verify", "--force", "--dtype", "bf16"])
    _refused_whole(result, ws)
    assert tree_hash(ws) == before


def test_a_full_disk_while_dpa_yaml_is_replaced_keeps_the_old_one(monkeypatch, inputs, tmp_path):
    from dpa_cli.workspace.manifest import write_manifest

    ws = tmp_path / "ws"
    assert CliRunner().invoke(app, ["upgrade", *inputs, "-o", str(ws), "--no-verify-load"]).exit_code == 0
    before = tree_hash(ws)
    manifest = read_manifest(ws)
    FullDisk(monkeypatch, 100)
    with pytest.raises(OSError) as failure:
        write_manifest(ws, {**manifest, "note": "x" * 1000})
    assert failure.value.errno == errno.ENOSPC
    assert tree_hash(ws) == before and not list(ws.glob(".*dpa-tmp*"))
