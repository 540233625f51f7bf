"""Encoding for training: labels masked by the target's own chat template, image slots equal to perceiver
features, early fusion, truncation that never splits an image, collation, skip / fail, length grouping.

Real parts only: workspaces made by `dpa upgrade` from tiny checkpoints, their saved processors and models.
"""

from __future__ import annotations

import functools

import pytest
import torch
from PIL import Image
from transformers import AutoModelForImageTextToText

from dpa_cli.data import (
    IGNORE_INDEX,
    BadSampleError,
    DPACollator,
    EncodedDataset,
    ImageRef,
    Sample,
    SampleEncoder,
    length_grouped_indices,
    load_processor,
    open_samples,
    render_supervised,
    supervised_segments,
)
from dpa_cli.data.samples import from_llava

IMAGE = {"type": "image"}


def text(value: str) -> dict:
    return {"type": "text", "text": value}


def sample(*turns: tuple[str, list], images: tuple = (), sample_id: str = "s") -> Sample:
    refs = [ImageRef(image=image) for image in images]
    return Sample(sample_id, refs, [{"role": role, "content": content} for role, content in turns])


def picture(width: int, height: int, colour=(200, 40, 40)) -> Image.Image:
    return Image.new("RGB", (width, height), colour)


MULTI_TURN = sample(
    ("user", [IMAGE, IMAGE, text("Compare them.")]),
    ("assistant", [text("Red and green.")]),
    ("user", [text("And this one?"), IMAGE]),
    ("assistant", [text("It is blue.")]),
    ("user", [text("Which is widest?")]),
    ("assistant", [text("The green one.")]),
    images=(picture(60, 40), picture(90, 50, (40, 200, 40)), picture(30, 80, (40, 40, 200))),
    sample_id="multi",
)
TEXT_ONLY = sample(("user", [text("What is 3 + 2?")]), ("assistant", [text("3 + 2 = 5.")]), sample_id="text")
ANSWERS = ["Red and green.", "It is blue.", "The green one."]


@pytest.fixture(scope="module")
def processor(dpa_workspace):
    return functools.cache(lambda name: load_processor(dpa_workspace(name)))


@pytest.fixture(scope="module")
def model(dpa_workspace):
    def load(name: str):
        torch.manual_seed(0)
        loaded = AutoModelForImageTextToText.from_pretrained(dpa_workspace(name) / "model", trust_remote_code=True)
        return loaded.eval()

    return functools.cache(load)


def supervised_runs(processor, features) -> list[str]:
    """Each contiguous run of supervised tokens, decoded from the labels themselves."""
    labels, runs, current = features["labels"].tolist(), [], []
    for label in [*labels, IGNORE_INDEX]:
        if label != IGNORE_INDEX:
            current.append(label)
        elif current:
            runs.append(processor.tokenizer.decode(current))
            current = []
    return runs


def prompt_text(processor, features) -> str:
    return "".join(t for t, kind in supervised_segments(processor, features) if kind == "prompt")


# --- masking ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("workspace, end_of_turn", [("next_qwen", "<|im_end|>"), ("llama3_qwen", "<|eot_id|>")])
def test_exactly_the_answers_and_their_end_of_turn_token_are_supervised(processor, workspace, end_of_turn):
    proc = processor(workspace)
    features = SampleEncoder(proc, stage=2, max_length=4096)(MULTI_TURN)
    assert supervised_runs(proc, features) == [answer + end_of_turn for answer in ANSWERS]
    labels, ids = features["labels"], features["input_ids"]
    assert ((labels == IGNORE_INDEX) | (labels == ids)).all()  # a label is its own token or masked
    assert (labels[ids == proc.image_token_id] == IGNORE_INDEX).all()
    assert "Compare them." in prompt_text(proc, features) and "Which is widest?" in prompt_text(proc, features)


def test_qwen3_empty_think_block_stays_masked(processor):
    proc = processor("next_qwen")
    features = SampleEncoder(proc, stage=2, max_length=4096)(MULTI_TURN)
    rendered = proc.apply_chat_template(MULTI_TURN.messages)
    assert "<think>\n\n</think>\n\nThe green one." in rendered  # the template inserts it before the last answer
    assert "<think>\n\n</think>\n\n" in prompt_text(proc, features)
    assert not any("think" in run for run in supervised_runs(proc, features))


@pytest.mark.parametrize("workspace", ["next_qwen", "llama3_qwen"])
def test_stage_1_supervises_the_caption_only(processor, workspace):
    proc = processor(workspace)
    caption = sample(("user", [IMAGE]), ("assistant", [text("A red square on a mat.")]), images=(picture(60, 40),))
    assert supervised_runs(proc, SampleEncoder(proc, stage=1, max_length=512)(caption)) == ["A red square on a mat."]
    assert supervised_runs(proc, SampleEncoder(proc, stage=1, max_length=512)(MULTI_TURN)) == ANSWERS


def test_a_system_turn_and_answers_with_surrounding_spaces(processor):
    proc = processor("llama3_qwen")  # its template trims each message
    spaced = sample(("system", [text("Be brief.")]), ("user", [text("Hi")]), ("assistant", [text("  Hello!  ")]))
    assert supervised_runs(proc, SampleEncoder(proc, 2, 512)(spaced)) == ["Hello!<|eot_id|>"]


def test_an_answer_quoted_in_the_question_is_masked_in_the_question(processor):
    proc = processor("next_qwen")
    quoted = sample(("user", [text("Answer A or B.")]), ("assistant", [text("A")]))
    features = SampleEncoder(proc, 2, 512)(quoted)
    assert supervised_runs(proc, features) == ["A<|im_end|>"]
    assert "Answer A or B." in prompt_text(proc, features)


@pytest.mark.parametrize("answer", ["k", "think", "n", "A"])
def test_a_one_letter_answer_is_not_found_inside_the_inserted_think_block(processor, answer):
    proc = processor("next_qwen")
    short = sample(("user", [text("Pick one letter.")]), ("assistant", [text(answer)]))
    features = SampleEncoder(proc, 2, 512)(short)
    assert supervised_runs(proc, features) == [f"{answer}<|im_end|>"]
    segments = supervised_segments(proc, features)
    learned = [i for i, (_, kind) in enumerate(segments) if kind == "supervised"]
    assert len(learned) == 1 and segments[learned[0] - 1][0].endswith("<think>\n\n</think>\n\n")


def test_an_answer_in_several_text_blocks_is_supervised_whole(processor):
    proc = processor("next_qwen")
    blocks = sample(("user", [text("Two parts?")]), ("assistant", [text("First."), text("Second.")]))
    assert supervised_runs(proc, SampleEncoder(proc, 2, 512)(blocks)) == ["First.Second.<|im_end|>"]


def test_samples_with_nothing_to_learn_are_bad_samples(processor):
    encoder = SampleEncoder(processor("next_qwen"), 2, 512)
    for bad, kind in [
        (sample(("user", [text("Hi")])), "no_assistant"),
        (sample(("user", [text("Hi")]), ("assistant", [text(" ")])), "no_assistant"),
        (sample(), "empty_conversation"),
        (sample(("user", [IMAGE, text("Hi")]), ("assistant", [text("Yo")])), "marker_mismatch"),
        (
            sample(("user", [text("Hi")]), ("assistant", [IMAGE, text("Yo")]), images=(picture(9, 9),)),
            "image_in_assistant",
        ),
    ]:
        with pytest.raises(BadSampleError) as caught:
            encoder(bad)
        assert caught.value.kind == kind and caught.value.sample_id == "s"


# --- image slots and perceiver inputs ---------------------------------------------------------------------
@pytest.mark.parametrize("workspace", ["next_qwen", "next_composed"])
def test_every_image_gets_as_many_slots_as_perceiver_features(processor, model, workspace):
    proc, dpa = processor(workspace), model(workspace)
    features = SampleEncoder(proc, 2, 4096)(MULTI_TURN)
    assert features["perceiver_input_ids"].shape[0] == 3
    per_image = dpa.model.feature_mask(features["perceiver_input_ids"]).sum(-1)
    assert int((features["input_ids"] == proc.image_token_id).sum()) == int(per_image.sum())
    slots = torch.nonzero(features["input_ids"] == proc.image_token_id).flatten()
    breaks = (torch.nonzero(torch.diff(slots) > 1).flatten() + 1).tolist()
    runs = [len(run) for run in torch.tensor_split(slots, breaks)]  # the template writes "<image>\n" per image
    assert runs == per_image.tolist()


def test_text_only_samples_have_no_perceiver_inputs(processor):
    proc = processor("next_qwen")
    features = SampleEncoder(proc, 2, 512)(TEXT_ONLY)
    assert set(features) == {"input_ids", "attention_mask", "labels", "sample_id"}
    assert supervised_runs(proc, features) == ["3 + 2 = 5.<|im_end|>"]


def test_early_fusion_feeds_each_image_the_text_of_its_user_turn(processor):
    default, early = processor("next_qwen"), processor("next_qwen_early")
    plain = SampleEncoder(default, 2, 4096)(MULTI_TURN)
    fused = SampleEncoder(early, 2, 4096)(MULTI_TURN)
    plain_texts = default.perceiver_tokenizer.batch_decode(plain["perceiver_input_ids"])
    fused_texts = early.perceiver_tokenizer.batch_decode(fused["perceiver_input_ids"])
    assert not any("Compare" in t or "this one" in t for t in plain_texts)
    # The turn's text comes before the image: a causal perceiver's image states never see what follows it.
    assert [t.replace("<|endoftext|>", "").split("<|vision_start|>")[0] for t in fused_texts] == [
        "Compare them.\n",
        "Compare them.\n",
        "And this one?\n",
    ]
    # The perceiver sees more text, the target the same number of slots and the same labels.
    assert torch.equal(plain["input_ids"], fused["input_ids"]) and torch.equal(plain["labels"], fused["labels"])


# --- truncation -------------------------------------------------------------------------------------------
def test_truncation_never_splits_image_slots(processor):
    proc = processor("next_composed")  # 14 slots per image
    encoder = SampleEncoder(proc, 2, 4096)
    full = encoder(MULTI_TURN)
    slots = torch.nonzero(full["input_ids"] == proc.image_token_id).flatten().tolist()
    last_slot = slots[-1]
    for cut in (slots[0] + 1, slots[20], last_slot):  # inside image 1, inside image 2, on image 3's last slot
        with pytest.raises(BadSampleError) as caught:
            SampleEncoder(proc, 2, cut)(MULTI_TURN)
        assert caught.value.kind == "too_long" and "split an image" in caught.value.message
    cut = last_slot + 12
    short = SampleEncoder(proc, 2, cut)(MULTI_TURN)
    assert len(short["input_ids"]) == cut and torch.equal(short["input_ids"], full["input_ids"][:cut])
    assert torch.equal(short["labels"], full["labels"][:cut]) and (short["labels"] != IGNORE_INDEX).any()
    with pytest.raises(BadSampleError, match="over max_length") as caught:
        SampleEncoder(proc, 2, cut, strict=True)(MULTI_TURN)
    assert caught.value.kind == "too_long"


def test_a_cut_that_leaves_nothing_supervised_drops_the_sample(processor):
    proc = processor("next_qwen")
    features = SampleEncoder(proc, 2, 4096)(TEXT_ONLY)
    first_label = int(torch.nonzero(features["labels"] != IGNORE_INDEX)[0])
    with pytest.raises(BadSampleError, match="nothing supervised"):
        SampleEncoder(proc, 2, first_label)(TEXT_ONLY)


# --- collation and the model -------------------------------------------------------------------------------
def batch_samples() -> list[Sample]:
    one = sample(
        ("user", [IMAGE, text("What is it?")]),
        ("assistant", [text("A red square.")]),
        images=(picture(120, 40),),
        sample_id="one",
    )
    return [TEXT_ONLY, MULTI_TURN, one]


@pytest.mark.parametrize("workspace", ["next_qwen", "next_composed", "llama3_qwen"])
def test_collated_batches_run_through_the_model_without_a_feature_mismatch(processor, model, workspace):
    proc, dpa = processor(workspace), model(workspace)
    encoder, collate = SampleEncoder(proc, 2, 4096), DPACollator(proc)
    features = [encoder(s) for s in batch_samples()]
    batch = collate(features)
    lengths = [len(f["input_ids"]) for f in features]
    assert batch["input_ids"].shape == (3, max(lengths))
    for row, length in enumerate(lengths):  # right padding: pad token, mask 0, label -100
        assert batch["attention_mask"][row].tolist() == [1] * length + [0] * (max(lengths) - length)
        assert (batch["labels"][row, length:] == IGNORE_INDEX).all()
        assert (batch["input_ids"][row, length:] == proc.tokenizer.pad_token_id).all()
    assert batch["perceiver_input_ids"].shape[0] == 4  # the images of all samples, in order
    slots = int((batch["input_ids"] == proc.image_token_id).sum())
    assert slots == int(dpa.model.feature_mask(batch["perceiver_input_ids"]).sum())
    with torch.no_grad():
        out = dpa(**batch)
    assert torch.isfinite(out.loss) and out.image_hidden_states.shape[0] == slots
    with torch.no_grad():
        text_only = dpa(**collate([features[0], features[0]]))
    assert torch.isfinite(text_only.loss)


@pytest.mark.parametrize("workspace", ["next_qwen", "next_composed"])
def test_collating_per_sample_features_equals_processing_the_batch_at_once(processor, workspace):
    proc = processor(workspace)
    samples = batch_samples()
    batch = DPACollator(proc)([SampleEncoder(proc, 2, 4096)(s) for s in samples])
    texts = [proc.apply_chat_template(s.messages) for s in samples]
    images = [[ref.image for ref in s.images] for s in samples]
    direct = proc(images=images, text=texts, add_special_tokens=False, return_tensors="pt")
    perceiver_keys = [k for k in direct if k not in ("input_ids", "attention_mask")]
    assert set(perceiver_keys) == {k for k in batch if k not in ("input_ids", "attention_mask", "labels")}
    for key in perceiver_keys:
        assert torch.equal(batch[key], direct[key]), key
    for row in range(len(samples)):  # the processor pads each text as its tokenizer does; compare the tokens
        keep = direct["attention_mask"][row].bool()
        assert batch["input_ids"][row, : int(keep.sum())].tolist() == direct["input_ids"][row][keep].tolist()


def test_collator_pads_to_a_multiple_and_can_carry_sample_ids(processor):
    proc = processor("next_qwen")
    features = [SampleEncoder(proc, 2, 512)(TEXT_ONLY)]
    batch = DPACollator(proc, pad_to_multiple_of=64, sample_ids=True)(features)
    assert batch["input_ids"].shape[1] % 64 == 0 and batch["sample_ids"] == ["text"]
    assert "sample_ids" not in DPACollator(proc)(features)


# --- datasets: skip / fail ----------------------------------------------------------------------------------
def bad_source(data_files) -> list[Sample]:
    records = [
        {
            "id": "good-1",
            "image": "red.png",
            "conversations": [{"from": "human", "value": "<image>\nWhat?"}, {"from": "gpt", "value": "Red."}],
        },
        {
            "id": "gone",
            "image": "nowhere.png",
            "conversations": [{"from": "human", "value": "<image>\nWhat?"}, {"from": "gpt", "value": "?"}],
        },
        {
            "id": "cut",
            "image": "truncated.jpg",
            "conversations": [{"from": "human", "value": "<image>\nWhat?"}, {"from": "gpt", "value": "?"}],
        },
        {"id": "good-2", "conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello."}]},
    ]
    return [from_llava(r, i, data_files / "images") for i, r in enumerate(records)]


def test_skip_replaces_bad_samples_by_the_next_good_one_and_counts_them(processor, data_files):
    dataset = EncodedDataset(bad_source(data_files), SampleEncoder(processor("next_qwen"), 2, 512), "skip")
    ids = [dataset[i]["sample_id"] for i in range(len(dataset))]
    assert ids == ["good-1", "good-2", "good-2", "good-2"]
    assert [dataset[i]["sample_id"] for i in range(len(dataset))] == ids  # deterministic, counted once
    assert dataset.skipped == {"missing_image": 1, "truncated_image": 1}
    assert dataset.skipped_ids == ["gone", "cut"]


def test_fail_refuses_before_training_naming_every_cheap_problem(processor, data_files):
    encoder = SampleEncoder(processor("next_qwen"), 2, 512)
    with pytest.raises(BadSampleError) as caught:
        EncodedDataset(bad_source(data_files), encoder, "fail")
    assert caught.value.sample_id == "gone" and caught.value.kind == "missing_image"
    assert "1 missing_image (gone)" in caught.value.message and "--on-bad-sample skip" in caught.value.hint
    lazy = EncodedDataset(bad_source(data_files), encoder, "fail", precheck=False)
    assert lazy[0]["sample_id"] == "good-1"
    with pytest.raises(BadSampleError, match="truncated"):
        lazy[2]  # truncation shows only when decoding


def test_samples_too_long_to_cut_are_dropped_and_counted_unless_strict(processor):
    proc = processor("next_composed")
    slots = SampleEncoder(proc, 2, 4096)(MULTI_TURN)["input_ids"].eq(proc.image_token_id).nonzero()
    cut = int(slots[-1])  # inside the last image's slots
    dataset = EncodedDataset([MULTI_TURN, TEXT_ONLY], SampleEncoder(proc, 2, cut), "fail")
    assert dataset[0]["sample_id"] == "text" and dataset.skipped == {"too_long": 1}
    assert dataset.skipped_ids == ["multi"]
    strict = EncodedDataset([MULTI_TURN, TEXT_ONLY], SampleEncoder(proc, 2, cut, strict=True), "fail")
    with pytest.raises(BadSampleError, match="over max_length"):
        strict[0]


def test_datasets_from_files_encode_end_to_end(processor, data_files):
    proc = processor("next_composed")
    for data, root in ((data_files / "clean.jsonl", data_files / "images"), (data_files / "chat", None)):
        dataset = EncodedDataset(open_samples(data, root), SampleEncoder(proc, 2, 4096))
        batch = DPACollator(proc)([dataset[i] for i in range(len(dataset))])
        assert (batch["labels"] != IGNORE_INDEX).any() and "pixel_values" in batch


def test_render_supervised_highlights_what_is_learned(processor):
    from rich.console import Console

    proc = processor("next_qwen")
    features = SampleEncoder(proc, 2, 4096)(MULTI_TURN)
    console = Console(record=True, width=100, color_system="truecolor")
    console.print(render_supervised(proc, features))
    plain = console.export_text()
    assert "sample multi:" in plain and "The green one." in plain and "<image x" in plain and "learned" in plain
    kinds = {kind for _, kind in supervised_segments(proc, features)}
    assert kinds == {"prompt", "supervised", "image"}


# --- length grouping --------------------------------------------------------------------------------------
def test_length_grouped_indices_are_a_seeded_permutation_of_similar_lengths():
    lengths = [(i * 37) % 101 for i in range(1000)]
    order = length_grouped_indices(lengths, batch_size=8, seed=3)
    assert sorted(order) == list(range(1000)) and order == length_grouped_indices(lengths, 8, 3)
    assert order != length_grouped_indices(lengths, 8, 4)
    assert lengths[order[0]] == max(lengths)
    spread = [
        max(lengths[i] for i in order[b : b + 8]) - min(lengths[i] for i in order[b : b + 8]) for b in range(0, 1000, 8)
    ]
    assert sum(spread) / len(spread) < 10  # random batches would spread about 80
    assert length_grouped_indices([], 4, 0) == []
