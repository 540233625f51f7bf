"""`dpa upgrade`: every target family x an existing and a composed perceiver, and what must never happen."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers as tf
from typer.testing import CliRunner

from dpa_cli.cli.app import app
from dpa_cli.model import DPAForConditionalGeneration
from dpa_cli.upgrade import surgery
from dpa_cli.workspace.manifest import is_workspace
from tests.factories import copy_checkpoint, read_tensors
from tests.tiny_processors import example_image

runner = CliRunner()

# (target, perceiver): every target family with an existing small VLM and with a composed perceiver.
# A composed perceiver takes its ViT from a LLaVA-family checkpoint: the target's own where it has one.
CASES = [
    ("llava", "qwen2_5_vl"),
    ("llava", "vit=target,lm=causal_lm_qwen3"),
    ("llava_next", "idefics3"),
    ("llava_next", "vit=target,lm=causal_lm_qwen3"),
    ("llava_onevision", "qwen3_vl"),
    ("llava_onevision", "vit=target,lm=causal_lm_llama"),
    ("llava_llama3", "smolvlm"),
    ("causal_lm_qwen3", "qwen2_vl"),
    ("causal_lm_llama", "vit=llava_next,lm=causal_lm_qwen3"),
    ("llava_original_qwen", "llava_onevision"),
    ("llava_original_llama", "vit=llava,lm=causal_lm_llama"),
]
TEXT_TARGETS = {"causal_lm_qwen3", "causal_lm_llama"}
ORIGINAL_TARGETS = {"llava_original_qwen", "llava_original_llama"}


def perceiver_arg(tiny_checkpoint, perceiver: str) -> str:
    """Spell a case's perceiver with real paths: `vit=llava_next,lm=x` -> `vit=/tmp/.../llava_next,lm=/tmp/...`."""
    if "=" not in perceiver:
        return str(tiny_checkpoint(perceiver))
    parts = dict(item.split("=") for item in perceiver.split(","))
    vit = parts["vit"] if parts["vit"] == "target" else str(tiny_checkpoint(parts["vit"]))
    return f"vit={vit},lm={tiny_checkpoint(parts['lm'])}"


def upgrade(*args: str) -> tuple[int, dict | None, str]:
    result = runner.invoke(app, ["upgrade", *args, "--json"])
    payload = json.loads(result.stdout) if result.exit_code == 0 else None
    return result.exit_code, payload, result.stderr


def source_state(folder: Path, name: str) -> dict[str, torch.Tensor]:
    """The source's weights by their transformers in-memory names, loaded with its own class."""
    if name in ORIGINAL_TARGETS:  # no transformers class: rename the original layout by hand
        renames = {
            "model.layers.": "model.language_model.layers.",
            "model.embed_tokens.": "model.language_model.embed_tokens.",
            "model.norm.": "model.language_model.norm.",
            "model.vision_tower.vision_tower.vision_model.": "model.vision_tower.",
        }
        out = {}
        for key, tensor in read_tensors(folder).items():
            prefix = next((p for p in renames if key.startswith(p)), None)
            out[renames[prefix] + key[len(prefix) :] if prefix else key] = tensor
        return out
    auto = tf.AutoModelForCausalLM if name in TEXT_TARGETS else tf.AutoModelForImageTextToText
    return auto.from_pretrained(folder).state_dict()


def expected_sources(tiny_checkpoint, target: str, perceiver: str) -> list[tuple[dict, str, str]]:
    """(source state, source prefix, DPA prefix) for every part the DPA model keeps."""
    target_state = source_state(tiny_checkpoint(target), target)
    lm_prefix = "model." if target in TEXT_TARGETS else "model.language_model."
    pairs = [(target_state, lm_prefix, "model.language_model."), (target_state, "lm_head.", "lm_head.")]
    if "=" not in perceiver:
        return pairs + [(source_state(tiny_checkpoint(perceiver), perceiver), "model.", "model.perceiver.")]
    parts = dict(item.split("=") for item in perceiver.split(","))
    vit_state = target_state if parts["vit"] == "target" else source_state(tiny_checkpoint(parts["vit"]), parts["vit"])
    lm_state = source_state(tiny_checkpoint(parts["lm"]), parts["lm"])
    return pairs + [
        (vit_state, "model.vision_tower.", "model.perceiver.vision_tower."),
        (lm_state, "model.", "model.perceiver.language_model."),
    ]


def assert_weights_are_the_sources(model: DPAForConditionalGeneration, pairs, composed: bool) -> None:
    """Every DPA tensor equals its source tensor, except the new projectors (and a composed image_newline)."""
    unmatched = []
    for name, tensor in model.state_dict().items():
        for state, src_prefix, dpa_prefix in pairs:
            if name.startswith(dpa_prefix) and (src := src_prefix + name[len(dpa_prefix) :]) in state:
                source = state[src]
                rows = min(len(source), len(tensor)) if source.dim() else None  # an added image token appends a row
                assert torch.equal(tensor[:rows] if rows else tensor, source[:rows] if rows else source), name
                break
        else:
            unmatched.append(name)
    new = {n for n in unmatched if n.startswith("model.multi_modal_projector.")}
    if composed:
        new |= {
            n
            for n in unmatched
            if n.startswith("model.perceiver.multi_modal_projector.") or n.endswith("image_newline")
        }
    assert set(unmatched) == new and new, unmatched


@pytest.mark.parametrize(("target", "perceiver"), CASES)
def test_upgrade_keeps_the_right_weights_and_the_result_loads_and_generates(
    tiny_checkpoint, tmp_path, target, perceiver
):
    code, result, stderr = upgrade(
        str(tiny_checkpoint(target)),
        "--perceiver",
        perceiver_arg(tiny_checkpoint, perceiver),
        "-o",
        str(tmp_path / "ws"),
    )
    assert code == 0, stderr
    model_dir = tmp_path / "ws" / "model"
    assert result["upgrade"]["loaded"]["forward"] == "ok" and is_workspace(tmp_path / "ws")
    model = tf.AutoModelForImageTextToText.from_pretrained(model_dir, trust_remote_code=True).eval()
    composed = "=" in perceiver
    assert_weights_are_the_sources(model, expected_sources(tiny_checkpoint, target, perceiver), composed)
    assert result["plan"]["perceiver"]["kind"] == ("composed" if composed else "existing")

    processor = tf.AutoProcessor.from_pretrained(model_dir, trust_remote_code=True)
    inputs = processor(images=[example_image()], text=[f"{processor.image_token}\nWhat is shown?"], return_tensors="pt")
    generated = model.generate(**inputs, max_new_tokens=3, min_new_tokens=3, do_sample=False)
    assert generated.shape[1] == inputs["input_ids"].shape[1] + 3

    inspected = runner.invoke(app, ["inspect", str(model_dir), "--json"])
    assert json.loads(inspected.stdout)["family"] == "dpa"


def test_plain_transformers_loads_the_workspace_model_without_dpa_cli(tiny_checkpoint, tmp_path):
    perceiver = perceiver_arg(tiny_checkpoint, "vit=target,lm=causal_lm_qwen3")
    code, _, stderr = upgrade(str(tiny_checkpoint("llava_next")), "--perceiver", perceiver, "-o", str(tmp_path / "ws"))
    assert code == 0, stderr
    script = f"""
import sys
from PIL import Image
from transformers import AutoModelForImageTextToText, AutoProcessor
folder = {str(tmp_path / "ws" / "model")!r}
model = AutoModelForImageTextToText.from_pretrained(folder, trust_remote_code=True)
processor = AutoProcessor.from_pretrained(folder, trust_remote_code=True)
image = Image.new('RGB', (40, 30), 'red')
inputs = processor(images=[image], text=[processor.image_token + ' hi'], return_tensors='pt')
out = model.generate(**inputs, max_new_tokens=2, min_new_tokens=2, do_sample=False)
assert not any(m.startswith('dpa_cli') for m in sys.modules), 'dpa_cli was imported'
print(type(model).__module__, out.shape[1] - inputs['input_ids'].shape[1])
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    module, new_tokens = done.stdout.split()[-2:]
    assert module.startswith("transformers_modules.") and new_tokens == "2"


def folder_digest(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def test_same_seed_same_bytes_other_seed_other_phi(tiny_checkpoint, tmp_path):
    args = [
        str(tiny_checkpoint("llava_next")),
        "--perceiver",
        str(tiny_checkpoint("qwen2_5_vl")),
        "--shard-size",
        "100KB",
    ]
    for name, seed in (("a", "7"), ("b", "7"), ("c", "8")):
        assert upgrade(*args, "-o", str(tmp_path / name), "--seed", seed)[0] == 0
    digests = {name: folder_digest(tmp_path / name / "model") for name in "abc"}
    assert digests["a"] == digests["b"]
    assert (
        "model.safetensors.index.json" in digests["a"]
        and len([k for k in digests["a"] if k.endswith(".safetensors")]) > 1
    )
    assert digests["a"] != digests["c"]


@pytest.mark.parametrize(("perceiver", "blocks"), [("qwen2_5_vl", "1"), ("vit=target,lm=causal_lm_qwen3", "0")])
def test_perceiver_layers_keeps_the_first_blocks(tiny_checkpoint, tmp_path, perceiver, blocks):
    code, result, stderr = upgrade(
        str(tiny_checkpoint("llava_next")),
        "--perceiver",
        perceiver_arg(tiny_checkpoint, perceiver),
        "-o",
        str(tmp_path / "ws"),
        "--perceiver-layers",
        blocks,
    )
    assert code == 0, stderr
    assert result["upgrade"]["loaded"]["forward"] == "ok"
    config = tf.AutoConfig.from_pretrained(tmp_path / "ws" / "model", trust_remote_code=True)
    assert config.perceiver_config.get_text_config().num_hidden_layers == int(blocks)
    kept = [k for k in read_tensors(tmp_path / "ws" / "model") if ".perceiver.language_model.layers." in k]
    assert {k.split(".layers.")[1].split(".")[0] for k in kept} == {str(i) for i in range(int(blocks))}
    assert (
        result["plan"]["dropped"]["perceiver language_model" if "=" not in perceiver else "lm language_model"][
            "tensors"
        ]
        > 0
    )


def test_early_fusion_and_markers_span_pass_the_load_check(tiny_checkpoint, tmp_path):
    code, result, stderr = upgrade(
        str(tiny_checkpoint("llava")),
        "--perceiver",
        str(tiny_checkpoint("qwen2_5_vl")),
        "-o",
        str(tmp_path / "ws"),
        "--early-fusion",
        "--feature-span",
        "image+markers",
    )
    assert code == 0, stderr
    assert result["upgrade"]["loaded"]["forward"] == "ok"
    assert (result["plan"]["config"]["early_fusion"], result["plan"]["config"]["feature_span"]) == (
        True,
        "image+markers",
    )


def test_dtype_casts_every_floating_tensor(tiny_checkpoint, tmp_path):
    code, result, stderr = upgrade(
        str(tiny_checkpoint("llava")),
        "--perceiver",
        str(tiny_checkpoint("idefics3")),
        "-o",
        str(tmp_path / "ws"),
        "--dtype",
        "bf16",
    )
    assert code == 0, stderr
    assert {t.dtype for t in read_tensors(tmp_path / "ws" / "model").values()} == {torch.bfloat16}
    assert result["plan"]["dtype"] == "bfloat16"


def test_dry_run_writes_nothing_and_reports_the_plan(tiny_checkpoint, tmp_path):
    code, plan, stderr = upgrade(
        str(tiny_checkpoint("llava_next")),
        "--perceiver",
        perceiver_arg(tiny_checkpoint, "vit=target,lm=causal_lm_qwen3"),
        "-o",
        str(tmp_path / "ws"),
        "--dry-run",
    )
    assert code == 0, stderr
    assert list(tmp_path.iterdir()) == []
    assert (
        plan["dimensions"]["perceiver_width"]
        == tf.AutoConfig.from_pretrained(tiny_checkpoint("causal_lm_qwen3")).hidden_size
    )
    assert {"phi", "phi_p"} <= set(plan["new"]) and "target vision" not in plan["dropped"]
    assert plan["dropped"]["target projector"]["tensors"] == 4
    assert plan["kept"]["perceiver vision"]["from"] == ["target"]


def test_an_existing_workspace_is_refused_then_replaced_with_force(tiny_checkpoint, tmp_path):
    args = [
        str(tiny_checkpoint("llava")),
        "--perceiver",
        str(tiny_checkpoint("qwen2_5_vl")),
        "-o",
        str(tmp_path / "ws"),
    ]
    assert upgrade(*args)[0] == 0
    before = folder_digest(tmp_path / "ws")
    code, _, stderr = upgrade(*args)
    assert code == 2 and "already exists" in stderr and "--force" in stderr
    assert folder_digest(tmp_path / "ws") == before
    assert upgrade(*args, "--force", "--seed", "3")[0] == 0
    assert folder_digest(tmp_path / "ws") != before


def test_force_does_not_replace_a_folder_dpa_did_not_write(tiny_checkpoint, tmp_path):
    (tmp_path / "ws").mkdir()
    (tmp_path / "ws" / "thesis.tex").write_text("years of work")
    code, _, stderr = upgrade(
        str(tiny_checkpoint("llava")),
        "--perceiver",
        str(tiny_checkpoint("qwen2_5_vl")),
        "-o",
        str(tmp_path / "ws"),
        "--force",
    )
    assert code == 2 and "not a dpa workspace" in stderr.replace("\n", " ") or "not one" in stderr
    assert (tmp_path / "ws" / "thesis.tex").read_text() == "years of work"


@pytest.mark.parametrize("fault", [KeyboardInterrupt(), OSError(28, "No space left on device")])
def test_an_interrupted_upgrade_leaves_no_workspace(tiny_checkpoint, tmp_path, monkeypatch, fault):
    real = surgery.TensorSource.__call__
    calls = []

    def failing(self, spec):
        calls.append(spec.name)
        if len(calls) == 20:
            raise fault  # Ctrl-C or a full disk, mid-stream
        return real(self, spec)

    monkeypatch.setattr(surgery.TensorSource, "__call__", failing)
    result = runner.invoke(
        app,
        [
            "upgrade",
            str(tiny_checkpoint("llava_next")),
            "--perceiver",
            str(tiny_checkpoint("qwen2_5_vl")),
            "-o",
            str(tmp_path / "ws"),
        ],
    )
    assert result.exit_code != 0 and len(calls) == 20
    assert list(tmp_path.iterdir()) == []
    if isinstance(fault, OSError):
        assert "No space left on device" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.parametrize(
    ("case", "needle"),
    [
        ("perceiver is target", "is the target itself"),
        ("perceiver cannot be a perceiver", "cannot be the perceiver"),
        ("output inside input", "overlap"),
        ("output is a file", "is a file"),
        ("bad composition", "bad composed perceiver"),
        ("no language blocks", "no language blocks"),
        ("shape disagreement", "shape"),
        ("unpublished alias", "no public checkpoint"),
        ("vit from a qwen model", "composing a perceiver takes its ViT"),
    ],
)
def test_upgrades_that_cannot_work_are_refused_before_writing(tiny_checkpoint, tmp_path, case, needle):
    target, perceiver = str(tiny_checkpoint("llava")), str(tiny_checkpoint("qwen2_5_vl"))
    output = tmp_path / "ws"
    if case == "perceiver is target":
        perceiver = target
    elif case == "perceiver cannot be a perceiver":
        perceiver = str(tiny_checkpoint("causal_lm_qwen3"))
    elif case == "output inside input":
        target = str(copy_checkpoint(tiny_checkpoint("llava"), tmp_path / "target"))
        output = tmp_path / "target" / "ws"
    elif case == "output is a file":
        output.write_text("not a folder")
    elif case == "bad composition":
        perceiver = "vit=target,lm="
    elif case == "no language blocks":
        perceiver = str(copy_checkpoint(tiny_checkpoint("qwen2_5_vl"), tmp_path / "p"))
        config = json.loads((Path(perceiver) / "config.json").read_text())
        config["text_config"].update(num_hidden_layers=0, layer_types=[])
        (Path(perceiver) / "config.json").write_text(json.dumps(config))
    elif case == "shape disagreement":
        perceiver = str(copy_checkpoint(tiny_checkpoint("qwen2_5_vl"), tmp_path / "p"))
        config = json.loads((Path(perceiver) / "config.json").read_text())
        config["text_config"]["intermediate_size"] += 8
        (Path(perceiver) / "config.json").write_text(json.dumps(config))
    elif case == "unpublished alias":
        target = "llava-next-qwen3-4b"
    elif case == "vit from a qwen model":
        perceiver = f"vit={tiny_checkpoint('qwen2_vl')},lm={tiny_checkpoint('causal_lm_qwen3')}"
    before = sorted(p.name for p in tmp_path.iterdir())
    code, _, stderr = upgrade(target, "--perceiver", perceiver, "-o", str(output))
    assert code == 2, stderr
    lines = stderr.strip().splitlines()
    assert lines[0].startswith("error:") and needle in stderr and "Traceback" not in stderr and len(lines) <= 2
    assert sorted(p.name for p in tmp_path.iterdir()) == before
