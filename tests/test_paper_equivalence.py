"""The equivalence test (issue 15): dpa against the official DPA code, transcribed independently in
tests/official_reference.py (every step cited path:line; it never imports dpa_cli).

Tiny checkpoints in the official layouts (tests/official_layouts.py) become workspaces with `dpa upgrade`, under the
`paper` preset; the same conversations then go through dpa (its data encoder, collator and model) and through the
reference (the official template, collation and forward). Token sequences must be equal exactly (target ids, labels,
the perceiver ids up to the image: a causal perceiver's image states never see what follows), pixels and the
perceiver states, phi's features, the LLM's input embeddings, logits and loss within 1e-5. The export of an official
checkpoint, loaded in a fresh interpreter with plain transformers, gives the reference's ids and logits.

The official folders get the image-processor bounds the official checkpoint ships (`ms-swift/modelings/
preprocessor_config.json:2-3`, min 3136 / max 12845056 pixels, qwen-vl-utils' own), not the tiny test processor's.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from dpa_cli import loading
from dpa_cli.cli.app import app
from dpa_cli.data import DPACollator, SampleEncoder, load_processor
from dpa_cli.data.samples import from_llava
from tests import official_reference as reference
from tests.factories import copy_checkpoint, paper_hub_cache, read_tensors
from tests.official_layouts import HEAD_ALIASES, build_baseline, build_hw, build_official_dpa
from tests.test_bad_inputs import edit_json

runner = CliRunner()
TOLERANCE = 1e-5
SIZES = {"square.png": (56, 56), "wide.png": (84, 56), "odd.png": (70, 50), "big.png": (600, 500)}  # (w, h)


def conversation(user: str, image: str, answers: tuple[str, str], follow_up: str = "And its colour?") -> dict:
    """A LLaVA record: two rounds, the image in the first user turn."""
    turns = [("human", user), ("gpt", answers[0]), ("human", follow_up), ("gpt", answers[1])]
    return {"id": image, "image": image, "conversations": [{"from": f, "value": v} for f, v in turns]}


# Where the image stands in the first user turn, and how answers are written: each pair is one sample, so every
# placement meets every answer style (an empty think block the data writes itself, reasoning, spaces, newlines).
PLACEMENTS = (
    "<image>\nWhat is it?",
    "Look at this.\n<image>\nDescribe the picture in detail, please.",
    "What is shown here?\n<image>",
)
ANSWERS = {
    "plain": ("A square.", "Blue, 3 shades."),
    "own empty think block": ("<think>\n\n</think>\n\nA noisy picture.", "<think>\n\n</think>\n\nNo."),
    "reasoning block": ("<think>\nIt has edges.\n</think>\n\nA square.", "<think>\nLook.\n</think>\n\nBlue."),
    "spaces and newlines": (" A square.", "Blue.\n"),
    "think close inside": ("Done</think> ok", "Fine."),
}
SAMPLES = {
    f"{name} / image {i}": conversation(user, image, answers)
    for i, (user, image) in enumerate(zip(PLACEMENTS, ("square.png", "wide.png", "odd.png")))
    for name, answers in ANSWERS.items()
}
SAMPLES["over the 262,144-pixel training cap"] = conversation(PLACEMENTS[1], "big.png", ANSWERS["plain"])
STAGE2_BATCH = [  # right padding, several images and lengths, an image off the 28-pixel grid
    conversation(PLACEMENTS[0], "square.png", ANSWERS["plain"]),
    conversation(PLACEMENTS[1], "wide.png", ANSWERS["own empty think block"]),
    conversation(PLACEMENTS[2], "odd.png", ANSWERS["reasoning block"]),
]
STAGE1_BATCH = [  # LLaVA-Pretrain's two caption layouts: the instruction after or before the image
    {
        "id": "c0",
        "image": "odd.png",
        "conversations": [
            {"from": "human", "value": "<image>\nGive a brief description."},
            {"from": "gpt", "value": "A noisy picture."},
        ],
    },
    {
        "id": "c1",
        "image": "wide.png",
        "conversations": [
            {"from": "human", "value": "Summarise the photo.\n<image>"},
            {"from": "gpt", "value": "Colours."},
        ],
    },
]


def messages(record: dict) -> list[dict[str, str]]:
    return [
        {"role": {"human": "user", "gpt": "assistant"}[t["from"]], "content": t["value"]}
        for t in record["conversations"]
    ]


# --- fixtures: the hub ids the official configs name, images, official folders and their workspaces ---------------
@pytest.fixture(scope="module")
def hub(tmp_path_factory) -> Path:
    return paper_hub_cache(tmp_path_factory.mktemp("paper-hub"))


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("images")
    generator = torch.Generator().manual_seed(0)
    for name, (width, height) in SIZES.items():
        pixels = torch.randint(0, 256, (height, width, 3), generator=generator, dtype=torch.uint8)
        Image.fromarray(pixels.numpy()).save(folder / name)
    return folder


def official_bounds(folder: Path) -> Path:
    """The image processor as the official checkpoint ships it (`ms-swift/modelings/preprocessor_config.json:2-3`)."""

    def bounds(config: dict) -> None:
        config.pop("size", None)
        config.update(min_pixels=3136, max_pixels=12845056)

    edit_json(folder / "preprocessor_config.json", bounds)
    return folder


def upgrade(argv: list[str], hub: Path) -> dict:
    result = runner.invoke(app, ["upgrade", *argv, "--json"], env={"HF_HUB_CACHE": str(hub)})
    assert result.exit_code == 0, (result.stderr, result.exception)
    return json.loads(result.stdout)


# How an official DPA checkpoint may be stored (sec. 1.3: .bin or safetensors, bf16 or fp32, the thinker's tied head
# under any alias or none), and how its perceiver_config may spell the perceiver's rotary (sec. 6: theta absent means
# the Qwen2Config default 10000; head_dim given or width / heads; rope_scaling null, or naming sections other than
# vit_path's, which the official code does not read: LB:556-557 takes vit_path's).
BUILT = "safetensors, both head aliases, bf16"
CHECKPOINTS = {
    BUILT: (dict(), {}),
    ".bin, tied head absent, bf16": (dict(storage="bin", heads=()), {}),
    "safetensors, one head alias, fp32": (dict(heads=HEAD_ALIASES[1:], dtype=torch.float32), {}),
    "rope_theta absent, rope_scaling null": (None, {"rope_theta": None, "rope_scaling": None}),
    "explicit head_dim, wider config": (None, {"head_dim": 16, "hidden_size": 128, "rope_theta": 5000.0}),
    "width / heads, sections other than vit_path's": (
        None,
        {"hidden_size": 32, "num_attention_heads": 2, "rope_scaling": {"type": "default", "mrope_section": [4, 2, 2]}},
    ),
}


@pytest.fixture(scope="module")
def official(hub, tmp_path_factory):
    """`official(case)` -> (official folder, its workspace made by `dpa upgrade OFFICIAL -o WS`), built once; a
    perceiver_config spelling edits a copy of the first checkpoint."""
    root, built = tmp_path_factory.mktemp("official"), {}

    def get(case: str) -> tuple[Path, Path]:
        if case not in built:
            storage, perceiver = CHECKPOINTS[case]
            number = list(CHECKPOINTS).index(case)
            folder, workspace = root / f"official-{number}", root / f"ws-{number}"
            if storage is None:
                copy_checkpoint(get(BUILT)[0], folder)
            else:
                official_bounds(build_official_dpa(folder, **storage))

            def spell(config: dict) -> None:  # None: the key absent
                for key, value in perceiver.items():
                    config["perceiver_config"].pop(key, None)
                    if key != "rope_theta" or value is not None:
                        config["perceiver_config"][key] = value

            edit_json(folder / "config.json", spell)
            result = upgrade([str(folder), "-o", str(workspace), "--no-verify-load"], hub)
            config = result["plan"]["config"]
            assert (config["encoding"], config["feature_span"]) == ("paper", "image+markers")
            built[case] = folder, workspace
        return built[case]

    return get


# --- the two sides ----------------------------------------------------------------------------------------------
def dpa_batch(workspace: Path, records: list[dict], images: Path, stage: int) -> tuple[dict, list[dict]]:
    processor = load_processor(workspace)
    encoder = SampleEncoder(processor, stage, 4096)
    features = [encoder(from_llava(record, i, images)) for i, record in enumerate(records)]
    return DPACollator(processor)(features), features


def reference_batch(parts: reference.TemplateParts, records: list[dict], images: Path, stage: int):
    encoded = [reference.encode(messages(r), [images / r["image"]], stage, parts) for r in records]
    return reference.collate(encoded, parts), encoded


def dpa_forward(model: torch.nn.Module, batch: dict) -> dict[str, torch.Tensor]:
    """dpa's forward, with what enters phi (the perceiver states at the feature rows) and the LLM (its input
    embeddings) recorded on the way."""
    seen: dict[str, torch.Tensor] = {}

    def record_embeds(module, args, kwargs) -> None:
        seen["inputs_embeds"] = kwargs["inputs_embeds"]

    inner = model.model
    hooks = [
        inner.multi_modal_projector.register_forward_pre_hook(lambda m, args: seen.update(states=args[0])),
        inner.language_model.register_forward_pre_hook(record_embeds, with_kwargs=True),
    ]
    with torch.no_grad():
        out = model(**batch)
    for hook in hooks:
        hook.remove()
    return {**seen, "features": out.image_hidden_states, "logits": out.logits, "loss": out.loss}


def assert_same_tokens(
    features: list[dict], encoded: list[reference.Encoded], stage: int, parts: reference.TemplateParts
) -> None:
    vision_end = reference.Ids.of(parts.perceiver_tokenizer).vision_end
    for dpa, official in zip(features, encoded):
        assert dpa["input_ids"].tolist() == official.ids
        assert dpa["labels"].tolist() == official.labels
        perceiver = dpa["perceiver_input_ids"][0][dpa["perceiver_attention_mask"][0].bool()].tolist()
        # The official perceiver reads the whole conversation (stage 2) or is cut after the image (stage 1).
        assert perceiver == (official.perceiver_ids[: len(perceiver)] if stage == 2 else official.perceiver_ids)
        assert perceiver[-1] == vision_end


def assert_same_forward(
    model: torch.nn.Module,
    official: reference.OfficialDPA,
    workspace: Path,
    records: list[dict],
    images: Path,
    stage: int,
    parts: reference.TemplateParts,
) -> None:
    batch, features = dpa_batch(workspace, records, images, stage)
    expected, encoded = reference_batch(parts, records, images, stage)
    assert_same_tokens(features, encoded, stage, parts)
    assert torch.equal(batch["image_grid_thw"], expected["image_grid_thw"])
    torch.testing.assert_close(batch["pixel_values"], expected["pixel_values"], rtol=0, atol=TOLERANCE)
    ours, theirs = dpa_forward(model, batch), official(expected)
    real = batch["attention_mask"].bool()
    assert torch.equal(real, expected["attention_mask"].bool())
    for name, mask in (("states", None), ("features", None), ("inputs_embeds", real), ("logits", real)):
        got, want = (ours[name], theirs[name]) if mask is None else (ours[name][mask], theirs[name][mask])
        torch.testing.assert_close(got, want, rtol=0, atol=TOLERANCE, msg=lambda m, n=name: f"{n}: {m}")
    torch.testing.assert_close(ours["loss"], theirs["loss"], rtol=0, atol=TOLERANCE)


# --- the reference itself against the transcription's worked example (sec. 2.11) ----------------------------------
def test_the_reference_positions_follow_the_worked_example():
    """`<|im_start|> user \\n <|vision_start|> pad x4 <|vision_end|> \\n`, a 56x56 image (grid 1x4x4, merged 2x2)."""
    start, pad, end = 7, 9, 8
    ids = torch.tensor([[1, 2, 3, start, pad, pad, pad, pad, end, 4, 0]])
    mask = torch.tensor([[1] * 10 + [0]])
    positions = reference.rope_index(ids, mask, torch.tensor([[1, 4, 4]]), pad, merge=2)
    expected = [
        (0, 0, 0),
        (1, 1, 1),
        (2, 2, 2),
        (3, 3, 3),
        (4, 4, 4),
        (4, 4, 5),
        (4, 5, 4),
        (4, 5, 5),
        (6, 6, 6),
        (7, 7, 7),
        (1, 1, 1),
    ]
    assert [tuple(p) for p in positions[:, 0].T.tolist()] == expected


# --- dpa's processor output is the official template's, token for token --------------------------------------------
@pytest.mark.parametrize("stage", [2, 1])
@pytest.mark.parametrize("name", list(SAMPLES))
def test_dpa_encodes_each_sample_as_the_official_template(official, hub, images, name, stage):
    folder, workspace = official(BUILT)
    parts = reference.TemplateParts.load(folder, hub)
    record = SAMPLES[name]
    if stage == 1:  # stage 1 data is single-turn (the official KEEP_FIRST_TURN_ONLY keeps the first round)
        record = {**record, "conversations": record["conversations"][:2]}
    batch, features = dpa_batch(workspace, [record], images, stage)
    expected, encoded = reference_batch(parts, [record], images, stage)
    assert_same_tokens(features, encoded, stage, parts)
    assert torch.equal(batch["image_grid_thw"], expected["image_grid_thw"])
    assert torch.equal(batch["pixel_values"], expected["pixel_values"])


# --- dpa's model computes the official forward -----------------------------------------------------------------
@pytest.mark.parametrize("case", list(CHECKPOINTS))
def test_an_official_checkpoint_computes_the_official_forward(official, hub, images, case):
    folder, workspace = official(case)
    model = loading.load_model(workspace / "model", dtype=torch.float32).eval()
    expected = reference.OfficialDPA.from_official(folder, hub)
    parts = reference.TemplateParts.load(folder, hub)
    assert_same_forward(model, expected, workspace, STAGE2_BATCH, images, 2, parts)
    assert_same_forward(model, expected, workspace, STAGE1_BATCH, images, 1, parts)


def test_the_composed_paper_pair_computes_the_official_forward(hub, images, tmp_path):
    """`dpa upgrade HW --perceiver LB`: the baseline target's Qwen3 as the thinker (1-D positions), the official
    perceiver, a fresh phi (read from the workspace: it has no official source)."""
    target = official_bounds(build_hw(tmp_path / "hw"))
    perceiver = official_bounds(build_baseline(tmp_path / "lb", "bin"))
    result = upgrade([str(target), "--perceiver", str(perceiver), "-o", str(tmp_path / "ws"), "--no-verify-load"], hub)
    assert result["plan"]["config"]["encoding"] == "paper"  # the paper's pair gets the paper preset by default
    written = read_tensors(tmp_path / "ws" / "model")
    phi = {
        f"{index}.{kind}": written[f"model.multi_modal_projector.linear_{layer}.{kind}"]
        for index, layer in ((0, 1), (2, 2))
        for kind in ("weight", "bias")
    }
    expected = reference.OfficialDPA.from_parts(perceiver, target, phi, hub)
    model = loading.load_model(tmp_path / "ws" / "model", dtype=torch.float32).eval()
    parts = reference.TemplateParts.load(perceiver, hub)
    assert_same_forward(model, expected, tmp_path / "ws", STAGE2_BATCH, images, 2, parts)
    assert_same_forward(model, expected, tmp_path / "ws", STAGE1_BATCH, images, 1, parts)


# --- the export, in a fresh interpreter with plain transformers ------------------------------------------------
EXPORT_CHECK = r"""
import json, sys, torch
from PIL import Image
from transformers import AutoModelForImageTextToText, AutoProcessor
folder, requests, out = sys.argv[1], json.loads(sys.argv[2]), sys.argv[3]
model = AutoModelForImageTextToText.from_pretrained(folder, trust_remote_code=True, dtype=torch.float32).eval()
processor = AutoProcessor.from_pretrained(folder, trust_remote_code=True)
assert not any(name.startswith("dpa_cli") for name in sys.modules), "dpa_cli was imported"
results = []
for image, messages in requests:  # one sample per call: the thinker's positions are 0..L-1 as in training
    text = processor.apply_chat_template(messages, tokenize=False)
    inputs = processor(images=[Image.open(image)], text=[text], return_tensors="pt")
    with torch.no_grad():
        results.append({"input_ids": inputs["input_ids"][0], "logits": model(**inputs).logits[0]})
torch.save(results, out)
"""


def chat_messages(record: dict) -> list[dict]:
    """The record as chat messages, the user's `<image>` (and the newline LLaVA writes next to it) an image block;
    the exported processor's template joins a message's blocks with newlines, as the data had them."""
    out = []
    for message in messages(record):
        blocks = [{"type": "text", "text": message["content"]}]
        if message["role"] == "user":
            blocks = []
            for index, piece in enumerate(message["content"].split("<image>")):
                blocks += [{"type": "image"}] if index else []
                blocks += [{"type": "text", "text": piece.strip("\n")}] if piece.strip("\n") else []
        out.append({"role": message["role"], "content": blocks})
    return out


def test_the_export_gives_the_official_logits_in_plain_transformers(official, hub, images, tmp_path):
    folder, workspace = official(".bin, tied head absent, bf16")
    exported = runner.invoke(app, ["export", "-w", str(workspace), "-o", str(tmp_path / "export"), "--no-verify"])
    assert exported.exit_code == 0, (exported.stderr, exported.exception)
    records = STAGE2_BATCH[:2]  # images the processor takes as they are (inference has no 262,144-pixel cap)
    requests = [[str(images / r["image"]), chat_messages(r)] for r in records]
    run = subprocess.run(
        [sys.executable, "-c", EXPORT_CHECK, str(tmp_path / "export"), json.dumps(requests), str(tmp_path / "out.pt")],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": ""},
    )
    assert run.returncode == 0, run.stderr[-3000:]
    parts = reference.TemplateParts.load(folder, hub)
    expected, encoded = reference_batch(parts, records, images, 2)
    logits = reference.OfficialDPA.from_official(folder, hub)(expected)["logits"]
    for row, (got, want) in enumerate(zip(torch.load(tmp_path / "out.pt"), encoded)):
        assert got["input_ids"].tolist() == want.ids
        torch.testing.assert_close(got["logits"], logits[row, : len(want.ids)], rtol=0, atol=TOLERANCE)
