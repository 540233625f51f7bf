"""The tiny checkpoints are real: they reload with the transformers classes, run, and carry real tokenizers."""

from __future__ import annotations

import json
import time

import pytest
import torch
import transformers as tf

from tests.factories import SPECS, build_sharded, example_inputs, read_keys, tiny_config
from tests.tiny_tokenizers import TOKENIZERS, tiny_tokenizer

HF_SPECS = [name for name, spec in SPECS.items() if spec.prefix]
HAND_SPECS = [name for name, spec in SPECS.items() if not spec.prefix]


def _vocab(config: dict) -> int:
    """vocab_size of the language model: in text_config, or at the top for plain and original-LLaVA LMs."""
    return config.get("text_config", config)["vocab_size"]


@pytest.mark.parametrize("layout", ["hub", "v5"])
@pytest.mark.parametrize("name", HF_SPECS)
def test_checkpoint_reloads_with_its_class_and_runs(tiny_checkpoint, name, layout):
    folder = tiny_checkpoint(name, layout=layout)
    model, info = SPECS[name].model_class.from_pretrained(folder, output_loading_info=True)
    assert {k: v for k, v in info.items() if v} == {}, "every key on disk loads, none is missing"
    inputs = example_inputs(name, folder, model)
    with torch.no_grad():
        logits = model(**inputs).logits
    assert logits.shape == (*inputs["input_ids"].shape, len(tf.AutoTokenizer.from_pretrained(folder)))
    assert torch.isfinite(logits).all()


@pytest.mark.parametrize("name", list(SPECS))
def test_tokenizer_matches_config_and_round_trips(tiny_checkpoint, name):
    folder = tiny_checkpoint(name)
    tokenizer = tf.AutoTokenizer.from_pretrained(folder)
    config = json.loads((folder / "config.json").read_text())
    assert _vocab(config) == len(tokenizer)
    text = "A picture of a cat on a mat."
    assert tokenizer.decode(tokenizer(text, add_special_tokens=False)["input_ids"]) == text
    for token in TOKENIZERS[SPECS[name].tokenizer].specials:
        ids = tokenizer(token, add_special_tokens=False)["input_ids"]
        assert len(ids) == 1 and tokenizer.convert_ids_to_tokens(ids[0]) == token
    has_template = TOKENIZERS[SPECS[name].tokenizer].template is not None
    assert (tokenizer.chat_template is not None) == has_template


def test_qwen3_template_opens_an_empty_think_block_before_the_answer():
    tokenizer = tiny_tokenizer("qwen3")
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]
    rendered = tokenizer.apply_chat_template(messages, tokenize=False)
    assert rendered.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\nHello<|im_end|>\n")
    prompt = tokenizer.apply_chat_template(
        messages[:1], tokenize=False, add_generation_prompt=True, enable_thinking=False
    )
    assert prompt.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")


@pytest.mark.parametrize(
    ("kind", "expected"),
    [
        ("qwen3_llava", "<|im_start|>user\n<image>\nWhat?<|im_end|>\n"),
        ("qwen2", "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>What?<|im_end|>\n"),
        ("llama3", "<|start_header_id|>user<|end_header_id|>\n\n<image>\nWhat?<|eot_id|>"),
        ("idefics3", "User:<image>What?<end_of_utterance>\n"),
    ],
)
def test_templates_put_the_family_image_marker_in_the_user_turn(kind, expected):
    message = {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What?"}]}
    assert expected in tiny_tokenizer(kind).apply_chat_template([message], tokenize=False)


def test_tokenizer_training_is_cached_and_fast():
    tiny_tokenizer("qwen3")
    start = time.perf_counter()
    for kind in TOKENIZERS:
        tiny_tokenizer(kind)
    assert time.perf_counter() - start < 1.0


@pytest.mark.parametrize("name", HF_SPECS)
def test_tiny_config_takes_nested_overrides(name):
    composite = SPECS[name].family != "causal_lm"
    overrides = {"text_config": {"num_hidden_layers": 1}} if composite else {"num_hidden_layers": 1}
    assert tiny_config(name, **overrides).get_text_config().num_hidden_layers == 1


def test_sharded_checkpoint_has_an_index_and_reloads(tmp_path):
    folder = build_sharded("llava_next", tmp_path / "sharded")
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1 and shards[0].startswith("model-00001-of-")
    assert set(index["weight_map"]) == set(read_keys(folder))
    model, info = SPECS["llava_next"].model_class.from_pretrained(folder, output_loading_info=True)
    assert not any(info.values())


@pytest.mark.parametrize("name", HAND_SPECS)
def test_hand_written_checkpoints_hold_the_original_key_layout(tiny_checkpoint, name):
    keys = read_keys(tiny_checkpoint(name))
    config = json.loads((tiny_checkpoint(name) / "config.json").read_text())
    if SPECS[name].family == "dpa":
        assert {k.split(".")[1] for k in keys if k.startswith("model.")} == {
            "perceiver",
            "multi_modal_projector",
            "language_model",
        }
        return
    hidden, width = config["hidden_size"], config["mm_hidden_size"]
    assert keys["model.mm_projector.0.weight"] == [hidden, width]
    assert keys["model.mm_projector.2.weight"] == [hidden, hidden]
    assert keys["lm_head.weight"] == [config["vocab_size"], hidden]
    has_vit = any(k.startswith("model.vision_tower.vision_tower.vision_model.") for k in keys)
    assert has_vit == SPECS[name].options.get("vision_weights", True)
    assert ("model.image_newline" in keys) == (config["image_aspect_ratio"] == "anyres")
