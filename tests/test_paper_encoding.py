"""The `paper` encoding preset (issue 15): the official DPA code's text, token for token, on a tiny Qwen2.5-VL
perceiver + Qwen3 target with the Qwen special tokens; N+2 features in the target's start, pad and end slots;
the generation prompt ending with the think opener; early fusion that changes the image features; the
training pixel cap; `data check --preview`; and the refusals of `dpa upgrade --encoding`.

The expected sequences are written from the transcription of the official code (briefs/official-dpa.md sec.
2.11, 3.1-3.3): each piece of the official template tokenized on its own, as ms-swift does, and concatenated.
"""

from __future__ import annotations

import copy
import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from dpa_cli import loading
from dpa_cli.cli.app import app
from dpa_cli.data import FeatureCounter, ImageRef, SampleEncoder, load_processor
from dpa_cli.data.images import cap_pixels, capped_size
from dpa_cli.data.samples import Sample, from_chat, from_llava
from dpa_cli.evaluation.batch import batch_inputs
from dpa_cli.generate import Runnable, answer_text, build_inputs, user_turn
from tests.test_bad_inputs import tree_hash

runner = CliRunner()
VISION_START, VISION_END, PAD = "<|vision_start|>", "<|vision_end|>", "<|image_pad|>"
THINK = "<think>\n\n</think>\n\n"
IGNORE = -100


def upgrade(*args: str):
    return runner.invoke(app, ["upgrade", *args, "--json"])


@pytest.fixture(scope="module")
def pair(tiny_checkpoint) -> tuple[str, str]:
    """The paper's pair in miniature: a Qwen3 LLM target, a Qwen2.5-VL perceiver (real Qwen special tokens)."""
    return str(tiny_checkpoint("causal_lm_qwen3")), str(tiny_checkpoint("qwen2_5_vl"))


@pytest.fixture(scope="module")
def paper(pair, tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("paper") / "ws"
    result = upgrade(pair[0], "--perceiver", pair[1], "-o", str(folder), "--encoding", "paper")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["plan"]["config"]["feature_span"] == "image+markers"
    return folder


@pytest.fixture(scope="module")
def processor(paper):
    return load_processor(paper)


@pytest.fixture(scope="module")
def model(paper):
    return loading.load_model(paper / "model", dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def image_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("images") / "square.png"
    Image.new("RGB", (56, 56), (30, 140, 220)).save(path)  # smart_resize keeps it: grid (1, 4, 4), N = 4
    return path


def picture(width: int, height: int, seed: int = 0) -> Image.Image:
    generator = torch.Generator().manual_seed(seed)
    pixels = torch.randint(0, 256, (height, width, 3), generator=generator, dtype=torch.uint8)
    return Image.fromarray(pixels.numpy())


# --- the training text, token for token ---------------------------------------------------------------------
def official(processor, before: str, q1: str, a1: str, q2: str, a2: str, n: int) -> tuple[list, list, list]:
    """(target ids, labels, perceiver ids) of the 2-turn sample as the official template builds them: `<image>`
    replaced where the data put it (QWT:307), the think block in every assistant turn and masked (TU:45-56,
    QWT:689-692), every assistant answer and its <|im_end|> learned (TB:971-984), no system turn, no newline
    after the last <|im_end|>; the perceiver sequence cut after the image (causal, sec. 2.2)."""
    vision = VISION_START + PAD * n + VISION_END
    user = "\n".join(part for part in (before, vision, q1) if part)
    pieces = [
        (f"<|im_start|>user\n{user}<|im_end|>\n<|im_start|>assistant\n", False),
        (THINK, False),
        (a1, True),
        ("<|im_end|>", True),
        (f"\n<|im_start|>user\n{q2}<|im_end|>\n<|im_start|>assistant\n", False),
        (THINK, False),
        (a2, True),
        ("<|im_end|>", True),
    ]
    ids, labels = [], []
    for text, learned in pieces:
        piece = processor.tokenizer(text, add_special_tokens=False)["input_ids"]
        ids += piece
        labels += piece if learned else [IGNORE] * len(piece)
    frame = "<|im_start|>user\n" + (f"{before}\n" if before else "")
    perceiver = processor.perceiver_tokenizer(frame + vision, add_special_tokens=False)["input_ids"]
    return ids, labels, perceiver


TURNS = [  # (text before the image, question, answer 1, follow-up, answer 2)
    ("", "What is it?", "A square.", "And its colour?", "Blue."),
    ("", "Describe the picture in detail, please.", "A blue square on its own.", "Is it a cat?", "No."),
    ("Look at this picture.", "What is shown?", "A blue square.", "How many apples?", "There are 3 apples."),
    ("What is shown in the image?", "", "A square.", "Why?", "The chart shows it."),
]


def _record(spelling: str, turns: tuple, image: Path) -> Sample:
    """The same sample written the ways users write it: LLaVA JSON (both role spellings) and chat rows
    (content as a list of blocks, or as a string with the <image> marker)."""
    before, q1, a1, q2, a2 = turns
    first = "\n".join(part for part in (before, "<image>", q1) if part)
    if spelling.startswith("llava"):
        human, gpt = ("human", "gpt") if spelling == "llava" else ("user", "assistant")
        turns_ = [(human, first), (gpt, a1), (human, q2), (gpt, a2)]
        conversations = [{"from": role, "value": value} for role, value in turns_]
        return from_llava({"id": "s", "image": image.name, "conversations": conversations}, 0, image.parent)
    if spelling == "chat-blocks":
        blocks = [{"type": "text", "text": before}] if before else []
        blocks += [{"type": "image"}] + ([{"type": "text", "text": q1}] if q1 else [])
    else:
        blocks = first
    messages = [
        {"role": "user", "content": blocks},
        {"role": "assistant", "content": a1},
        {"role": "user", "content": q2},
        {"role": "assistant", "content": [{"type": "text", "text": a2}]},
    ]
    return from_chat({"id": "s", "images": [image.name], "messages": messages}, 0, image.parent)


@pytest.mark.parametrize("spelling", ["llava", "llava-roles", "chat-blocks", "chat-string"])
@pytest.mark.parametrize("turns", TURNS, ids=range(len(TURNS)))
def test_a_two_turn_sample_is_the_official_encoding_token_for_token(processor, image_file, spelling, turns):
    features = SampleEncoder(processor, 2, 4096)(_record(spelling, turns, image_file))
    ids, labels, perceiver = official(processor, *turns, n=4)
    assert features["input_ids"].tolist() == ids
    assert features["labels"].tolist() == labels
    assert features["image_grid_thw"].tolist() == [[1, 4, 4]]
    row, mask = features["perceiver_input_ids"][0], features["perceiver_attention_mask"][0].bool()
    assert row[mask].tolist() == perceiver
    assert processor.feature_counts(features) == [6]  # N + 2: <|vision_start|>, 4 pads, <|vision_end|>


ANSWER = {"role": "assistant", "content": [{"type": "text", "text": "Ok."}]}
LAYOUTS = [  # user turns as (kind, text) blocks; "I" an image. Each image's perceiver frame: its turn up to it.
    [[("T", "Compare"), ("I", ""), ("I", ""), ("T", "these.")]],
    [[("I", ""), ("T", "What is it?")], [("T", "And this one?"), ("I", "")]],
    [[("I", ""), ("I", "")]],
    [[("T", "First"), ("I", ""), ("T", "then"), ("I", "")], [("I", ""), ("T", "last")]],
    [[("T", "Look closely,\nplease."), ("I", "")]],
]


@pytest.mark.parametrize("layout", LAYOUTS, ids=range(len(LAYOUTS)))
def test_each_image_reads_its_turn_up_to_it_in_training_and_inference(processor, layout):
    sizes = iter([(56, 56), (28, 56), (56, 28), (28, 28), (84, 28)])
    images, messages, heads = [], [], []
    for turn in layout:
        content, before = [], []
        for kind, text in turn:
            if kind == "T":
                content.append({"type": "text", "text": text})
                before.append(text)
                continue
            images.append(picture(*next(sizes), seed=len(images)))
            content.append({"type": "image"})
            heads.append("<|im_start|>user\n" + "".join(f"{t}\n" for t in before))
        messages += [{"role": "user", "content": content}, ANSWER]
    trained = SampleEncoder(processor, 2, 4096)(Sample("s", [ImageRef(image=i) for i in images], messages))
    counter = iter(images)  # the same conversation as chat messages carrying the images, up to the last answer
    live = [
        {**m, "content": [{**b, "image": next(counter)} if b["type"] == "image" else b for b in m["content"]]}
        for m in messages[:-1]
    ]
    prompted = processor.apply_chat_template(live, add_generation_prompt=True, tokenize=True, return_dict=True)
    for inputs in (trained, prompted):
        rows = inputs["perceiver_input_ids"], inputs["perceiver_attention_mask"].bool()
        texts = [processor.perceiver_tokenizer.decode(row[mask]) for row, mask in zip(*rows)]
        assert [text.split(VISION_START)[0] for text in texts] == heads
        assert [text.count(VISION_START) for text in texts] == [1] * len(images)
        counts = processor.feature_counts(inputs)
        pads = [int(g.prod()) // 4 for g in inputs["image_grid_thw"]]
        assert counts == [n + 2 for n in pads]
        ids = torch.as_tensor(inputs["input_ids"]).flatten()
        assert int(torch.isin(ids, torch.tensor(processor.image_slot_token_ids)).sum()) == sum(counts)


def test_stage_1_learns_the_caption_and_its_im_end(processor, image_file):
    sample = _record("llava", ("", "Describe it.", "A blue square.", "Why?", "No."), image_file)
    sample.messages = sample.messages[:2]
    features = SampleEncoder(processor, 1, 4096)(sample)
    learned = [i for i in features["labels"].tolist() if i != IGNORE]
    assert processor.tokenizer.decode(learned) == "A blue square.<|im_end|>"


# --- N+2 features in the target's start, pad and end slots -------------------------------------------------
@pytest.mark.parametrize("size", [(56, 56), (28, 56), (56, 28), (28, 28), (84, 28)])
def test_n_plus_2_features_fill_the_start_pad_and_end_slots(processor, model, size):
    messages = [user_turn("What is it?", [picture(*size)])]
    inputs = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True)
    ids = inputs["input_ids"][0]
    start, end = processor.tokenizer.convert_tokens_to_ids([VISION_START, VISION_END])
    n = size[0] * size[1] // 28**2
    slots = torch.isin(ids, torch.tensor(model.config.image_slot_token_ids))
    assert ids[slots].tolist() == [start] + [processor.image_token_id] * n + [end]
    seen = {}
    hook = model.model.language_model.register_forward_pre_hook(lambda m, a, k: seen.update(k), with_kwargs=True)
    with torch.no_grad():
        out = model(**inputs)
        perceiver = {k: v for k, v in inputs.items() if k not in ("input_ids", "attention_mask")}
        states = model.model.get_image_features(**perceiver).last_hidden_state[0]
    hook.remove()
    embeds = seen["inputs_embeds"][0]
    # The official features: phi of the perceiver's final-norm states start..end inclusive (FVT:450-480).
    p_ids = inputs["perceiver_input_ids"][0].tolist()
    first, last = p_ids.index(start), p_ids.index(end)
    phi = model.model.multi_modal_projector(states[first : last + 1])
    assert out.image_hidden_states.shape[0] == n + 2
    assert torch.allclose(out.image_hidden_states, phi, atol=1e-6)
    assert torch.equal(embeds[slots], out.image_hidden_states)  # written in order: start, pads, end
    assert torch.equal(embeds[~slots], model.get_input_embeddings()(ids[~slots]))  # the rest: the text


def test_image_plus_markers_under_a_wrapping_template_takes_n_plus_2_positions(pair, tmp_path):
    """dpa's own encoding with `--feature-span image+markers` and a target template that already wraps the
    image in <|vision_start|>/<|vision_end|>: those markers are slots, not N+2 pads between them (N+4)."""
    result = upgrade(pair[0], "--perceiver", pair[1], "-o", str(tmp_path / "ws"), "--feature-span", "image+markers")
    assert result.exit_code == 0, result.output
    proc = load_processor(tmp_path / "ws")
    for size in ((56, 56), (28, 56), (84, 28)):
        inputs = proc.apply_chat_template([user_turn("Hi", [picture(*size)])], tokenize=True, return_dict=True)
        text = proc.tokenizer.decode(inputs["input_ids"][0])
        n = size[0] * size[1] // 28**2
        assert text.count(VISION_START) == 1 and VISION_START + PAD * n + VISION_END in text
        assert proc.feature_counts(inputs) == [n + 2]


# --- the generation prompt ------------------------------------------------------------------------------
QUESTIONS = ["What is it?", "Describe the picture in detail, please.", "How many apples?"]


@pytest.mark.parametrize("question", QUESTIONS)
def test_the_generation_prompt_is_the_training_text_up_to_the_think_opener(processor, question):
    image = picture(56, 56)
    inputs = build_inputs(processor, [user_turn(question, [image])])
    prompt = processor.tokenizer.decode(inputs["input_ids"][0])
    assert prompt == (
        f"<|im_start|>user\n{VISION_START}{PAD * 4}{VISION_END}\n{question}<|im_end|>\n"
        "<|im_start|>assistant\n<think>\n\n"
    )
    # No default system turn in the perceiver text: training's frame, not the official chat()'s.
    perceiver = processor.perceiver_tokenizer.decode(inputs["perceiver_input_ids"][0])
    assert perceiver == f"<|im_start|>user\n{VISION_START}{PAD * 4}{VISION_END}"
    # The same tokens training sees, up to the point where the model must write </think>.
    sample = Sample(
        "s",
        [ImageRef(image=image)],
        [
            {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]},
            {"role": "assistant", "content": [{"type": "text", "text": "A square."}]},
        ],
    )
    trained = SampleEncoder(processor, 2, 4096)(sample)
    length = inputs["input_ids"].shape[1]
    assert torch.equal(trained["input_ids"][:length], inputs["input_ids"][0])
    assert torch.equal(trained["perceiver_input_ids"], inputs["perceiver_input_ids"])


def test_a_chat_history_keeps_its_think_blocks_and_the_prompt_ends_with_the_opener(processor):
    answer = {"role": "assistant", "content": [{"type": "text", "text": "A square."}]}
    messages = [user_turn("What is it?", [picture(56, 56)]), answer, user_turn("Sure?", [])]
    prompt = processor.tokenizer.decode(build_inputs(processor, messages)["input_ids"][0])
    assert prompt.endswith(
        f"<|im_start|>assistant\n{THINK}A square.<|im_end|>\n<|im_start|>user\nSure?<|im_end|>\n"
        "<|im_start|>assistant\n<think>\n\n"
    )


def test_option_scoring_closes_the_think_block_and_generation_leaves_it_open(processor, model):
    runnable = Runnable(model, processor, source=None, device="cpu")
    image = picture(56, 56)
    for answer_next, ending in ((True, "<think>\n\n</think>\n\n"), (False, "assistant\n<think>\n\n")):
        inputs = batch_inputs(runnable, ["Which?", "And?"], [image, None], answer_next=answer_next)
        texts = processor.tokenizer.batch_decode(inputs["input_ids"])
        assert all(text.endswith(ending) for text in texts), texts


@pytest.mark.parametrize(
    "decoded, answer",
    [
        ("</think>\n\nA square.", "A square."),
        ("Let me see.\n</think>\n\nBlue", "Blue"),
        ("a</think>b</think>\n\nC\n", "C"),
        ("\n\nNo block closed.\n", "No block closed."),
        ("", ""),
    ],
)
def test_the_answer_is_what_follows_the_last_think_close(processor, decoded, answer):
    assert answer_text(processor, decoded) == answer
    plain = copy.copy(processor)
    plain.encoding = "dpa"
    assert answer_text(plain, decoded) == decoded  # dpa's encoding: the reply as decoded, as before


# --- early fusion -------------------------------------------------------------------------------------------
def _features(model, processor, question: str, image) -> torch.Tensor:
    inputs = processor.apply_chat_template(
        [user_turn(question, [image])], add_generation_prompt=True, tokenize=True, return_dict=True
    )
    perceiver = {k: v for k, v in inputs.items() if k not in ("input_ids", "attention_mask")}
    with torch.no_grad():
        return model.model.get_image_features(**perceiver).pooler_output[0]


@pytest.fixture(scope="module")
def encodings(processor, model, dpa_workspace):
    """(model, processor with early fusion, the same without) for each encoding."""
    fused = copy.copy(processor)
    fused.early_fusion = True
    folder = dpa_workspace("next_qwen_early")
    early = load_processor(folder)
    late = copy.copy(early)
    late.early_fusion = False
    return {
        "paper": (model, fused, processor),
        "dpa": (loading.load_model(folder / "model", dtype=torch.float32), early, late),
    }


@pytest.mark.parametrize("encoding", ["paper", "dpa"])
@pytest.mark.parametrize("questions", [QUESTIONS[:2], QUESTIONS[1:], ["Red?", "Blue?"]])
def test_early_fusion_makes_the_image_features_depend_on_the_question(encodings, encoding, questions):
    model, fused, plain = encodings[encoding]
    image = picture(56, 56, seed=3)
    one, two = (_features(model, fused, q, image) for q in questions)
    assert one.shape == two.shape and (one - two).abs().max() > 1e-3
    # Without it the question follows the image, which a causal perceiver never sees: the same features.
    assert torch.equal(_features(model, plain, questions[0], image), _features(model, plain, questions[1], image))


# --- the training pixel cap ---------------------------------------------------------------------------------
SIZES = [(600, 500), (500, 600), (1024, 1024), (4000, 30), (30, 4000), (513, 511), (512, 512), (511, 513), (56, 56)]


@pytest.mark.parametrize("size", SIZES)
def test_the_training_cap_scales_down_as_the_official_rescale(size):
    width, height = size
    limit = 262_144
    if width * height <= limit:
        assert capped_size(size, limit) == size
        return
    ratio = width / height  # ms-swift vision_utils.rescale_image: height sqrt(max / ratio), width height * ratio
    expected = (int(math.sqrt(limit / ratio) * ratio), int(math.sqrt(limit / ratio)))
    assert capped_size(size, limit) == expected and expected[0] * expected[1] <= limit
    assert cap_pixels(Image.new("RGB", size), limit).size == expected


@pytest.mark.parametrize("size", [(600, 500), (700, 420), (520, 520)])
def test_training_images_are_capped_before_the_processor_and_fast_counts_agree(processor, size):
    roomy = copy.deepcopy(processor)  # an image processor that would take more (the real one's cap is 12.8M)
    roomy.image_processor.size = {"shortest_edge": 3136, "longest_edge": 12_845_056}
    sample = Sample(
        "s",
        [ImageRef(image=Image.new("RGB", size))],
        [
            {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Hi"}]},
            {"role": "assistant", "content": [{"type": "text", "text": "Yes."}]},
        ],
    )
    features = SampleEncoder(roomy, 2, 1 << 20)(sample)
    width, height = capped_size(size, 262_144)
    assert features["image_grid_thw"].tolist() == [[1, round(height / 28) * 2, round(width / 28) * 2]]
    assert FeatureCounter(roomy)(size) == roomy.feature_counts(features)[0]
    assert roomy.train_max_pixels == 262_144


def test_dpa_encoding_is_unchanged(dpa_workspace):
    proc = load_processor(dpa_workspace("next_qwen"))
    assert (proc.encoding, proc.train_max_pixels, proc.image_slot_token_ids) == ("dpa", None, [proc.image_token_id])
    assert proc.chat_template == proc.tokenizer.chat_template
    inputs = proc(images=[picture(56, 56)], text=proc.image_token)
    assert proc.perceiver_tokenizer.decode(inputs["perceiver_input_ids"][0]).startswith(VISION_START)


# --- data check --preview -----------------------------------------------------------------------------------
def test_data_check_preview_shows_the_perceiver_text(paper, image_file, tmp_path):
    data = tmp_path / "data.json"
    record = {
        "id": "p1",
        "image": image_file.name,
        "conversations": [
            {"from": "human", "value": "Look closely.\n<image>\nWhat is it?"},
            {"from": "gpt", "value": "A square."},
        ],
    }
    data.write_text(json.dumps([record]))
    args = ["data", "check", str(data), "--image-root", str(image_file.parent), "-w", str(paper)]
    before = tree_hash(paper, image_file.parent)
    shown = runner.invoke(app, [*args, "--preview"])
    assert shown.exit_code == 0, shown.output
    assert "perceiver input of image 1: 6 features" in shown.stdout
    panel = shown.stdout.split("perceiver input of image 1")[1]
    assert "<|im_start|>user" in panel and "Look closely." in panel and "<image x4>" in panel
    assert "What is it?" not in panel.split("features")[1].split("╰")[0]  # nothing after the image
    plain = runner.invoke(app, args)
    assert plain.exit_code == 0 and "perceiver input" not in plain.stdout and "A square." in plain.stdout
    result = json.loads(runner.invoke(app, [*args, "--json"]).stdout)
    (image,) = result["sample"]["perceiver"]
    assert image["features"] == 6 and image["segments"][0] == ["<|im_start|>user\nLook closely.\n", "prompt"]
    assert tree_hash(paper, image_file.parent) == before


# --- refusals of `dpa upgrade --encoding` ------------------------------------------------------------------
def _bad_encodings() -> list[tuple[str, ...]]:
    spellings = ["Paper", "PAPER", "official", "paper ", "", "dpa,paper", "paper-dpa", "papers"]
    return [("causal_lm_qwen3", "qwen2_5_vl", "--encoding", s, "is not one of dpa, paper") for s in spellings]


REFUSALS = [
    *_bad_encodings(),
    ("causal_lm_qwen3", "qwen2_5_vl", "--encoding", "paper", "--feature-span", "image", "--encoding paper with"),
    *[
        ("llava_next", p, "--encoding", "paper", "--encoding paper: this perceiver")
        for p in ("llava", "idefics3", "smolvlm", "llava_onevision", "vit=target,lm=causal_lm_qwen3")
    ],
    *[
        (t, "qwen2_5_vl", "--encoding", "paper", "--encoding paper: the target tokenizer lacks")
        for t in ("causal_lm_llama", "llava_llama3", "llava_onevision", "llava_v15")
    ],
]


@pytest.mark.parametrize("case", REFUSALS, ids=[" ".join(c[:4]) + ("" if len(c) < 7 else " " + c[5]) for c in REFUSALS])
def test_an_encoding_that_cannot_be_written_is_refused_and_nothing_is_written(tiny_checkpoint, tmp_path, case):
    target, perceiver, *flags, needle = case
    if "lm=" in perceiver:
        perceiver = perceiver.replace("lm=causal_lm_qwen3", f"lm={tiny_checkpoint('causal_lm_qwen3')}")
    else:
        perceiver = str(tiny_checkpoint(perceiver))
    before = tree_hash(tmp_path)
    result = runner.invoke(
        app, ["upgrade", str(tiny_checkpoint(target)), "--perceiver", perceiver, "-o", str(tmp_path / "out"), *flags]
    )
    lines = result.stderr.strip().splitlines()
    assert result.exit_code == 2 and "Traceback" not in result.stderr, result.stderr
    assert lines and lines[0].startswith("error:") and len(lines) <= 2 and needle in lines[0], result.stderr
    assert tree_hash(tmp_path) == before and not (tmp_path / "out").exists()


# --- a hand-edited processor_config.json -------------------------------------------------------------------
def _edits() -> list[tuple[str, object]]:
    bad = [("encoding", v) for v in ("Paper", "official", "", None, 3, ["paper"])]
    bad += [("feature_span", v) for v in ("image", "markers", None)]  # paper needs image+markers
    bad += [("target_marker_tokens", v) for v in (["<|vision_start|>"], [], ["<|vision_start|>"] * 3)]
    return bad


@pytest.mark.parametrize("command", ["data", "generate"])
@pytest.mark.parametrize("key, value", _edits(), ids=[f"{k}={v!r}" for k, v in _edits()])
def test_a_processor_config_the_encoding_cannot_run_is_refused_in_one_line(
    paper, image_file, tmp_path, command, key, value
):
    workspace = Path(shutil.copytree(paper, tmp_path / "ws"))
    settings = workspace / "model" / "processor_config.json"
    settings.write_text(json.dumps({**json.loads(settings.read_text()), key: value}))
    data = tmp_path / "data.json"
    data.write_text(
        json.dumps(
            [
                {
                    "image": image_file.name,
                    "conversations": [{"from": "human", "value": "<image>\nHi"}, {"from": "gpt", "value": "Yes."}],
                }
            ]
        )
    )
    argv = {
        "data": ["data", "check", str(data), "--image-root", str(image_file.parent), "-w", str(workspace)],
        "generate": ["generate", str(workspace), "--image", str(image_file), "--prompt", "Hi"],
    }[command]
    before = tree_hash(workspace, image_file.parent)
    result = runner.invoke(app, argv)
    lines = result.stderr.strip().splitlines()
    assert result.exit_code == 2 and "Traceback" not in result.stderr, result.stderr
    assert lines and lines[0].startswith("error:") and len(lines) <= 2, result.stderr
    assert "cannot load its processor" in lines[0] and str(workspace / "model") in lines[0]
    assert tree_hash(workspace, image_file.parent) == before
