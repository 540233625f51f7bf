"""The DPA processor: each image's perceiver sequence is laid out as its perceiver family lays it out, the target
gets exactly as many image slots as the perceiver gives features, and a saved processor loads in plain transformers.

Real parts only: tiny checkpoints of every perceiver family (tokenizers, image processors, processor configs), a
tiny Qwen3 target with a real chat template, and real DPA models built from their configs.
"""

from __future__ import annotations

import functools
import json
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch
from transformers import AutoImageProcessor, AutoProcessor, AutoTokenizer, LlavaOnevisionProcessor

from dpa_cli.model import DPAConfig, DPAForConditionalGeneration, DPAProcessor
from dpa_cli.model.processing_dpa import onevision_feature_count
from tests.factories import tiny_config
from tests.tiny_processors import example_image
from tests.tiny_tokenizers import tiny_tokenizer

PERCEIVERS = ["qwen2_vl", "qwen2_5_vl", "qwen3_vl", "llava", "llava_next", "llava_onevision", "idefics3", "smolvlm"]
QWEN_VL = ["qwen2_vl", "qwen2_5_vl", "qwen3_vl"]
PIXEL_KEYS = ("pixel_values", "image_grid_thw", "image_sizes", "pixel_attention_mask")
QUESTION = "What is in the picture?"


def target_tokenizer():
    return tiny_tokenizer("qwen3_llava")  # Qwen3 chat template; an image renders as "<image>\n"


def dpa_config(perceiver: str, **overrides) -> DPAConfig:
    target, perceiver_config = target_tokenizer(), tiny_config(perceiver)
    markers = []
    if perceiver in QWEN_VL:
        markers = [perceiver_config.vision_start_token_id, perceiver_config.vision_end_token_id]
    return DPAConfig(
        perceiver_config=perceiver_config,
        text_config=tiny_config("causal_lm_qwen3", vocab_size=len(target)),
        image_token_id=target.convert_tokens_to_ids("<image>"),
        perceiver_marker_token_ids=markers,
        **overrides,
    )


@pytest.fixture
def dpa(tiny_checkpoint):
    """`dpa(perceiver, **config_overrides)` -> (processor, model): a tiny DPA model and its processor."""

    def make(perceiver: str, **overrides):
        folder, config = tiny_checkpoint(perceiver), dpa_config(perceiver, **overrides)
        processor_config = folder / "processor_config.json"
        processor = DPAProcessor.from_parts(
            AutoImageProcessor.from_pretrained(folder),
            AutoTokenizer.from_pretrained(folder),
            target_tokenizer(),
            config,
            json.loads(processor_config.read_text()) if processor_config.exists() else None,
        )
        torch.manual_seed(0)
        return processor, DPAForConditionalGeneration(config).eval()

    return make


def prompt(processor: DPAProcessor, images: int = 1) -> str:
    content = [{"type": "image"}] * images + [{"type": "text", "text": QUESTION}]
    return processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)


def target_slots(processor: DPAProcessor, inputs) -> list[int]:
    return (inputs["input_ids"] == processor.image_token_id).sum(-1).tolist()


def model_features(model: DPAForConditionalGeneration, inputs) -> list[int]:
    """Per image: how many positions of its perceiver sequence the DPA model turns into features."""
    return model.model.feature_mask(inputs["perceiver_input_ids"]).sum(-1).tolist()


def perceiver_own_counts(model: DPAForConditionalGeneration, inputs) -> list[int]:
    """Per image: how many features the perceiver model itself computes from the image tensors."""
    with torch.no_grad():
        features = model.model.perceiver.get_image_features(**{k: inputs[k] for k in PIXEL_KEYS if k in inputs})
    return [len(f) for f in features.pooler_output]


def forward(model: DPAForConditionalGeneration, inputs):
    with torch.no_grad():
        return model(**inputs)


@pytest.mark.parametrize("perceiver", PERCEIVERS)
def test_one_image_gets_as_many_target_slots_as_the_perceiver_gives_features(dpa, perceiver):
    processor, model = dpa(perceiver)
    inputs = processor(images=example_image(), text=prompt(processor))
    counts = perceiver_own_counts(model, inputs)
    assert len(counts) == 1 and counts[0] > 0
    assert target_slots(processor, inputs) == model_features(model, inputs) == counts
    out = forward(model, inputs)
    assert out.image_hidden_states.shape[0] == counts[0]
    assert torch.isfinite(out.logits).all()


@pytest.mark.parametrize("perceiver", PERCEIVERS)
def test_batch_with_0_1_and_2_images_of_different_sizes(dpa, perceiver):
    processor, model = dpa(perceiver)
    images = [example_image(40, 30), example_image(90, 50), example_image(30, 80)]
    texts = ["No image here.", prompt(processor), prompt(processor, images=2)]
    inputs = processor(images=[[], images[:1], images[1:]], text=texts)
    counts = perceiver_own_counts(model, inputs)
    assert counts == [perceiver_own_counts(model, processor(images=image, text="<image>"))[0] for image in images]
    assert model_features(model, inputs) == counts
    assert target_slots(processor, inputs) == [0, counts[0], counts[1] + counts[2]]
    # A flat list of images is matched to the samples in reading order.
    flat = processor(images=images, text=texts)
    assert flat.keys() == inputs.keys() and all(torch.equal(flat[k], inputs[k]) for k in inputs)
    assert forward(model, inputs).image_hidden_states.shape[0] == sum(counts)


@pytest.mark.parametrize(
    ("perceiver", "kwargs"),
    [("llava", {}), ("llava_next", {}), ("idefics3", {}), ("idefics3", {"do_image_splitting": False})],
)
def test_perceiver_sequence_is_what_the_family_processor_builds(dpa, tiny_checkpoint, perceiver, kwargs):
    """The family processor classes that build without torchvision, on the image alone."""
    processor, _ = dpa(perceiver)
    family_processor = AutoProcessor.from_pretrained(tiny_checkpoint(perceiver))
    image = example_image(90, 50)
    ours = processor(images=image, text="<image>", **kwargs)
    theirs = family_processor(images=[image], text=["<image>"], return_tensors="pt", **kwargs)
    mask = ours["perceiver_attention_mask"][0].bool()
    assert ours["perceiver_input_ids"][0][mask].tolist() == theirs["input_ids"][0].tolist()
    for key in PIXEL_KEYS:
        assert (key in ours) == (key in theirs)
        if key in theirs:
            assert torch.equal(ours[key], theirs[key]), key


def test_onevision_count_follows_the_family_rule_on_real_sized_grids():
    """The tiny OneVision grids never reach the `anyres_max_9` shrinking; real 384 px crops of 27 x 27 do. The
    family's rule is run unbound, as its class cannot be built without a torchvision video processor."""
    pinpoints = [[384 * i, 384 * j] for i in range(1, 7) for j in range(1, 7)]
    settings = {"num_image_tokens": 729, "vision_aspect_ratio": "anyres_max_9"}
    family = SimpleNamespace(
        image_processor=SimpleNamespace(image_grid_pinpoints=pinpoints),
        num_image_tokens=729,
        vision_aspect_ratio="anyres_max_9",
    )
    family._get_unpadded_features = functools.partial(LlavaOnevisionProcessor._get_unpadded_features, family)
    for size in [(384, 384), (480, 640), (300, 2000), (2000, 300), (1200, 1600), (3000, 4000), (4000, 4000)]:
        expected = LlavaOnevisionProcessor._get_number_of_features(family, *size, 384, 384)
        assert onevision_feature_count(settings, pinpoints, list(size), [384, 384]) == expected, size
    # The largest images are shrunk: fewer features than the unshrunk 6 x 6 grid of crops would give.
    assert onevision_feature_count(settings, pinpoints, [4000, 4000], [384, 384]) < 729 + 162 * 163


@pytest.mark.parametrize("perceiver", QWEN_VL)
def test_qwen_perceivers_get_3d_mrope_positions(dpa, perceiver):
    processor, model = dpa(perceiver)
    inputs = processor(images=example_image(64, 64), text=prompt(processor))  # a 2 x 2 grid of merged patches
    seen = {}
    model.model.perceiver.language_model.register_forward_pre_hook(
        lambda module, args, kwargs: seen.update(kwargs), with_kwargs=True
    )
    forward(model, inputs)
    image = inputs["perceiver_mm_token_type_ids"].bool()
    height, width = seen["position_ids"][-2][image], seen["position_ids"][-1][image]
    assert image.sum() == 4
    # 1-D positions would be equal on every axis; the image's rows and columns differ on the last two.
    assert not torch.equal(height, width)


@pytest.mark.parametrize("perceiver", QWEN_VL)
def test_image_plus_markers_gives_n_plus_2_features(dpa, perceiver):
    image = example_image(90, 50)
    plain, _ = dpa(perceiver)
    n = target_slots(plain, plain(images=image, text="<image>"))[0]
    processor, model = dpa(perceiver, feature_span="image+markers")
    inputs = processor(images=image, text=prompt(processor))
    assert target_slots(processor, inputs) == model_features(model, inputs) == [n + 2]
    assert forward(model, inputs).image_hidden_states.shape[0] == n + 2


def _conversations(images) -> list:
    return [
        [{"role": "user", "content": [{"type": "image", "image": images[0]}, {"type": "text", "text": QUESTION}]}],
        [
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "Compare"},
                    {"type": "image", "image": images[1]},
                    {"type": "image", "image": images[2]},
                    {"type": "text", "text": "these."},
                ],
            }
        ],
    ]


@pytest.mark.parametrize("perceiver", PERCEIVERS)
def test_early_fusion_feeds_each_images_user_turn_to_the_perceiver(dpa, perceiver):
    images = [example_image(40, 30), example_image(90, 50), example_image(30, 80)]
    plain, _ = dpa(perceiver)
    processor, model = dpa(perceiver, early_fusion=True)
    kwargs = dict(add_generation_prompt=True, tokenize=True, return_dict=True)
    inputs = processor.apply_chat_template(_conversations(images), **kwargs)
    decoded = processor.perceiver_tokenizer.batch_decode(inputs["perceiver_input_ids"])
    assert QUESTION in decoded[0] and all("Compare\nthese." in d for d in decoded[1:])
    # The text comes before the image; each image keeps its feature count, so the target sequence is the same.
    without = plain.apply_chat_template(_conversations(images), **kwargs)
    assert QUESTION not in plain.perceiver_tokenizer.decode(without["perceiver_input_ids"][0])
    assert torch.equal(inputs["input_ids"], without["input_ids"])
    assert model_features(model, inputs) == model_features(model, without)
    forward(model, inputs)


def test_chat_template_is_the_targets_and_renders_its_image_marker(dpa):
    processor, _ = dpa("qwen2_5_vl")
    images = [example_image(40, 30), example_image(90, 50), example_image(30, 80)]
    text = prompt(processor, images=2)
    assert text.count("<image>") == 2 and "<|image_pad|>" not in text
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTION}]}]
    rendered = processor.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert processor.apply_chat_template(messages, add_generation_prompt=True) == rendered
    tokenized = processor.apply_chat_template(
        _conversations(images), add_generation_prompt=True, tokenize=True, return_dict=True
    )
    texts = processor.apply_chat_template(_conversations(images), add_generation_prompt=True)
    direct = processor(images=[images[:1], images[1:]], text=texts)
    assert tokenized.keys() == direct.keys() and all(torch.equal(tokenized[k], direct[k]) for k in direct)


def test_marker_and_image_counts_must_match(dpa):
    processor, _ = dpa("qwen2_5_vl")
    image = example_image()
    with pytest.raises(ValueError, match=r"Sample 1: its text holds 2 '<image>' marker\(s\) but 1 image\(s\)"):
        processor(images=[[image], [image]], text=["<image>", "<image><image>"])
    with pytest.raises(ValueError, match=r"Sample 0: its text holds 0 '<image>' marker\(s\) but 1 image\(s\)"):
        processor(images=image, text="No marker.")
    with pytest.raises(ValueError, match=r"Sample 0: its text holds 1 '<image>' marker\(s\) but 0 image\(s\)"):
        processor(text="<image>")
    with pytest.raises(ValueError, match=r"3 '<image>' markers \(\[1, 2\] per sample\) but 2 images"):
        processor(images=[image, image], text=["<image>", "<image><image>"])


def test_empty_video_and_audio_lists_are_absent_but_real_ones_are_refused(dpa):
    processor, _ = dpa("llava")
    plain = processor(images=example_image(), text="<image>")
    harness = processor(images=example_image(), text="<image>", videos=[], audio=None)  # as lmms-eval calls it
    assert torch.equal(plain["input_ids"], harness["input_ids"])
    with pytest.raises(ValueError, match="images and text only; got `videos`"):
        processor(images=example_image(), text="<image>", videos=[example_image()])


def test_truncated_image_slots_are_an_error(dpa):
    processor, _ = dpa("llava")
    with pytest.raises(ValueError, match=r"Sample 0: the target sequence holds 2 image slots but its images have 4"):
        processor(images=example_image(), text="<image>", truncation=True, max_length=2)


def test_early_fusion_text_is_given_exactly_when_fusion_is_on(dpa):
    image = example_image()
    fused, _ = dpa("qwen2_5_vl", early_fusion=True)
    with pytest.raises(ValueError, match="pass `perceiver_text`"):
        fused(images=image, text="<image>")
    with pytest.raises(ValueError, match="2 perceiver_text entries for 1 images"):
        fused(images=image, text="<image>", perceiver_text=["a", "b"])
    plain, _ = dpa("qwen2_5_vl")
    with pytest.raises(ValueError, match="early_fusion=True only"):
        plain(images=image, text="<image>", perceiver_text="a")


def test_settings_are_checked_when_the_processor_is_built(tiny_checkpoint):
    folder = tiny_checkpoint("llava")
    parts = (AutoImageProcessor.from_pretrained(folder), AutoTokenizer.from_pretrained(folder), target_tokenizer())
    with pytest.raises(ValueError, match="perceiver model_type 'blip2'; known: qwen2_vl, "):
        DPAProcessor(*parts, perceiver_model_type="blip2")
    with pytest.raises(ValueError, match=r"needs perceiver_processor_kwargs \['patch_size', 'vision_feature_select"):
        DPAProcessor(*parts, perceiver_model_type="llava")
    settings = {"patch_size": 14, "vision_feature_select_strategy": "default"}
    with pytest.raises(ValueError, match="image\\+markers' needs perceiver_marker_tokens"):
        DPAProcessor(
            *parts, perceiver_model_type="llava", perceiver_processor_kwargs=settings, feature_span="image+markers"
        )
    with pytest.raises(ValueError, match="The perceiver image token '<img>' is not a single token"):
        DPAProcessor(
            *parts, perceiver_model_type="llava", perceiver_processor_kwargs=settings, perceiver_image_token="<img>"
        )


_ROUND_TRIP = """
import json, sys, torch
from PIL import Image
from transformers import AutoModelForImageTextToText, AutoProcessor, AutoTokenizer
root, perceivers = sys.argv[1], sys.argv[2].split(",")
images = [Image.open(f"{root}/{i}.png") for i in range(3)]
for name in perceivers:
    folder = f"{root}/{name}"
    expected, case = torch.load(f"{folder}/expected.pt"), json.load(open(f"{folder}/case.json"))
    processor = AutoProcessor.from_pretrained(folder, trust_remote_code=True)
    assert type(processor).__module__.startswith("transformers_modules"), type(processor)
    assert processor.apply_chat_template(case["messages"], add_generation_prompt=True) == case["texts"][1]
    got = processor(images=[[], images[:1], images[1:]], text=case["texts"])
    assert got.keys() == expected.keys(), (name, got.keys(), expected.keys())
    for key in expected:
        assert torch.equal(got[key], expected[key]), (name, key)
    tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=True)
    assert tokenizer.chat_template == processor.chat_template and len(tokenizer) == case["target_vocab"], name
    assert len(processor.perceiver_tokenizer) == case["perceiver_vocab"], name
    if case["with_model"]:
        model = AutoModelForImageTextToText.from_pretrained(folder, trust_remote_code=True).eval()
        with torch.no_grad():
            model(**got)
assert not any(module.startswith("dpa_cli") for module in sys.modules), "dpa_cli was imported"
print("round trip ok")
"""


def test_save_and_load_in_plain_transformers(dpa, tmp_path):
    images = [example_image(40, 30), example_image(90, 50), example_image(30, 80)]
    for index, image in enumerate(images):
        image.save(tmp_path / f"{index}.png")  # PNG is lossless: the reloaded pixels are the same
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTION}]}]
    for perceiver in PERCEIVERS:
        processor, model = dpa(perceiver)
        folder = tmp_path / perceiver
        with_model = perceiver == "qwen2_5_vl"  # an upgraded checkpoint: model and processor in one folder
        if with_model:
            model.save_pretrained(folder)
        processor.save_pretrained(folder)
        assert (folder / "processing_dpa.py").exists() and (folder / "perceiver_tokenizer" / "tokenizer.json").exists()
        assert isinstance(AutoProcessor.from_pretrained(folder), DPAProcessor)  # registered in this process
        texts = ["No image here.", prompt(processor), prompt(processor, images=2)]
        torch.save(dict(processor(images=[[], images[:1], images[1:]], text=texts)), folder / "expected.pt")
        case = dict(
            messages=messages,
            texts=texts,
            with_model=with_model,
            target_vocab=len(processor.tokenizer),
            perceiver_vocab=len(processor.perceiver_tokenizer),
        )
        (folder / "case.json").write_text(json.dumps(case))
    config = json.loads((tmp_path / "qwen2_5_vl" / "processor_config.json").read_text())
    assert config["auto_map"] == {"AutoProcessor": "processing_dpa.DPAProcessor"}
    assert config["perceiver_model_type"] == "qwen2_5_vl" and config["feature_span"] == "image"
    command = [sys.executable, "-c", _ROUND_TRIP, str(tmp_path), ",".join(PERCEIVERS)]
    result = subprocess.run(command, capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "round trip ok" in result.stdout
