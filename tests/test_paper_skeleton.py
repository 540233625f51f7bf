"""The DPA paper's skeleton (Qwen2.5-VL ViT + merger at the LM width + Qwen3 blocks with M-RoPE) as a family:
the model class, composing the paper's perceiver, the three official on-disk formats, and an official DPA
checkpoint turned into a workspace by renaming only."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModel, Qwen3Config, Qwen3Model
from typer.testing import CliRunner

from dpa_cli.cli.app import app
from dpa_cli.families import detect_family
from dpa_cli.model import DPAConfig, DPAForConditionalGeneration, Qwen2_5_VLQwen3Model
from tests.factories import copy_checkpoint, tiny_config, tiny_model
from tests.test_bad_inputs import edit_json, tree_hash
from tests.tiny_dpa import PERCEIVER_IMAGE, TARGET_IMAGE, feature_counts, perceiver_inputs, random_images, target_batch


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
    return dict(input_ids=ids, attention_mask=torch.ones_like(ids), mm_token_type_ids=(ids == pad).int(),
                pixel_values=pixels["pixel_values"], image_grid_thw=pixels["image_grid_thw"])  # fmt: skip


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
    perceiver = tiny_config("paper_vl", image_token_id=PERCEIVER_IMAGE, vision_start_token_id=291,
                            vision_end_token_id=292, text_config=dict(vocab_size=300, pad_token_id=None, bos_token_id=0,
                                                                       eos_token_id=1))  # fmt: skip
    text = Qwen3Config(hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, head_dim=12, vocab_size=320)  # fmt: skip
    torch.manual_seed(0)
    model = DPAForConditionalGeneration(DPAConfig(perceiver_config=perceiver, text_config=text,
                                                  image_token_id=TARGET_IMAGE)).eval()  # fmt: skip
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
    config = {**config, "model_type": "qwen2_5_vl", "text_config": {**text, "model_type": "qwen2_5_vl_text", **spelling}}
    family = detect_family(config)
    assert family.name == "qwen2_5_vl_qwen3"
    native = family.native_config(config)
    assert native["model_type"] == "qwen2_5_vl_qwen3" and native["text_config"]["rope_parameters"]["mrope_section"]
    stock = {**config, "text_config": {**text, "model_type": "qwen2_5_vl_text"}}
    assert detect_family(stock).name == "qwen2_5_vl"


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
