"""`dpa train`: what each stage changes (bit for bit), chaining, LoRA, refusals, 2-process DeepSpeed (resume after
SIGKILL: test_faults.py)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from PIL import Image
from safetensors.torch import load_file
from typer.testing import CliRunner

from dpa_cli.checkpoint.naming import meta_model, rename_to_memory
from dpa_cli.cli.app import app
from dpa_cli.parts import part_of, perceiver_family

runner = CliRunner()
# Small and fast: 4 samples per step, 2 per device, no checkpoints unless a test asks.
SMALL = [
    "--set",
    "global_batch_size=4",
    "--set",
    "per_device_train_batch_size=2",
    "--set",
    "logging_steps=1",
    "--set",
    "save_steps=1000",
    "--set",
    "max_length=512",
    "--set",
    "gradient_checkpointing=false",
]
COLOURS = {"red": (220, 30, 30), "green": (30, 200, 60), "blue": (30, 60, 220), "yellow": (230, 220, 40)}


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    """Images of one colour each, captions (stage 1) and instructions with a text-only turn (stage 2)."""
    root = tmp_path_factory.mktemp("data")
    (root / "images").mkdir()
    captions, instructions = [], []
    for i, (name, rgb) in enumerate(COLOURS.items()):
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
        instructions.append(
            {
                "id": f"ins-{name}",
                "image": f"{name}.png",
                "conversations": [
                    {"from": "human", "value": "<image>\nWhat colour is it?"},
                    {"from": "gpt", "value": f"It is {name}."},
                    {"from": "human", "value": "Are you sure?"},
                    {"from": "gpt", "value": "Yes."},
                ],
            }
        )
    instructions.append(
        {
            "id": "text-only",
            "conversations": [{"from": "human", "value": "Say hello."}, {"from": "gpt", "value": "Hello."}],
        }
    )
    (root / "captions.json").write_text(json.dumps(captions * 2))
    (root / "instruct.json").write_text(json.dumps(instructions))
    return root


@pytest.fixture
def workspace(tiny_checkpoint, tmp_path) -> Path:
    """A real upgrade: LLaVA-NeXT target, composed perceiver (its ViT + a small Qwen3 + fresh phi_p)."""
    ws = tmp_path / "ws"
    perceiver = f"vit=target,lm={tiny_checkpoint('causal_lm_qwen3')}"
    result = runner.invoke(
        app, ["upgrade", str(tiny_checkpoint("llava_next")), "--perceiver", perceiver, "-o", str(ws)]
    )
    assert result.exit_code == 0, result.stderr
    return ws


def train(ws: Path, data: Path, stage: int, *args: str, data_file: str | None = None):
    data_file = data_file or ("captions.json" if stage == 1 else "instruct.json")
    result = runner.invoke(
        app,
        [
            "train",
            "--stage",
            str(stage),
            "--workspace",
            str(ws),
            "--data",
            str(data / data_file),
            "--image-root",
            str(data / "images"),
            *SMALL,
            *args,
            "--json",
        ],
    )
    return result


def weights(folder: Path) -> dict[str, torch.Tensor]:
    """A model folder's tensors by their in-memory names (stage results may be saved with legacy names)."""
    from transformers import AutoConfig

    tensors = {}
    for shard in sorted(folder.glob("*.safetensors")):
        tensors.update(load_file(shard))
    config = AutoConfig.from_pretrained(folder, trust_remote_code=True)
    if config.tie_word_embeddings:  # some writers (DeepSpeed's gathered save) keep the tied copy; it is the same
        tensors.pop("lm_head.weight", None)
    names = rename_to_memory(meta_model("AutoModelForImageTextToText", config), tensors, folder)
    return {names[key]: value for key, value in tensors.items()}


def changed_parts(before: Path, after: Path) -> set[str]:
    from transformers import AutoConfig

    family = perceiver_family(AutoConfig.from_pretrained(after, trust_remote_code=True))
    a, b = weights(before), weights(after)
    assert a.keys() == b.keys()
    return {part_of(name, family) for name in a if not torch.equal(a[name], b[name])}


def test_stage1_trains_only_phi_and_fresh_phi_p_and_the_loss_falls(workspace, data):
    result = train(workspace, data, 1, "--max-steps", "12", "--set", "learning_rate=5e-3")
    assert result.exit_code == 0, result.stderr
    assert changed_parts(workspace / "model", workspace / "stage1" / "model") == {"phi", "phi_p"}
    losses = [
        json.loads(line)["loss"]
        for line in (workspace / "stage1" / "metrics.jsonl").read_text().splitlines()
        if "loss" in json.loads(line)
    ]
    assert losses[-1] < losses[0]
    record = yaml.safe_load((workspace / "dpa.yaml").read_text())["stages"]["stage1"]
    assert record["steps"] == 12 and record["data"]["fingerprint"] and record["recipe"]["trainable"]["phi_p"] == "full"


def test_stage2_full_changes_perceiver_phi_and_llm_and_starts_from_stage1(workspace, data):
    assert train(workspace, data, 1, "--max-steps", "2").exit_code == 0
    result = train(
        workspace, data, 2, "--max-steps", "6", "--set", "learning_rate=1e-3", "--set", "learning_rates.vit=1e-3"
    )
    assert result.exit_code == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["source"] == str(workspace / "stage1" / "model")
    losses = [
        json.loads(line)["loss"]
        for line in (workspace / "stage2" / "metrics.jsonl").read_text().splitlines()
        if "loss" in json.loads(line)
    ]
    assert losses[-1] < losses[0]
    assert changed_parts(workspace / "stage1" / "model", workspace / "stage2" / "model") == {
        "vit",
        "phi_p",
        "perceiver_lm",
        "phi",
        "llm",
    }


def test_stage2_lora_adapts_every_part_as_the_official_script(workspace, data):
    """ms-swift's all-linear with nothing frozen (SFT_DPA_4node_lora.sh): adapters on every linear layer of the
    ViT, phi_p, the perceiver LM, phi and the LLM; no base weight trains."""
    assert train(workspace, data, 1, "--max-steps", "1").exit_code == 0
    result = train(workspace, data, 2, "--lora", "--max-steps", "3", "--set", "learning_rate=1e-2")
    assert result.exit_code == 0, result.stderr
    adapter = load_file(workspace / "stage2" / "adapter" / "adapter_model.safetensors")
    family = perceiver_family(json.loads((workspace / "model" / "config.json").read_text()))
    modules = {key.split(".lora_")[0].removeprefix("base_model.model.") for key in adapter}
    assert {part_of(f"{module}.weight", family) for module in modules} == {"vit", "phi_p", "perceiver_lm", "phi", "llm"}
    assert any(float(t.abs().sum()) > 0 for k, t in adapter.items() if "lora_B" in k)
    assert changed_parts(workspace / "stage1" / "model", workspace / "stage2" / "model") == set()


def test_freeze_perceiver_keeps_it_bit_for_bit(workspace, data):
    assert (
        train(
            workspace,
            data,
            2,
            "--from",
            "model",
            "--freeze-perceiver",
            "--max-steps",
            "2",
            "--set",
            "learning_rate=1e-3",
        ).exit_code
        == 0
    )
    assert changed_parts(workspace / "model", workspace / "stage2" / "model") == {"phi", "llm"}


def test_stages_chain_and_refuse_to_overwrite(workspace, data):
    result = train(workspace, data, 2, "--max-steps", "1")
    assert result.exit_code == 2 and "stage 1 has not been run" in result.stderr and "--from model" in result.stderr
    assert train(workspace, data, 1, "--max-steps", "1").exit_code == 0
    again = train(workspace, data, 1, "--max-steps", "1")
    assert again.exit_code == 2 and "already finished" in again.stderr and "--restart" in again.stderr
    assert train(workspace, data, 1, "--max-steps", "2", "--restart").exit_code == 0
    stages = yaml.safe_load((workspace / "dpa.yaml").read_text())["stages"]
    assert stages["stage1"]["steps"] == 2


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--lora", "--full"], "contradict"),
        (["--resume", "--restart"], "contradict"),
        (["--set", "learning_rat=1e-3"], "did you mean learning_rate"),
        (["--set", "learning_rate=-1"], "must be positive"),
        (["--set", "global_batch_size=5"], "not a multiple"),
        (["--set", "trainable.vit=half"], "not one of frozen, full, lora"),
        (["--deepspeed", "missing.json"], "no such file"),
        (["--recipe", "stage2-full"], "is for stage 2"),
        (["--resume"], "nothing to resume"),
    ],
)
def test_bad_flags_and_recipes_are_refused_before_training(workspace, data, args, needle):
    result = train(workspace, data, 1, *args)
    lines = result.stderr.strip().splitlines()
    assert result.exit_code == 2 and needle in result.stderr and "Traceback" not in result.stderr, result.stderr
    assert len(lines) <= 2 and not (workspace / "stage1" / "model").exists()


def test_stage_3_does_not_exist(workspace, data):
    result = train(workspace, data, 3)
    assert result.exit_code == 2 and "stages 1 and 2" in result.stderr


# ZeRO-2 runs packed: the first process plans the rows (and fills the lengths cache) while the other waits.
@pytest.mark.parametrize("zero,pack", [("zero2", ["--pack"]), ("zero3", [])], ids=["zero2", "zero3"])
def test_two_process_deepspeed_trains_and_saves_loadable_weights(workspace, data, zero, pack):
    from transformers import AutoModelForImageTextToText

    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "dpa_cli",
            "train",
            "--stage",
            "2",
            "--from",
            "model",
            "--workspace",
            str(workspace),
            "--data",
            str(data / "instruct.json"),
            "--image-root",
            str(data / "images"),
            *SMALL,
            "--max-steps",
            "3",
            # one sample per process: some step gives a process the text-only sample (the stand-in image path)
            "--set",
            "per_device_train_batch_size=1",
            "--set",
            "global_batch_size=2",
            "--deepspeed",
            zero,
            "--nproc",
            "2",
            *pack,
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    model = AutoModelForImageTextToText.from_pretrained(workspace / "stage2" / "model", trust_remote_code=True)
    assert changed_parts(workspace / "model", workspace / "stage2" / "model") == {
        "vit",
        "phi_p",
        "perceiver_lm",
        "phi",
        "llm",
    }
    assert all(torch.isfinite(p).all() for p in model.parameters())
