"""The DPA model: forward/backward, generation with the perceiver run once, save/load, errors."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoConfig, AutoModelForImageTextToText

from dpa_cli.model import DPAConfig, DPAFeatureMismatchError, DPAForConditionalGeneration
from tests.factories import SPECS, example_inputs, tiny_config
from tests.tiny_dpa import (
    PERCEIVER_IMAGE,
    TARGET_IMAGE,
    feature_counts,
    perceiver_inputs,
    qwen3_target_config,
    random_images,
    target_batch,
    tiny_dpa,
)

MODEL_DIR = Path(__file__).resolve().parents[1] / "dpa_cli" / "model"


@pytest.fixture(scope="module")
def images():
    # Two sizes, so the two images give different feature counts.
    return random_images([(56, 84), (28, 56)])


@pytest.fixture(scope="module")
def batch(images):
    p_inputs = perceiver_inputs(images)
    counts = feature_counts(p_inputs)
    t_inputs = target_batch([[[5, 6], [7, 8, 9]], [[10], [11, 12]]], counts)
    labels = t_inputs["input_ids"].masked_fill(t_inputs["input_ids"] == TARGET_IMAGE, -100)
    labels = labels.masked_fill(t_inputs["attention_mask"] == 0, -100)
    return {**t_inputs, **p_inputs, "labels": labels}


def test_forward_backward_reaches_every_component(batch):
    model = tiny_dpa().train()
    out = model(**batch)
    assert torch.isfinite(out.loss)
    assert out.logits.shape == (*batch["input_ids"].shape, model.config.text_config.vocab_size)
    out.loss.backward()
    grads = {
        "vit": model.model.perceiver.visual.patch_embed.proj.weight.grad,
        "perceiver_lm": model.model.perceiver.language_model.layers[-1].mlp.down_proj.weight.grad,
        "phi": model.model.multi_modal_projector.linear_2.weight.grad,
        "target": model.model.language_model.layers[0].self_attn.q_proj.weight.grad,
    }
    for name, grad in grads.items():
        assert grad is not None and grad.abs().sum() > 0, f"no gradient reached {name}"


def test_image_slots_receive_projected_final_norm_states(batch):
    model = tiny_dpa()
    with torch.no_grad():
        out = model(**batch)
        keys = ("pixel_values", "image_grid_thw", "perceiver_input_ids", "perceiver_attention_mask")
        p_kwargs = {k.removeprefix("perceiver_"): batch[k] for k in keys}
        perceiver_out = model.model.perceiver(**p_kwargs, mm_token_type_ids=batch["perceiver_mm_token_type_ids"])
        hidden = perceiver_out.last_hidden_state
        expected = model.model.multi_modal_projector(hidden[batch["perceiver_input_ids"] == PERCEIVER_IMAGE])
    torch.testing.assert_close(out.image_hidden_states, expected)
    assert out.image_hidden_states.shape[0] == sum(feature_counts(batch))


def test_perceiver_gets_3d_mrope_positions(batch):
    """Qwen2.5-VL silently falls back to 1-D positions without mm_token_type_ids; ours must be 3-D."""
    model = tiny_dpa()
    seen = {}

    def capture(module, args, kwargs):
        seen["position_ids"] = kwargs.get("position_ids")

    model.model.perceiver.language_model.register_forward_pre_hook(capture, with_kwargs=True)
    with torch.no_grad():
        model(**batch)
    positions = seen["position_ids"]
    assert positions is not None and positions.shape[-2:] == batch["perceiver_input_ids"].shape
    image_rows = positions[-2, 0][batch["perceiver_input_ids"][0] == PERCEIVER_IMAGE]
    image_cols = positions[-1, 0][batch["perceiver_input_ids"][0] == PERCEIVER_IMAGE]
    assert not torch.equal(image_rows, image_cols), "height and width positions are identical: 1-D fallback"


def test_markers_span_adds_two_features_per_image(images):
    model = tiny_dpa(feature_span="image+markers")
    p_inputs = perceiver_inputs(images)
    counts = feature_counts(p_inputs, span="image+markers")
    assert counts == [n + 2 for n in feature_counts(p_inputs)]
    t_inputs = target_batch([[[5], [6]], [[7], [8]]], counts)
    with torch.no_grad():
        out = model(**t_inputs, **p_inputs)
    assert out.image_hidden_states.shape[0] == sum(counts)


def test_feature_count_mismatch_names_both_counts(batch):
    model = tiny_dpa()
    short = {**batch}
    short["input_ids"] = batch["input_ids"].clone()
    first_slot = (short["input_ids"] == TARGET_IMAGE).nonzero()[0]
    short["input_ids"][first_slot[0], first_slot[1]] = 5
    n_features = sum(feature_counts(batch))
    with pytest.raises(DPAFeatureMismatchError, match=rf"{n_features} image features .* {n_features - 1} image-token"):
        model(**short)


def _generate(model, images, **kwargs):
    p_inputs = perceiver_inputs(images)
    t_inputs = target_batch([[[5, 6], [7, 8, 9]], [[10], [11, 12]]], feature_counts(p_inputs), left_pad=True)
    return model.generate(**t_inputs, **p_inputs, max_new_tokens=6, do_sample=False, **kwargs), t_inputs, p_inputs


def test_generate_runs_perceiver_once_and_matches_full_recompute(images):
    model = tiny_dpa()
    calls = []
    model.model.perceiver.register_forward_hook(lambda *args: calls.append(1))
    generated, t_inputs, p_inputs = _generate(model, images)
    assert len(calls) == 1, f"perceiver ran {len(calls)} times for one prompt"
    # Greedy decoding without any cache: recompute the whole sequence each step and take the argmax.
    ids, mask = t_inputs["input_ids"], t_inputs["attention_mask"]
    with torch.no_grad():
        for _ in range(generated.shape[1] - ids.shape[1]):
            position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
            logits = model(input_ids=ids, attention_mask=mask, position_ids=position_ids, **p_inputs).logits
            next_ids = logits[:, -1].argmax(-1, keepdim=True)
            ids, mask = torch.cat([ids, next_ids], 1), torch.cat([mask, torch.ones_like(next_ids)], 1)
    assert torch.equal(generated, ids)


def test_beam_search_expands_per_image_features(images):
    model = tiny_dpa()
    beams, _, _ = _generate(model, images, num_beams=2, num_return_sequences=2)
    assert beams.shape[0] == 4


def test_save_load_round_trip_gives_identical_logits(tmp_path, batch):
    model = tiny_dpa()
    model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["model_type"] == "dpa"
    assert config["auto_map"]["AutoModelForImageTextToText"] == "modeling_dpa.DPAForConditionalGeneration"
    assert (tmp_path / "modeling_dpa.py").exists() and (tmp_path / "configuration_dpa.py").exists()
    reloaded = AutoModelForImageTextToText.from_pretrained(tmp_path, trust_remote_code=True).eval()
    with torch.no_grad():
        assert torch.equal(model(**batch).logits, reloaded(**batch).logits)


def test_plain_transformers_loads_the_remote_code_without_dpa_cli(tmp_path, batch):
    model = tiny_dpa()
    model.save_pretrained(tmp_path / "model")
    torch.save({k: v for k, v in batch.items()}, tmp_path / "batch.pt")
    with torch.no_grad():
        torch.save(model(**batch).logits, tmp_path / "expected.pt")
    script = f"""
import sys, torch
from transformers import AutoModelForImageTextToText
model = AutoModelForImageTextToText.from_pretrained({str(tmp_path / "model")!r}, trust_remote_code=True).eval()
assert not any(name.startswith('dpa_cli') for name in sys.modules), 'dpa_cli was imported'
batch = torch.load({str(tmp_path / "batch.pt")!r})
with torch.no_grad():
    logits = model(**batch).logits
print((logits - torch.load({str(tmp_path / "expected.pt")!r})).abs().max().item())
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    assert float(result.stdout.strip().splitlines()[-1]) == 0.0


@pytest.mark.parametrize("tie", [True, False])
def test_output_embeddings_tie_follows_the_target(tmp_path, tie):
    model = tiny_dpa(tie=tie)
    assert model.config.tie_word_embeddings is tie
    shared = model.lm_head.weight is model.model.language_model.embed_tokens.weight
    assert shared is tie
    model.save_pretrained(tmp_path)
    reloaded = DPAForConditionalGeneration.from_pretrained(tmp_path)
    assert (reloaded.lm_head.weight is reloaded.model.language_model.embed_tokens.weight) is tie
    torch.testing.assert_close(reloaded.lm_head.weight, model.lm_head.weight, rtol=0, atol=0)


def _counting(forward, counter: dict, name: str):
    def wrapped(*args, **kwargs):
        counter[name] += 1
        return forward(*args, **kwargs)

    return wrapped


def test_gradient_checkpointing_recomputes_layers_and_keeps_gradients(batch):
    grads, calls = [], []
    for checkpointing in (False, True):
        model = tiny_dpa(seed=1).train()
        if checkpointing:
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        counter = {"perceiver": 0, "target": 0}
        # Module hooks do not fire during the recompute, so count calls of an inner module's forward itself.
        mlps = {
            "perceiver": model.model.perceiver.language_model.layers[0].mlp,
            "target": model.model.language_model.layers[0].mlp,
        }
        for name, mlp in mlps.items():
            mlp.forward = _counting(mlp.forward, counter, name)
        model(**batch).loss.backward()
        grads.append(model.model.perceiver.language_model.layers[0].mlp.up_proj.weight.grad.clone())
        calls.append(counter)
    # A checkpointed layer runs its forward again during backward, in the perceiver and in the target.
    assert calls[0] == {"perceiver": 1, "target": 1}
    assert calls[1] == {"perceiver": 2, "target": 2}
    torch.testing.assert_close(grads[0], grads[1])


def test_sdpa_matches_eager_attention(tmp_path, batch):
    tiny_dpa().save_pretrained(tmp_path)
    logits = {}
    for impl in ("sdpa", "eager"):
        model = DPAForConditionalGeneration.from_pretrained(tmp_path, attn_implementation=impl).eval()
        assert model.model.language_model.config._attn_implementation == impl
        assert model.model.perceiver.config.get_text_config()._attn_implementation == impl
        with torch.no_grad():
            logits[impl] = model(**batch).logits
    torch.testing.assert_close(logits["sdpa"], logits["eager"], rtol=1e-4, atol=1e-4)


def test_bf16_forward_and_loss(batch):
    model = tiny_dpa().to(torch.bfloat16)
    inputs = {**batch, "pixel_values": batch["pixel_values"].to(torch.bfloat16)}
    out = model(**inputs)
    assert out.logits.dtype == torch.bfloat16
    assert torch.isfinite(out.loss)


def test_registered_with_auto_classes():
    config = AutoConfig.for_model("dpa", image_token_id=7)
    assert isinstance(config, DPAConfig)
    assert AutoModelForImageTextToText._model_mapping[DPAConfig] is DPAForConditionalGeneration


def test_config_rejects_unknown_choices():
    with pytest.raises(ValueError, match="projector_type"):
        DPAConfig(projector_type="mlp9x")
    with pytest.raises(ValueError, match="perceiver_marker_token_ids"):
        DPAConfig(feature_span="image+markers", perceiver_marker_token_ids=[])


def test_model_files_import_only_torch_and_transformers():
    """The model files travel as remote code: the standard library, torch, transformers and Pillow (which every
    image processor needs) only; never dpa_cli."""
    allowed = {"torch", "transformers", "PIL", *sys.stdlib_module_names}
    for path in MODEL_DIR.glob("*_dpa.py"):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                roots = {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                roots = {node.module.split(".")[0]}
            else:
                continue
            assert roots <= allowed, f"{path.name} imports {roots - allowed}"


def _as_perceiver_inputs(inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A perceiver family's processor output -> DPA inputs: sequence-level keys get the `perceiver_` prefix.

    OneVision's `batch_num_images` is dropped: each DPA perceiver sequence holds exactly one image, which
    is what OneVision assumes without it.
    """
    sequence_keys = {"input_ids", "attention_mask", "mm_token_type_ids"}
    return {(f"perceiver_{k}" if k in sequence_keys else k): v for k, v in inputs.items() if k != "batch_num_images"}


@pytest.mark.parametrize("perceiver", ["llava_next", "llava_onevision", "qwen2_vl", "qwen3_vl", "idefics3", "smolvlm"])
def test_every_perceiver_family_feeds_the_target(tiny_checkpoint, perceiver):
    """The perceiver is built with the Auto classes from its config: any family transformers knows."""
    torch.manual_seed(0)
    perceiver_model = SPECS[perceiver].model_class(tiny_config(perceiver)).eval()
    p_inputs = example_inputs(perceiver, tiny_checkpoint(perceiver), perceiver_model)
    config = DPAConfig(
        perceiver_config=tiny_config(perceiver), text_config=qwen3_target_config(), image_token_id=TARGET_IMAGE
    )
    model = DPAForConditionalGeneration(config).eval()
    n_features = int((p_inputs["input_ids"] == config.perceiver_image_token_id).sum())
    assert n_features > 0
    t_inputs = target_batch([[[5, 6], [7, 8]]], [n_features], left_pad=True)
    inputs = {**t_inputs, **_as_perceiver_inputs(p_inputs)}
    calls = []
    model.model.perceiver.register_forward_hook(lambda *args: calls.append(1))
    with torch.no_grad():
        out = model(**inputs)
        direct = model.model.perceiver(**p_inputs).last_hidden_state
        expected = model.model.multi_modal_projector(direct[p_inputs["input_ids"] == config.perceiver_image_token_id])
    torch.testing.assert_close(out.image_hidden_states, expected)
    calls.clear()
    generated = model.generate(**inputs, max_new_tokens=3, do_sample=False)
    assert generated.shape == (1, t_inputs["input_ids"].shape[1] + 3) and len(calls) == 1


def test_keepalive_runs_the_perceiver_with_zero_weight_and_gives_it_gradients(images):
    """A text-only batch in training still runs the perceiver (on a stand-in image), between the text embeddings
    and the target LLM as an image batch would; the shipped model's forward knows nothing of it."""
    from dpa_cli.train.keepalive import PerceiverKeepalive

    model = tiny_dpa().train()
    text = target_batch([[[5, 6, 7, 8]]], [])
    plain = model(**text, labels=text["input_ids"])
    order = []
    model.model.perceiver.register_forward_hook(lambda *args: order.append("perceiver"))
    model.model.language_model.register_forward_hook(lambda *args: order.append("llm"))
    keepalive = PerceiverKeepalive(model)
    keepalive.arm(perceiver_inputs(images[:1]))
    kept = model(**text, labels=text["input_ids"])
    assert order == ["perceiver", "llm"]
    torch.testing.assert_close(kept.logits, plain.logits)
    kept.loss.backward()
    grad = model.model.perceiver.language_model.layers[0].mlp.up_proj.weight.grad
    assert grad is not None and torch.count_nonzero(grad) == 0
    order.clear()
    model(**text)  # disarmed after one forward
    assert order == ["llm"]
