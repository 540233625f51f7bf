"""Sample lengths without decoding (data/lengths.py): equal to the real encoder's `len(input_ids)` over generated
samples (captions, multi-turn, text-only, several images, cut and dropped ones) for every data workspace; cached
beside the data and recomputed when the data or the stage changes; never a pixel decoded; and length grouping
wired into `dpa train` through dpa's own sampler."""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import pytest
from PIL import Image, ImageFile

from dpa_cli.data import EncodedDataset, SampleEncoder, load_processor, open_samples
from dpa_cli.data.lengths import SUFFIX, sample_lengths
from tests.conftest import DPA_WORKSPACES
from tests.fixtures.data import turn

SIZES = [(28, 28), (60, 40), (40, 60), (123, 45), (200, 200), (333, 120), (17, 300), (640, 480)]
WORDS = [
    "the",
    "a",
    "cat",
    "dog",
    "sits",
    "on",
    "mat",
    "red",
    "blue",
    "big",
    "small",
    "runs",
    "fast",
    "slow",
    "near",
    "far",
]


def _text(rng: random.Random, words: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(words))


def generated_records(rng: random.Random, count: int, images: list[str]) -> list[dict]:
    """Captions, short QA, multi-turn, text-only and multi-image samples; a few long enough to be cut or dropped."""
    records = []
    for index in range(count):
        kind = index % 5
        if kind == 0:  # caption
            record = {
                "image": rng.choice(images),
                "conversations": [turn("human", "<image>\nDescribe it."), turn("gpt", _text(rng, rng.randint(3, 12)))],
            }
        elif kind == 1:  # text only
            record = {"conversations": [turn("human", _text(rng, 5)), turn("gpt", _text(rng, rng.randint(2, 30)))]}
        elif kind == 2:  # several images
            record = {
                "image": [rng.choice(images) for _ in range(2)],
                "conversations": [turn("human", "<image>\n<image>\nCompare."), turn("gpt", _text(rng, 6))],
            }
        elif kind == 3:  # multi-turn, sometimes long (cut at max_length)
            turns = [turn("human", "<image>\n" + _text(rng, 4))]
            for _ in range(rng.randint(1, 4)):
                turns += [turn("gpt", _text(rng, rng.randint(5, 60))), turn("human", _text(rng, 4))]
            record = {"image": rng.choice(images), "conversations": [*turns, turn("gpt", _text(rng, 8))]}
        else:  # the image late in a long prompt: over max_length it cannot be cut (dropped, or skipped)
            record = {
                "image": rng.choice(images),
                "conversations": [
                    turn("human", _text(rng, rng.randint(1, 400)) + "\n<image>"),
                    turn("gpt", _text(rng, 3)),
                ],
            }
        records.append({"id": f"s{index}", **record})
    return records


@pytest.fixture(scope="module")
def generated(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("lengths")
    for width, height in SIZES:
        Image.new("RGB", (width, height), (width % 256, 90, height % 256)).save(root / f"{width}x{height}.png")
    records = generated_records(random.Random(0), 60, [f"{w}x{h}.png" for w, h in SIZES])
    (root / "data.json").write_text(json.dumps(records))
    return root


def decodes(monkeypatch) -> list[str]:
    """Every pixel decode of an image file (PIL's ImageFile.load), recorded."""
    seen: list[str] = []
    load = ImageFile.ImageFile.load

    def counting(self):
        if self.tile:  # pixels still to decode (a loaded image has none left)
            seen.append(getattr(self, "filename", "?"))
        return load(self)

    monkeypatch.setattr(ImageFile.ImageFile, "load", counting)
    return seen


@pytest.fixture(scope="module")
def paper_workspace(tiny_checkpoint, tmp_path_factory) -> Path:
    """The paper encoding: image+markers slots, the target's markers wrapping each image in the text, a pixel cap."""
    from typer.testing import CliRunner

    from dpa_cli.cli.app import app

    folder = tmp_path_factory.mktemp("paper") / "ws"
    result = CliRunner().invoke(
        app,
        [
            "upgrade",
            str(tiny_checkpoint("causal_lm_qwen3")),
            "--perceiver",
            str(tiny_checkpoint("qwen2_5_vl")),
            "-o",
            str(folder),
            "--encoding",
            "paper",
        ],
    )
    assert result.exit_code == 0, result.output
    return folder


@pytest.mark.parametrize("name", [*DPA_WORKSPACES, "paper"])
def test_lengths_equal_the_encoders_without_decoding_a_pixel(
    dpa_workspace, paper_workspace, generated, name, monkeypatch
):
    processor = load_processor(paper_workspace if name == "paper" else dpa_workspace(name))
    assert name != "paper" or (processor.marker_slots and processor.train_max_pixels)
    rng = random.Random(name)
    for stage, max_length, skip in ((2, 1 << 20, "fail"), (rng.choice((1, 2)), rng.randint(200, 420), "skip")):
        data = generated / "data.json"
        dataset = EncodedDataset(open_samples(data), SampleEncoder(processor, stage, max_length), skip)
        decoded = decodes(monkeypatch)
        lengths = sample_lengths(dataset)
        assert decoded == [], "sample_lengths decoded pixels"
        monkeypatch.undo()
        assert lengths == [len(dataset[i]["input_ids"]) for i in range(len(dataset))], (stage, max_length)
        if max_length < 1 << 20:  # the settings really cut and drop samples
            assert max(lengths) == max_length and dataset.skipped["too_long"] > 0
        assert lengths == sample_lengths(dataset)  # from the cache now
        (generated / f".data.json{SUFFIX}").unlink()


def test_the_cache_is_beside_the_data_keyed_and_invalidated(dpa_workspace, generated, tmp_path):
    processor = load_processor(dpa_workspace("next_qwen"))
    folder = shutil.copytree(generated, tmp_path / "data", ignore=shutil.ignore_patterns(f"*{SUFFIX}"))
    data, cache = folder / "data.json", folder / f".data.json{SUFFIX}"

    def dataset(stage):
        return EncodedDataset(open_samples(data), SampleEncoder(processor, stage, 4096))

    first = sample_lengths(dataset(2))
    key = json.loads(cache.read_text())["key"]
    assert len(json.loads(cache.read_text())["samples"]) == len(first)
    sample_lengths(dataset(1))  # stage 1 masks differently: a new key
    assert json.loads(cache.read_text())["key"] != key
    records = json.loads(data.read_text())
    records[1]["conversations"][1]["value"] += " and much more text than before" * 3
    data.write_text(json.dumps(records))
    again = sample_lengths(dataset(2))  # the data changed: recomputed, not read back
    assert again[1] > first[1] and again[1] == len(dataset(2)[1]["input_ids"])


def test_data_that_cannot_take_the_cache_caches_under_the_given_folder(dpa_workspace, generated, tmp_path):
    processor = load_processor(dpa_workspace("next_qwen"))
    folder = shutil.copytree(generated, tmp_path / "ro", ignore=shutil.ignore_patterns(f"*{SUFFIX}"))
    # A read-only folder, even for root (tests may run as root): its cache name is taken by a folder.
    (folder / f".data.json{SUFFIX}").mkdir()
    dataset = EncodedDataset(open_samples(folder / "data.json"), SampleEncoder(processor, 2, 4096))
    lengths = sample_lengths(dataset, cache_dir=tmp_path / "workspace")
    cached = list((tmp_path / "workspace" / "lengths").glob(f"*{SUFFIX[1:]}"))
    assert len(cached) == 1 and not any((folder / f".data.json{SUFFIX}").iterdir())
    assert not list(folder.glob("*.tmp"))  # no half-written cache left behind
    assert sample_lengths(dataset, cache_dir=tmp_path / "workspace") == lengths


def caption_data(root: Path, count: int) -> Path:
    """`count` captions over a few image sizes; the longest caption alone uses `longest.png`."""
    rng = random.Random(count)
    for width, height in SIZES[:4]:
        Image.new("RGB", (width, height), (200, 40, 40)).save(root / f"{width}x{height}.jpg")
    Image.new("RGB", (60, 40), (40, 40, 200)).save(root / "longest.png")
    records = [
        {
            "id": f"c{i}",
            "image": f"{rng.choice(SIZES[:4])[0]}x{rng.choice(SIZES[:4])[1]}.jpg",
            "conversations": [turn("human", "<image>\nDescribe it."), turn("gpt", _text(rng, rng.randint(2, 20)))],
        }
        for i in range(count)
    ]
    records = [{**r, "image": r["image"] if (root / r["image"]).exists() else "28x28.jpg"} for r in records]
    records[count // 2] = {
        "id": "longest",
        "image": "longest.png",
        "conversations": [turn("human", "<image>\nDescribe it."), turn("gpt", _text(rng, 60))],
    }
    (root / "captions.json").write_text(json.dumps(records))
    return root / "captions.json"


GROUPED = [
    "--set",
    "train_sampling_strategy=group_by_length",
    "--set",
    "global_batch_size=4",
    "--set",
    "per_device_train_batch_size=2",
    "--max-steps",
    "1",
    "--set",
    "save_steps=1000",
    "--set",
    "max_length=512",
    "--set",
    "gradient_checkpointing=false",
    "--json",
]


def test_group_by_length_trains_with_dpas_sampler_and_decodes_only_the_batch(dpa_workspace, tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from dpa_cli.cli.app import app

    workspace = shutil.copytree(dpa_workspace("next_composed"), tmp_path / "ws")
    data = caption_data(tmp_path, 60)
    decoded = decodes(monkeypatch)
    result = CliRunner().invoke(app, ["train", "--stage", "1", "-w", str(workspace), "--data", str(data), *GROUPED])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["steps"] == 1
    # The first sample, shown before training, one step of 4 samples, and the micro-batch of 2 that accelerate
    # reads ahead: transformers' own group_by_length decodes all 60 before step 1.
    assert len(decoded) <= 1 + 4 + 2, decoded
    # dpa's sampler puts the batch holding the longest sample first (an out-of-memory shows at step 1).
    assert any(name.endswith("longest.png") for name in decoded), decoded
