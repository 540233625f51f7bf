"""Launchers run a stage as docs/training.md shows them: the DeepSpeed launcher with a hostfile (`deepspeed
--module dpa_cli train ...`, which passes `--local_rank` to every worker) and a two-node torchrun rendezvous,
simulated as two launcher processes on localhost with one worker each. The commands are the documented ones;
only the node addresses are localhost. (`--nproc N`, dpa's own relaunch: tests/test_train.py.)"""

from __future__ import annotations

import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

# One optimizer step on 2 samples (one per process for two nodes), no checkpoint: the launch is under test.
TINY = [
    "--set",
    "global_batch_size=2",
    "--set",
    "per_device_train_batch_size=1",
    "--set",
    "max_length=512",
    "--set",
    "gradient_checkpointing=false",
    "--set",
    "save_steps=1000",
    "--set",
    "logging_steps=1",
    "--set",
    "report_to=none",
    "--max-steps",
    "1",
]
TIMEOUT = 300


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture
def workspace(dpa_workspace, tmp_path) -> Path:
    return Path(shutil.copytree(dpa_workspace("next_qwen"), tmp_path / "ws"))


def stage_args(ws: Path, data: Path) -> list[str]:
    return [
        "train",
        "--stage",
        "1",
        "-w",
        str(ws),
        "--data",
        str(data / "captions.json"),
        "--image-root",
        str(data / "images"),
        *TINY,
    ]


def finished_with(ws: Path, processes: int) -> dict:
    """The stage's record in dpa.yaml, after checking that its result is in place."""
    assert (ws / "stage1" / "model" / "config.json").is_file()
    stage = yaml.safe_load((ws / "dpa.yaml").read_text())["stages"]["stage1"]
    assert stage["world_size"] == processes and stage["steps"] == 1
    return stage


def test_deepspeed_launcher_with_a_hostfile_runs_a_stage(workspace, stage_data, tmp_path):
    """`deepspeed --hostfile FILE --no_ssh --node_rank 0 --module dpa_cli train CONFIG ...`: the launcher reads the
    hostfile and starts `python -m dpa_cli --local_rank=0 train ...` with the process group's environment; the
    stage trains with the world the launcher made (the config file's `nproc: 2` does not relaunch a worker).
    The ZeRO engine under a launcher: tests/test_train.py, tests/test_distributed_faults.py."""
    hostfile, config = tmp_path / "hostfile", tmp_path / "run.yaml"
    hostfile.write_text("localhost slots=1\n")
    config.write_text(
        yaml.safe_dump(
            {
                "stage": 1,
                "workspace": str(workspace),
                "data": str(stage_data / "captions.json"),
                "image_root": str(stage_data / "images"),
                "nproc": 2,
            }
        )
    )
    command = [
        sys.executable,
        "-m",
        "deepspeed.launcher.runner",
        "--hostfile",
        str(hostfile),
        "--no_ssh",
        "--node_rank",
        "0",
        "--master_addr",
        "127.0.0.1",
        "--master_port",
        str(free_port()),
        "--module",
        "dpa_cli",
        "train",
        str(config),
        *TINY,
        "--set",
        "global_batch_size=1",
    ]
    done = subprocess.run(command, capture_output=True, text=True, timeout=TIMEOUT, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "--local_rank=0" in done.stderr + done.stdout  # the launcher's own line: the worker got the flag
    finished_with(workspace, 1)


def test_two_nodes_on_localhost_torchrun_rendezvous_runs_a_stage(workspace, stage_data, tmp_path):
    """Two `torchrun --nnodes 2 --node-rank N --rdzv-backend c10d --rdzv-endpoint HOST:PORT` launchers, one
    process each, meet at the rendezvous and train one stage as a world of 2; only global rank 0 writes."""
    endpoint = f"localhost:{free_port()}"
    nodes = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "torch.distributed.run",
                "--nnodes",
                "2",
                "--node-rank",
                str(rank),
                "--nproc-per-node",
                "1",
                "--rdzv-backend",
                "c10d",
                "--rdzv-endpoint",
                endpoint,
                "--rdzv-id",
                "dpa-test",
                "-m",
                "dpa_cli",
                *stage_args(workspace, stage_data),
                "--json",
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=tmp_path,
        )
        for rank in (0, 1)
    ]
    try:
        outputs = [node.communicate(timeout=TIMEOUT) for node in nodes]
    finally:
        for node in nodes:
            node.kill() if node.poll() is None else None
    for node, (_, stderr) in zip(nodes, outputs):
        assert node.returncode == 0, stderr[-3000:]
    summaries = [stdout for stdout, _ in outputs if '"world_size": 2' in stdout]
    assert len(summaries) == 1, "exactly one node (global rank 0) reports the run"
    finished_with(workspace, 2)
