""" "Will it fit" (`dpa train --dry-run`, train/fit.py) on a synthetic 4B-sized target built on the meta device: the
model states are DeepSpeed's own estimator figures fed the trainable count (frozen weights only, no gradients or
optimizer states), the activations follow the documented formula, --nproc divides ZeRO-sharded states, a budget
that is too small is refused in one line (exit 2, nothing written), and bad --gpu-* spellings are refused."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml
from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs
from PIL import Image
from typer.testing import CliRunner

from dpa_cli.bench.analytic import QWEN3_4B
from dpa_cli.cli.app import app
from tests.fault_kit import tree_hash

runner = CliRunner()
GIB = 2**30


@pytest.fixture(scope="module")
def paper_size(dpa_workspace, tmp_path_factory) -> Path:
    """A copy of a tiny workspace whose target LLM config is Qwen3-4B's (no weights: dry runs build on meta)."""
    ws = shutil.copytree(dpa_workspace("next_qwen"), tmp_path_factory.mktemp("fit") / "ws")
    config = json.loads((ws / "model" / "config.json").read_text())
    config["text_config"].update(QWEN3_4B, layer_types=["full_attention"] * QWEN3_4B["num_hidden_layers"])
    (ws / "model" / "config.json").write_text(json.dumps(config))
    manifest = yaml.safe_load((ws / "dpa.yaml").read_text())
    manifest["plan"]["dimensions"]["target_width"] = QWEN3_4B["hidden_size"]
    (ws / "dpa.yaml").write_text(yaml.safe_dump(manifest, sort_keys=False))
    Image.new("RGB", (32, 32)).save(ws.parent / "a.png")
    (ws.parent / "data.json").write_text(
        json.dumps(
            [
                {
                    "id": "a",
                    "image": "a.png",
                    "conversations": [
                        {"from": "human", "value": "<image>\nWhat?"},
                        {"from": "gpt", "value": "A picture."},
                    ],
                }
            ]
        )
    )
    return ws


def dry_run(ws: Path, *args: str, stage: int = 1):
    return runner.invoke(
        app,
        [
            "train",
            "--stage",
            str(stage),
            "-w",
            str(ws),
            "--data",
            str(ws.parent / "data.json"),
            "--from",
            "model",
            *args,
            "--dry-run",
        ],
    )


def fit_of(ws: Path, *args: str, stage: int = 1) -> dict:
    result = dry_run(ws, *args, "--json", stage=stage)
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)["fit"]


def expected_activations(micro: int, length: int) -> dict[str, int]:
    """The documented formula (docs/training.md), written out again: bf16, the 4B target only (stage 1 trains
    phi: no gradient reaches the perceiver)."""
    c, tokens = QWEN3_4B, micro * length
    h, q, kv, i = (
        c["hidden_size"],
        c["num_attention_heads"] * c["head_dim"],
        c["num_key_value_heads"] * c["head_dim"],
        c["intermediate_size"],
    )
    layer = tokens * (16 * h + 10 * (q + kv) + 8 * i)  # 2 (4 + 2b) h + (4 + 3b)(q + kv) + 4 b i, b = 2
    logits = (2 + 8) * tokens * c["vocab_size"]
    return {
        "without_checkpointing": c["num_hidden_layers"] * layer + logits,
        "with_checkpointing": c["num_hidden_layers"] * 2 * tokens * h + layer + logits,
    }


@pytest.mark.parametrize(
    "stage,deepspeed,nproc",
    [(1, "zero2", 2), (1, "zero3", 2), (1, "zero3", 8), (1, None, 1), (2, "zero3", 8), (2, "zero2", 4)],
)
def test_the_estimate_is_deepspeeds_for_the_trainable_params_plus_frozen_weights(paper_size, stage, deepspeed, nproc):
    args = [
        "--nproc",
        str(nproc),
        *(["--deepspeed", deepspeed] if deepspeed else []),
        "--set",
        "per_device_train_batch_size=2",
        "--set",
        "max_length=1024",
    ]
    fit = fit_of(paper_size, *args, stage=stage)
    trainable, frozen = fit["trainable"], fit["frozen"]
    assert 3.5e9 < trainable + frozen < 4.6e9
    assert 0 < trainable < 0.01 * frozen if stage == 1 else frozen == 0  # stage 1: phi only; stage 2: everything
    assert fit["largest_layer"] == QWEN3_4B["vocab_size"] * QWEN3_4B["hidden_size"]  # the embedding
    if deepspeed == "zero3":
        states = estimate_zero3_model_states_mem_needs(
            trainable, fit["largest_layer"], num_gpus_per_node=nproc, cpu_offload=False, cpu_offload_params=False
        )[1]
        states += 2 * frozen // nproc
    elif deepspeed == "zero2":
        states = estimate_zero2_model_states_mem_needs(trainable, num_gpus_per_node=nproc, cpu_offload=False)[1]
        states += 2 * frozen
    else:
        states = 8 * trainable + 2 * frozen
    assert fit["model_states_gib"] == round(states / GIB, 2) and fit["gpus"] == nproc
    target_only = {k: round(v / GIB, 2) for k, v in expected_activations(2, 1024).items()}
    for key, value in fit["activations_gib"].items():  # stage 2 trains the perceiver too: its layers count
        assert value == target_only[key] if stage == 1 else value >= target_only[key]
    assert fit["gradient_checkpointing"]
    plan = json.loads(dry_run(paper_size, *args, "--json", stage=stage).stdout)
    tokens = 2 * 1024 * plan["gradient_accumulation_steps"]
    assert fit["tokens_per_gpu_step"] == tokens
    assert fit["step_seconds"] == pytest.approx(tokens * fit["flops_per_token"] / (312e12 * 0.4), rel=1e-2)


def test_nproc_divides_zero3_states_and_the_text_shows_the_table(paper_size):
    one, eight = (fit_of(paper_size, "--deepspeed", "zero3", "--nproc", str(n)) for n in (2, 8))
    gathered = 4 * one["largest_layer"] / GIB  # the largest layer, whole on every GPU while it runs
    assert one["model_states_gib"] - gathered == pytest.approx(4 * (eight["model_states_gib"] - gathered), rel=0.02)
    text = dry_run(paper_size, "--deepspeed", "zero3", "--nproc", "8").stdout
    for needle in (
        "will it fit",
        "model states",
        "activations without checkpointing",
        "activations with",
        "A100-80GB",
        "40% MFU",
    ):
        assert needle in text, needle


BUDGETS = ["8GB", "8GiB", "8192MB", "8", " 8 G ", "0.5GB", "7.5gib"]


@pytest.mark.parametrize("budget", BUDGETS)
def test_a_budget_too_small_is_refused_in_one_line_with_what_to_change(paper_size, budget):
    before = tree_hash(paper_size.parent)
    result = dry_run(
        paper_size,
        "--gpu-memory",
        budget,
        "--set",
        "gradient_checkpointing=false",
        "--set",
        "per_device_train_batch_size=4",
        "--set",
        "max_length=4096",
    )
    lines = result.stderr.strip().splitlines()
    assert result.exit_code == 2 and "Traceback" not in result.stderr, result.output
    assert lines[0].startswith("error: the run does not fit") and len(lines) <= 2, result.stderr
    for needle in (
        "GiB per GPU",
        "--gpu-memory",
        "--deepspeed zero3",
        "gradient_checkpointing=true",
        "per_device_train_batch_size",
        "more GPUs",
    ):
        assert needle in result.stderr, needle
    assert tree_hash(paper_size.parent) == before


@pytest.mark.parametrize(
    "flag,value",
    [
        *[("--gpu-memory", v) for v in ("80XB", "-5GB", "GB", "0", "eighty", "80 G B", "1e3GB", "")],
        *[("--gpu-tflops", v) for v in ("0", "-1", "inf", "nan")],
    ],
)
def test_bad_gpu_flags_are_refused_by_name(paper_size, flag, value):
    result = dry_run(paper_size, flag, value)
    assert result.exit_code == 2 and result.stderr.startswith(f"error: {flag}"), result.output


def test_gpu_flags_without_dry_run_are_refused(paper_size):
    result = runner.invoke(
        app, ["train", "--stage", "1", "-w", str(paper_size), "--data", "x.json", "--gpu-memory", "24GB"]
    )
    assert result.exit_code == 2 and "--gpu-memory is read by --dry-run only" in result.stderr


def saved_bytes(model, ids) -> int:
    """Bytes of the tensors autograd keeps for backward in one forward (parameters and shared storages once)."""
    import torch

    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in params:
            seen[storage.data_ptr()] = storage.nbytes()
        return tensor

    inputs = model.model.embed_tokens(ids).detach().requires_grad_(True)  # gradients flow, as to phi in stage 1
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        model(inputs_embeds=inputs, labels=ids)
    return sum(seen.values())


@pytest.mark.parametrize("shape", [(256, 4, 2, 768), (192, 3, 3, 512)])
@pytest.mark.parametrize("checkpointing", [False, True])
def test_the_activation_formula_is_what_autograd_keeps(shape, checkpointing):
    """Per layer, the bytes `layer_activation_bytes` counts equal what a bf16 Qwen3 layer under SDPA saves (the
    per-head log-sum-exp aside); with gradient checkpointing a layer keeps its input only."""
    import torch
    from transformers import Qwen3Config, Qwen3ForCausalLM

    from dpa_cli.bench.analytic import Stack
    from dpa_cli.train.fit import layer_activation_bytes

    hidden, heads, kv_heads, intermediate = shape
    config = Qwen3Config(
        hidden_size=hidden,
        num_hidden_layers=3,
        num_attention_heads=heads,
        head_dim=64,
        num_key_value_heads=kv_heads,
        intermediate_size=intermediate,
        vocab_size=500,
        attn_implementation="sdpa",
    )
    model = Qwen3ForCausalLM(config).to(torch.bfloat16).train()
    if checkpointing:
        model.gradient_checkpointing_enable({"use_reentrant": False})
    ids, layers = torch.randint(0, 500, (2, 64)), list(model.model.layers)
    kept = []
    for depth in (1, 3):
        model.model.layers = torch.nn.ModuleList(layers[:depth])
        kept.append(saved_bytes(model, ids))
    per_layer = (kept[1] - kept[0]) / 2
    tokens = ids.numel()
    expected = (
        2 * tokens * hidden
        if checkpointing
        else layer_activation_bytes(Stack.from_text_config(config.to_dict()), tokens, 2)
    )
    assert per_layer == pytest.approx(expected, rel=0.01)
