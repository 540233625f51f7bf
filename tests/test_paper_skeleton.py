"""The DPA paper's skeleton (Qwen2.5-VL ViT + merger at the LM width + Qwen3 blocks with M-RoPE) as a family:
the model class, composing the paper's perceiver, the three official on-disk formats, and an official DPA
checkpoint turned into a workspace by renaming only."""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from transformers import AutoModel, Qwen3Config, Qwen3Model
from typer.testing import CliRunner

from dpa_cli import loading
from dpa_cli.cli.app import app
from dpa_cli.families import detect_family
from dpa_cli.model import DPAConfig, DPAForConditionalGeneration, Qwen2_5_VLQwen3Model
from tests.factories import copy_checkpoint, paper_hub_cache, read_tensors, tiny_config, tiny_model
from tests.official_layouts import (
    HEAD_ALIASES,
    PERCEIVER_LM,
    THINKER,
    VIT,
    build_baseline,
    build_hw,
    build_official_dpa,
)
from tests.test_bad_inputs import edit_json, tree_hash
from tests.tiny_dpa import PERCEIVER_IMAGE, TARGET_IMAGE, feature_counts, perceiver_inputs, random_images, target_batch
from tests.tiny_tokenizers import tiny_tokenizer

OFFICIAL = "forward_visual_tokens_llava_arch"


def _rotary_positions(model: torch.nn.Module) -> list[torch.Tensor]:
    """Records the position ids every M-RoPE rotary of `model` is called with."""
    seen: list[torch.Tensor] = []
    for module in model.modules():
        if type(module).__name__ == "Qwen2_5_VLRotaryEmbedding":
            module.register_forward_hook(lambda mod, args, out: seen.append(args[1].clone()))
    return seen


def _image_inputs(model: torch.nn.Module, config) -> dict[str, torch.Tensor]:
    """`<|vision_start|> pads <|vision_end|> text` with a 56x56 image (N = 4 pads), as Qwen2.5-VL lays it out."""
    pixels = perceiver_inputs(random_images([(56, 56)]))
    start, pad, end = config.vision_start_token_id, config.image_token_id, config.vision_end_token_id
    ids = torch.tensor([[7, 8, start, pad, pad, pad, pad, end, 9, 10]])
    return dict(
        input_ids=ids,
        attention_mask=torch.ones_like(ids),
        mm_token_type_ids=(ids == pad).int(),
        pixel_values=pixels["pixel_values"],
        image_grid_thw=pixels["image_grid_thw"],
    )


def test_paper_blocks_are_qwen3_and_3d_positions_reach_the_rotary():
    model = tiny_model("paper_vl")
    for layer in model.model.language_model.layers:
        attention = layer.self_attn
        assert type(layer).__name__ == "Qwen3DecoderLayer"
        assert attention.q_proj.bias is None and attention.q_norm.weight.shape == (attention.head_dim,)
    seen = _rotary_positions(model)
    inputs = _image_inputs(model, model.config)
    with torch.no_grad():
        logits = model(**inputs).logits
    assert torch.isfinite(logits).all()
    (positions,) = seen
    assert positions.shape == (3, 1, 10)  # t, h, w rows: M-RoPE, not the 1-D fallback
    expected, _ = model.model.get_rope_index(inputs["input_ids"], inputs["mm_token_type_ids"], inputs["image_grid_thw"])
    assert torch.equal(positions, expected)
    # The 2x2 merged grid after 3 tokens: (t, h, w) = (3,3,3) (3,3,4) (3,4,3) (3,4,4); text resumes at 5.
    assert positions[:, 0, 3:7].tolist() == [[3, 3, 3, 3], [3, 3, 4, 4], [3, 4, 3, 4]]
    assert positions[:, 0, 7].tolist() == [5, 5, 5]


def test_text_positions_give_exactly_qwen3():
    """With equal t/h/w rows M-RoPE is 1-D RoPE: the blocks are Qwen3's, applied to the recomposed cos/sin as is."""
    model = tiny_model("paper_vl")
    text = model.config.text_config.to_dict()
    plain = Qwen3Model(Qwen3Config(**{**text, "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0}}))
    plain.load_state_dict(model.model.language_model.state_dict())
    ids = torch.tensor([[5, 6, 7, 8, 9, 10, 11]])
    with torch.no_grad():
        ours = model.model.language_model(input_ids=ids).last_hidden_state
        reference = plain.eval()(input_ids=ids).last_hidden_state
    torch.testing.assert_close(ours, reference, rtol=0, atol=1e-6)


def test_dpa_builds_a_paper_perceiver_through_the_auto_classes(tmp_path):
    perceiver = tiny_config(
        "paper_vl",
        image_token_id=PERCEIVER_IMAGE,
        vision_start_token_id=291,
        vision_end_token_id=292,
        text_config=dict(vocab_size=300, pad_token_id=None, bos_token_id=0, eos_token_id=1),
    )
    text = Qwen3Config(
        hidden_size=48,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=12,
        vocab_size=320,
    )
    torch.manual_seed(0)
    model = DPAForConditionalGeneration(
        DPAConfig(perceiver_config=perceiver, text_config=text, image_token_id=TARGET_IMAGE)
    ).eval()
    assert type(model.model.perceiver) is Qwen2_5_VLQwen3Model
    seen = _rotary_positions(model.model.perceiver)
    p_inputs = perceiver_inputs(random_images([(56, 56)]))
    batch = {**target_batch([[[5, 6], [7, 8]]], feature_counts(p_inputs)), **p_inputs}
    with torch.no_grad():
        logits = model(**batch).logits
    assert seen and seen[0].shape[0] == 3 and not torch.equal(seen[0][0], seen[0][1])
    model.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["perceiver_config"]["model_type"] == "qwen2_5_vl_qwen3"
    reloaded = DPAForConditionalGeneration.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**batch).logits, logits, rtol=0, atol=0)
    assert type(AutoModel.from_config(perceiver)) is Qwen2_5_VLQwen3Model


# A stock qwen2_5_vl config.json whose text config is Qwen3, said in each way configs say it.
QWEN3_TEXT_SPELLINGS = {
    "model_type qwen3": {"model_type": "qwen3"},
    "Qwen3 architecture": {"architectures": ["Qwen3ForCausalLM"]},
    "head_dim does not split the width": {"head_dim": 16},
    "all of them": {"model_type": "qwen3", "architectures": ["Qwen3ForCausalLM"], "head_dim": 16},
}


@pytest.mark.parametrize("spelling", QWEN3_TEXT_SPELLINGS.values(), ids=list(QWEN3_TEXT_SPELLINGS))
def test_a_qwen2_5_vl_config_with_qwen3_text_is_the_paper_skeleton(spelling):
    config = tiny_config("paper_vl").to_dict()
    text = {k: v for k, v in config["text_config"].items() if k not in ("head_dim", "architectures")}
    text = {**text, "model_type": "qwen2_5_vl_text"}
    config = {**config, "model_type": "qwen2_5_vl", "text_config": {**text, **spelling}}
    family = detect_family(config)
    assert family.name == "qwen2_5_vl_qwen3"
    native = family.native_config(config)
    assert native["model_type"] == "qwen2_5_vl_qwen3" and native["text_config"]["rope_parameters"]["mrope_section"]
    stock = {**config, "text_config": text}
    assert detect_family(stock).name == "qwen2_5_vl"


def test_a_qwen2_5_vl_checkpoint_with_qwen3_text_upgrades_as_the_paper_skeleton(tiny_checkpoint, tmp_path):
    folder = copy_checkpoint(tiny_checkpoint("paper_vl", layout="hub"), tmp_path / "qwen25-qwen3")
    edit_json(
        folder / "config.json",
        lambda c: c.update(
            model_type="qwen2_5_vl",
            text_config={
                **c["text_config"],
                "model_type": "qwen3",
                "rope_scaling": {"type": "mrope", "mrope_section": [2, 3, 3]},
            },
        ),
    )
    result = upgrade_json([str(tiny_checkpoint("causal_lm_qwen3")), "--perceiver", str(folder), "--dry-run"], {})
    assert (result["perceiver"]["family"], result["perceiver"]["builds"]) == ("qwen2_5_vl_qwen3", "qwen2_5_vl_qwen3")


# --- refusals: exit 2, one `error:` line (plus a hint), no traceback, nothing written ------------------------
runner = CliRunner()


def assert_refused(argv: list[str], needles: tuple[str, ...], *watched: Path, env: dict[str, str] | None = None) -> str:
    before = tree_hash(*watched)
    result = runner.invoke(app, argv, env=env)
    stderr = result.stderr
    lines = stderr.strip().splitlines()
    assert result.exit_code == 2 and "Traceback" not in stderr, (result.exit_code, stderr, result.exception)
    assert lines and lines[0].startswith("error:") and len(lines) <= 2, stderr
    assert all(needle in stderr for needle in needles), (needles, stderr)
    assert tree_hash(*watched) == before, "an input or output changed"
    return stderr


def _stock_config_over_qwen3_weights(config: dict) -> None:
    """What a hand-made Qwen2.5-VL + Qwen3 checkpoint may say: a plain qwen2_5_vl config, no Qwen3 mark."""
    config["model_type"] = "qwen2_5_vl"
    text = config["text_config"]
    text["model_type"] = "qwen2_5_vl_text"
    for key in ("head_dim", "architectures"):
        text.pop(key, None)


@pytest.mark.parametrize("as_role", ["perceiver", "target"])
def test_qwen3_weights_under_a_stock_qwen2_5_vl_config_are_refused_by_name(tiny_checkpoint, tmp_path, as_role):
    folder = copy_checkpoint(tiny_checkpoint("paper_vl"), tmp_path / "qwen25-qwen3")
    edit_json(folder / "config.json", _stock_config_over_qwen3_weights)
    other = tiny_checkpoint("causal_lm_qwen3" if as_role == "perceiver" else "qwen2_5_vl")
    target, perceiver = (other, folder) if as_role == "perceiver" else (folder, other)
    argv = ["upgrade", str(target), "--perceiver", str(perceiver), "-o", str(tmp_path / "out")]
    assert_refused(argv, ("config.json", "Qwen3 q/k norms", "q_norm", "Qwen2.5 blocks"), tmp_path)
    report = json.loads(runner.invoke(app, ["inspect", str(folder), "--json"]).stdout)
    assert report["family"] == "qwen2_5_vl" and any("Qwen3 q/k norms" in w for w in report["warnings"])


# --- composing the paper's perceiver: vit=<a Qwen2.5-VL checkpoint>,lm=<a Qwen3 LM> ------------------------------
PAPER_PAIR = "vit=Qwen/Qwen2.5-VL-3B-Instruct,lm=Qwen/Qwen3-0.6B"


@pytest.fixture(scope="module")
def paper_hub(tmp_path_factory) -> dict[str, str]:
    """The environment of a command that finds the paper's hub ids (tiny stand-ins) in the local cache."""
    return {"HF_HUB_CACHE": str(paper_hub_cache(tmp_path_factory.mktemp("paper-hub")))}


def _snapshot(env: dict[str, str], repo_id: str) -> Path:
    return next((Path(env["HF_HUB_CACHE"]) / f"models--{repo_id.replace('/', '--')}" / "snapshots").iterdir())


def upgrade_json(argv: list[str], env: dict[str, str]) -> dict:
    result = runner.invoke(app, ["upgrade", *argv, "--json"], env=env)
    assert result.exit_code == 0, (result.stderr, result.exception)
    return json.loads(result.stdout)


def test_the_paper_pair_composes_the_paper_perceiver(paper_hub, tiny_checkpoint, tmp_path):
    workspace = tmp_path / "ws"
    result = upgrade_json(
        [str(tiny_checkpoint("causal_lm_qwen3")), "--perceiver", PAPER_PAIR, "-o", str(workspace)], paper_hub
    )
    assert result["upgrade"]["loaded"]["forward"] == "ok"  # the upgrade loaded it and ran the processor + forward
    perceiver = json.loads((workspace / "model" / "config.json").read_text())["perceiver_config"]
    assert perceiver["model_type"] == "qwen2_5_vl_qwen3"
    assert perceiver["text_config"]["rope_parameters"]["mrope_section"] == [2, 3, 3]  # from the Qwen2.5-VL config
    assert perceiver["vision_config"]["out_hidden_size"] == perceiver["text_config"]["hidden_size"] == 32
    written = read_tensors(workspace / "model")
    vit = read_tensors(_snapshot(paper_hub, "Qwen/Qwen2.5-VL-3B-Instruct"))
    lm = read_tensors(_snapshot(paper_hub, "Qwen/Qwen3-0.6B"))
    for key, tensor in vit.items():  # the ViT and the merger's ln_q copied bit for bit, the merger MLP rebuilt
        if key.startswith("visual.") and ".merger.mlp." not in key:
            assert torch.equal(written[f"model.perceiver.{key}"], tensor), key
    assert written["model.perceiver.visual.merger.mlp.2.weight"].shape == (32, 128)
    assert set(result["plan"]["new"]["phi_p"]["shapes"]) == {
        f"model.perceiver.visual.merger.mlp.{i}.{p}" for i in (0, 2) for p in ("weight", "bias")
    }
    for key, tensor in lm.items():  # Qwen3 blocks with their q/k norms
        if key.startswith("model."):
            assert torch.equal(written[key.replace("model.", "model.perceiver.language_model.", 1)], tensor), key
    assert "model.perceiver.language_model.layers.1.self_attn.k_norm.weight" in written
    model = loading.load_model(workspace / "model")
    processor = loading.load_processor(workspace / "model")
    seen = _rotary_positions(model.model.perceiver)
    inputs = processor(images=[random_images([(56, 56)])[0]], text=[f"{processor.image_token} Hi"], return_tensors="pt")
    with torch.no_grad():
        model(**inputs)
    assert type(model.model.perceiver) is Qwen2_5_VLQwen3Model and seen[0].shape[0] == 3
    assert not torch.equal(seen[0][1], seen[0][2]), "image rows and columns get their own positions"


def test_the_catalog_perceiver_of_a_paper_target_is_the_paper_composition(paper_hub, tiny_checkpoint, tmp_path):
    """`qwen3-0.6b-vl` is the target's ViT + Qwen3-0.6B: with the paper's baseline (its skeleton) as target, the
    paper's perceiver; the merger is copied where the widths agree and still trained in stage 1."""
    result = upgrade_json([str(tiny_checkpoint("paper_vl")), "--perceiver", "qwen3-0.6b-vl", "--dry-run"], paper_hub)
    perceiver = result["perceiver"]
    assert (perceiver["kind"], perceiver["family"], perceiver["lm"]["repo_id"]) == (
        "composed",
        "qwen2_5_vl_qwen3",
        "Qwen/Qwen3-0.6B",
    )
    assert "phi_p" not in result["new"] and "stage 1 trains it" in " ".join(result["notes"])


BAD_COMPOSITIONS = {
    "a Llama LM under a Qwen2.5-VL ViT": (
        "vit=Qwen/Qwen2.5-VL-3B-Instruct",
        "causal_lm_llama",
        ("takes Qwen3 blocks", "llama"),
    ),
    "M-RoPE sections that do not fit the LM's head_dim": (
        "qwen2_5_vl",
        "lm=Qwen/Qwen3-0.6B",
        ("M-RoPE sections [1, 1, 2] cover 8", "head_dim 16"),
    ),
    "a Qwen2-VL ViT": ("qwen2_vl", "lm=Qwen/Qwen3-0.6B", ("composing a perceiver takes its ViT from a", "qwen2_vl")),
    "a Qwen3-VL ViT": ("qwen3_vl", "lm=Qwen/Qwen3-0.6B", ("composing a perceiver takes its ViT from a", "qwen3_vl")),
}


@pytest.mark.parametrize("case", BAD_COMPOSITIONS.values(), ids=list(BAD_COMPOSITIONS))
def test_a_composition_that_cannot_be_the_paper_skeleton_is_refused(paper_hub, tiny_checkpoint, tmp_path, case):
    vit, lm, needles = case
    vit = vit if vit.startswith("vit=") else f"vit={tiny_checkpoint(vit)}"
    lm = lm if lm.startswith("lm=") else f"lm={tiny_checkpoint(lm)}"
    argv = ["upgrade", str(tiny_checkpoint("causal_lm_qwen3")), "--perceiver", f"{vit},{lm}", "-o", str(tmp_path / "o")]
    assert_refused(argv, needles, tmp_path, Path(paper_hub["HF_HUB_CACHE"]), env=paper_hub)


# --- the three official on-disk formats ------------------------------------------------------------------------
# name -> (builder, family, layout, role, LM class / width, vision width, head on disk)
OFFICIAL_LAYOUTS = {
    "hw legacy names": (lambda f: build_hw(f), "qwen_custom_vl_hw_new", "hub", ["target", "perceiver"], 32),
    "hw v5 names": (lambda f: build_hw(f, names="v5"), "qwen_custom_vl_hw_new", "v5", ["target", "perceiver"], 32),
    "hw untied (32B-like)": (
        lambda f: build_hw(f, tie=False),
        "qwen_custom_vl_hw_new",
        "hub",
        ["target", "perceiver"],
        32,
    ),
    "llava_baseline safetensors": (
        lambda f: build_baseline(f),
        "llava_baseline",
        "official",
        ["target", "perceiver"],
        32,
    ),
    "llava_baseline pytorch_model.bin": (
        lambda f: build_baseline(f, "bin"),
        "llava_baseline",
        "official",
        ["target", "perceiver"],
        32,
    ),
    "official DPA, both head aliases": (lambda f: build_official_dpa(f), OFFICIAL, "official", [], 64),
    "official DPA .bin, heads absent": (lambda f: build_official_dpa(f, "bin", heads=()), OFFICIAL, "official", [], 64),
    "official DPA, one alias, fp32": (
        lambda f: build_official_dpa(f, heads=HEAD_ALIASES[1:], dtype=torch.float32),
        OFFICIAL,
        "official",
        [],
        64,
    ),
}


@pytest.fixture(scope="module")
def official(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("official")
    return {name: case[0](root / name.replace(" ", "-")) for name, case in OFFICIAL_LAYOUTS.items()}


@pytest.mark.parametrize("name", list(OFFICIAL_LAYOUTS))
def test_each_official_layout_is_recognised_by_inspect(official, paper_hub, name):
    _, family, layout, role, width = OFFICIAL_LAYOUTS[name]
    result = runner.invoke(app, ["inspect", str(official[name]), "--json"], env=paper_hub)
    assert result.exit_code == 0, result.stderr
    report = json.loads(result.stdout)
    assert (report["family"], report["layout"], report["role"]) == (family, layout, role)
    assert (report["unmapped_keys"], report["warnings"]) == ([], [])
    lm = report["language_model"]
    assert (lm["hidden_size"], lm["num_layers"]) == (width, 2) and lm["params"] > 0
    skeleton = report.get("perceiver", report)  # the DPA model's perceiver is the baseline's skeleton
    assert skeleton["vision"]["hidden_size"] == 32 and skeleton["vision"]["num_layers"] == 2
    assert skeleton["language_model"]["class"] == "Qwen2_5_VLQwen3TextModel"
    assert skeleton["projector"]["params"] == 4 * 32 * 4 * 32 + 4 * 32 + 32 * 4 * 32 + 32 + 32  # merger: ln_q + MLP
    if family == OFFICIAL:
        assert report["perceiver"]["family"] == "llava_baseline" and lm["class"] == "Qwen3Model"
        assert report["projector"]["params"] == 32 * 32 + 32 + 64 * 32 + 64  # linear_align_dim: 32 -> 32 -> 64
    assert report["image_token_id"] == tiny_tokenizer("qwen3").convert_tokens_to_ids("<|image_pad|>")


def test_the_official_baseline_upgrades_with_the_official_perceiver(official, paper_hub, tmp_path):
    """`dpa upgrade HW --perceiver LB`: the target's Qwen3 LM and the perceiver's skeleton, bit for bit; the
    perceiver's RoPE theta from its own config, its sections from vit_path's; no official code runs."""
    hw, lb = official["hw legacy names"], official["llava_baseline pytorch_model.bin"]
    result = upgrade_json([str(hw), "--perceiver", str(lb), "-o", str(tmp_path / "ws")], paper_hub)
    plan = result["plan"]
    assert (plan["target"]["family"], plan["perceiver"]["family"], plan["perceiver"]["builds"]) == (
        "qwen_custom_vl_hw_new",
        "llava_baseline",
        "qwen2_5_vl_qwen3",
    )
    assert "perceiver lm_head" in plan["dropped"] and "target vision" in plan["dropped"]
    config = json.loads((tmp_path / "ws" / "model" / "config.json").read_text())
    assert config["text_config"]["model_type"] == "qwen3"  # the target LLM: 1-D positions, as the official thinker
    rope = config["perceiver_config"]["text_config"]["rope_parameters"]
    assert rope == {"mrope_section": [2, 3, 3], "rope_theta": 1000000.0, "rope_type": "default"}
    written = read_tensors(tmp_path / "ws" / "model")
    for key, tensor in torch.load(lb / "pytorch_model.bin", weights_only=True).items():
        if key.startswith("model.vlm."):
            assert torch.equal(written[key.replace("model.vlm.", "model.perceiver.", 1)], tensor), key
    for key, tensor in read_tensors(hw).items():
        if key.startswith("model."):
            assert torch.equal(written[key.replace("model.", "model.language_model.", 1)], tensor), key


def _cache_without(paper_hub: dict[str, str], repo_id: str, root: Path) -> dict[str, str]:
    cache = Path(shutil.copytree(paper_hub["HF_HUB_CACHE"], root / "hub", symlinks=True))
    shutil.rmtree(cache / f"models--{repo_id.replace('/', '--')}")
    return {"HF_HUB_CACHE": str(cache)}


# (format, the hub id left out of the cache, the config key that names it, command)
MISSING_IDS = [
    (fmt, repo, key, command)
    for fmt, ids in {
        "llava_baseline pytorch_model.bin": {VIT: "vit_path", PERCEIVER_LM: "llm_path"},
        "official DPA, both head aliases": {THINKER: "thinker_name_or_path", VIT: "vit_path"},
    }.items()
    for repo, key in ids.items()
    for command in ("inspect", "upgrade")
]


@pytest.mark.parametrize(("fmt", "repo", "key", "command"), MISSING_IDS)
def test_a_hub_id_the_official_config_names_missing_offline_is_named(
    official, paper_hub, tiny_checkpoint, tmp_path, fmt, repo, key, command
):
    env = _cache_without(paper_hub, repo, tmp_path)
    folder = official[fmt]
    if command == "inspect":
        argv = ["inspect", str(folder)]
    elif fmt.startswith("llava_baseline"):
        target = str(tiny_checkpoint("causal_lm_qwen3"))
        argv = ["upgrade", target, "--perceiver", str(folder), "-o", str(tmp_path / "o")]
    else:
        argv = ["upgrade", str(folder), "-o", str(tmp_path / "o")]
    nested = "perceiver_config." if fmt.startswith("official") and key != "thinker_name_or_path" else ""
    needles = (
        f"{folder}/config.json: {nested}{key} {repo!r}",
        "not in the local Hugging Face cache",
        f"hf download {repo}",
    )
    assert_refused(argv, needles, folder, tmp_path, env=env)


def test_an_official_perceiver_whose_rotary_does_not_fit_its_lm_is_refused(
    official, paper_hub, tiny_checkpoint, tmp_path
):
    folder = copy_checkpoint(official["llava_baseline safetensors"], tmp_path / "lb")
    edit_json(folder / "config.json", lambda config: config.update(head_dim=8))
    argv = ["upgrade", str(tiny_checkpoint("causal_lm_qwen3")), "--perceiver", str(folder), "-o", str(tmp_path / "o")]
    needles = ("config.json: head_dim 8 (the perceiver's rotary size", "the head_dim 16 of llm_path Qwen/Qwen3-0.6B")
    assert_refused(argv, needles, tmp_path, env=paper_hub)


# --- an official DPA checkpoint in, plain transformers out -----------------------------------------------------
OFFICIAL_TO_DPA = (  # what renaming only means, name by name (the thinker's tied head copies are not kept)
    ("model.perceiver.model.vlm.", "model.perceiver."),
    ("model.thinker.model.", "model.language_model."),
    ("model.linear_align_dim.0.", "model.multi_modal_projector.linear_1."),
    ("model.linear_align_dim.2.", "model.multi_modal_projector.linear_2."),
)


def _byte_hashes(tensors: dict[str, torch.Tensor]) -> dict[str, str]:
    return {
        name: hashlib.sha256(t.contiguous().view(torch.uint8).numpy().tobytes()).hexdigest() + str(t.dtype)
        for name, t in tensors.items()
    }


def _renamed(official: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {}
    for key, tensor in official.items():
        for old, new in OFFICIAL_TO_DPA:
            if key.startswith(old):
                out[new + key[len(old) :]] = tensor
    return out


@pytest.mark.parametrize("fmt", ["official DPA .bin, heads absent", "official DPA, both head aliases"])
def test_an_official_dpa_checkpoint_becomes_a_workspace_by_renaming_only(official, paper_hub, tmp_path, fmt):
    source = official[fmt]
    result = upgrade_json([str(source), "-o", str(tmp_path / "ws")], paper_hub)
    stored = (
        torch.load(source / "pytorch_model.bin", weights_only=True) if fmt.endswith("absent") else read_tensors(source)
    )
    for head in HEAD_ALIASES:  # tied copies, when stored, are the embedding itself
        assert head not in stored or torch.equal(stored[head], stored["model.thinker.model.embed_tokens.weight"])
    assert _byte_hashes(read_tensors(tmp_path / "ws" / "model")) == _byte_hashes(_renamed(stored))
    plan = result["plan"]
    assert plan["converted"] and plan["new"] == {} and plan["target"]["family"] == OFFICIAL
    config = json.loads((tmp_path / "ws" / "model" / "config.json").read_text())
    # The official forward: N+2 features (start..end inclusive), the thinker a plain Qwen3 (1-D positions), phi
    # Linear-ReLU-Linear with bias.
    assert (config["feature_span"], config["projector_type"], config["text_config"]["model_type"]) == (
        "image+markers",
        "mlp2x_relu",
        "qwen3",
    )
    assert config["encoding"] == "paper" and config["target_marker_token_ids"] == [323, 324]  # start, end slots
    assert result["upgrade"]["loaded"]["image_features"] == 4 + 2


def _caption_data(root: Path) -> tuple[Path, Path]:
    images = root / "images"
    images.mkdir(parents=True)
    random_images([(56, 56)])[0].save(images / "a.png")
    sample = {
        "image": "a.png",
        "conversations": [
            {"from": "human", "value": "<image>\nDescribe it."},
            {"from": "gpt", "value": "A noisy square."},
        ],
    }
    (root / "captions.json").write_text(json.dumps([sample, {**sample, "id": "b"}]))
    return root / "captions.json", images


TRAIN_SMALL = [
    "--set",
    "global_batch_size=2",
    "--set",
    "per_device_train_batch_size=1",
    "--set",
    "save_steps=1000",
    "--set",
    "max_length=512",
    "--set",
    "gradient_checkpointing=false",
    "--max-steps",
    "1",
    "--set",
    "warmup_steps=0",
    "--set",
    "lr_scheduler_type=constant",
    "--set",
    "lr_scheduler_kwargs={}",
]


def test_an_official_dpa_workspace_trains_and_exports_to_plain_transformers(official, paper_hub, tmp_path):
    ws, export = tmp_path / "ws", tmp_path / "export"
    upgrade_json([str(official["official DPA, one alias, fp32"]), "-o", str(ws), "--no-verify-load"], paper_hub)
    captions, images = _caption_data(tmp_path / "data")
    trained = runner.invoke(
        app,
        [
            "train",
            "--stage",
            "1",
            "-w",
            str(ws),
            "--data",
            str(captions),
            "--image-root",
            str(images),
            *TRAIN_SMALL,
            "--json",
        ],
        env=paper_hub,
    )
    assert trained.exit_code == 0, (trained.stderr[-3000:], trained.exception)
    before, after = read_tensors(ws / "model"), read_tensors(ws / "stage1" / "model")
    changed = {name for name in before if not torch.equal(before[name], after[name])}
    assert changed and all(name.startswith("model.multi_modal_projector.") for name in changed)  # stage 1: phi only
    # Its own check loads the export in a fresh interpreter too; the one below is the same with its own batch.
    exported = runner.invoke(app, ["export", "-w", str(ws), "-o", str(export), "--no-verify", "--json"])
    assert exported.exit_code == 0, (exported.stderr[-3000:], exported.exception)
    model = loading.load_model(ws / "stage1" / "model", dtype=torch.float32).eval()
    processor = loading.load_processor(ws / "stage1" / "model")
    batch = dict(
        processor(
            images=random_images([(56, 56)]), text=[f"{processor.image_token}\nDescribe it."], return_tensors="pt"
        )
    )
    torch.save(batch, tmp_path / "batch.pt")
    with torch.no_grad():
        torch.save(model(**batch).logits, tmp_path / "expected.pt")
    script = f"""
import sys, torch
from transformers import AutoModelForImageTextToText
model = AutoModelForImageTextToText.from_pretrained({str(export)!r}, trust_remote_code=True, dtype=torch.float32)
assert not any(name.startswith("dpa_cli") for name in sys.modules), "dpa_cli was imported"
assert type(model.model.perceiver).__name__ == "Qwen2_5_VLQwen3Model", type(model.model.perceiver)
with torch.no_grad():
    logits = model.eval()(**torch.load({str(tmp_path / "batch.pt")!r})).logits
print((logits - torch.load({str(tmp_path / "expected.pt")!r})).abs().max().item())
"""
    run = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": ""},
    )
    assert run.returncode == 0, run.stderr[-3000:]
    assert float(run.stdout.strip().splitlines()[-1]) <= 1e-5


class Booby:
    """Unpickling this runs code (writes a marker file): what a hostile pytorch_model.bin would do."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.write_text, (self.marker, "unpickled"))


def _head_differs(alias: str):
    def change(folder: Path) -> None:
        tensors = read_tensors(folder)
        tensors[alias] = tensors["model.thinker.model.embed_tokens.weight"].clone()
        tensors[alias][0, 0] += 1  # one element off: not a copy of the tied head
        save_file(tensors, folder / "model.safetensors")

    return change


def _without(key: str):
    def change(folder: Path) -> None:
        tensors = read_tensors(folder)
        del tensors[key]
        save_file(tensors, folder / "model.safetensors")

    return change


def _hostile_pickle(folder: Path) -> None:
    (folder / "model.safetensors").unlink()
    (folder / "pytorch_model.bin").write_bytes(pickle.dumps({"w": Booby(folder.parent / "pwned")}))


# What an official DPA checkpoint may not be or be asked, each spelled several ways: (change, extra argv, needles)
CONVERSION_REFUSALS = {
    "tied head copy differs (lm_head.weight)": (
        _head_differs("lm_head.weight"),
        [],
        ("lm_head.weight differs from", "ties it to its input embedding"),
    ),
    "tied head copy differs (thinker alias)": (
        _head_differs("model.thinker.lm_head.weight"),
        [],
        ("model.thinker.lm_head.weight differs from",),
    ),
    "phi weight missing": (
        _without("model.linear_align_dim.2.bias"),
        [],
        ("needs model.multi_modal_projector.linear_2.bias", "no source checkpoint holds it"),
    ),
    "a thinker layer missing": (
        _without("model.thinker.model.layers.1.mlp.up_proj.weight"),
        [],
        ("model.language_model.layers.1.mlp.up_proj.weight",),
    ),
    "a pickle that carries code": (_hostile_pickle, [], ("pytorch_model.bin: not a weights-only torch file",)),
    "--perceiver given": (None, ["--perceiver", "qwen3-0.6b-vl"], ("already has its perceiver", "drop --perceiver")),
    "--perceiver given as a folder": (None, ["-p", "{tiny:qwen2_5_vl}"], ("already has its perceiver",)),
    "--projector other than phi's": (None, ["--projector", "linear"], ("--projector linear", "mlp2x_relu")),
    "--perceiver-layers": (None, ["--perceiver-layers", "1"], ("--perceiver-layers does not apply",)),
    "--feature-span image": (None, ["--feature-span", "image"], ("--feature-span image: an official DPA",)),
}


@pytest.mark.parametrize("case", CONVERSION_REFUSALS.values(), ids=list(CONVERSION_REFUSALS))
def test_an_official_dpa_checkpoint_that_cannot_be_renamed_as_is_is_refused(
    official, paper_hub, tiny_checkpoint, tmp_path, case
):
    change, extra, needles = case
    folder = copy_checkpoint(official["official DPA, both head aliases"], tmp_path / "official")
    if change is not None:
        change(folder)
    extra = [str(tiny_checkpoint(a[6:-1])) if a.startswith("{tiny:") else a for a in extra]
    assert_refused(["upgrade", str(folder), "-o", str(tmp_path / "ws"), *extra], needles, tmp_path, env=paper_hub)
    assert not (tmp_path / "pwned").exists()


@pytest.mark.parametrize("target", ["llava_next", "causal_lm_qwen3", "paper_vl", "dpa"])
def test_a_target_that_is_not_an_official_dpa_checkpoint_needs_a_perceiver(tiny_checkpoint, tmp_path, target):
    argv = ["upgrade", str(tiny_checkpoint(target)), "-o", str(tmp_path / "ws")]
    assert_refused(argv, ("--perceiver is missing", "only an official DPA checkpoint"), tmp_path)


def test_an_official_dpa_checkpoint_without_processor_files_takes_the_one_its_config_names(
    official, paper_hub, tmp_path
):
    folder = copy_checkpoint(official["official DPA .bin, heads absent"], tmp_path / "official")
    for name in ("preprocessor_config.json", "tokenizer_config.json", "tokenizer.json", "chat_template.jinja"):
        (folder / name).unlink(missing_ok=True)
    upgrade_json([str(folder), "-o", str(tmp_path / "ws"), "--no-verify-load"], paper_hub)
    processor = loading.load_processor(tmp_path / "ws" / "model")  # the folder has none: p_processor_name_or_path's
    assert processor.perceiver_tokenizer.get_vocab() == loading.load_tokenizer(_snapshot(paper_hub, VIT)).get_vocab()
    assert "<think>" in processor.tokenizer.get_vocab()  # the thinker's: t_tokenizer_name_or_path (Qwen3)
    assert "<think>" not in processor.perceiver_tokenizer.get_vocab()  # Qwen2.5-VL's has no think tokens


# (target, perceiver, extra argv) -> the encoding the upgrade picks when --encoding is not given (or is)
PAIR_ENCODINGS = {
    "paper pair, composed": ("causal_lm_qwen3", PAPER_PAIR, [], "paper"),
    "paper pair, composed, --encoding dpa": ("causal_lm_qwen3", PAPER_PAIR, ["--encoding", "dpa"], "dpa"),
    "paper pair, existing skeleton": ("causal_lm_qwen3", "{paper_vl}", [], "paper"),
    "paper baseline + its own ViT composed": ("{paper_vl}", "qwen3-0.6b-vl", [], "paper"),
    "stock Qwen2.5-VL perceiver": ("causal_lm_qwen3", "{qwen2_5_vl}", [], "dpa"),
    "skeleton perceiver, Llama target": ("causal_lm_llama", "{paper_vl}", [], "dpa"),
    "LLaVA-NeXT ViT composed": ("llava_next", "vit=target,lm=Qwen/Qwen3-0.6B", [], "dpa"),
}


@pytest.mark.parametrize("case", PAIR_ENCODINGS.values(), ids=list(PAIR_ENCODINGS))
def test_the_papers_pair_gets_the_paper_encoding_unless_told_otherwise(paper_hub, tiny_checkpoint, case):
    target, perceiver, extra, encoding = case
    target, perceiver = (str(tiny_checkpoint(s[1:-1])) if s.startswith("{") else s for s in (target, perceiver))
    target = target if "/" in target else str(tiny_checkpoint(target))
    result = upgrade_json([target, "--perceiver", perceiver, *extra, "--dry-run"], paper_hub)
    assert (result["config"]["encoding"], result["config"]["feature_span"]) == (
        encoding,
        "image+markers" if encoding == "paper" else "image",
    )
    assert ("the paper's pair: --encoding paper" in " ".join(result["notes"])) == (encoding == "paper" and not extra)
