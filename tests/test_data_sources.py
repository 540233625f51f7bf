"""What data and models come from, judged by name: video samples (however written) and URLs (for data, image
root or image) are refused with what to do, by every command that reads them, nothing written; a ShareGPT /
ms-swift top-level `system` becomes the template's system turn, masked from the loss; the export's model card
names its base models (also local folders downloaded from the Hub) and its generation config stops replies."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml
from PIL import Image
from typer.testing import CliRunner

from dpa_cli.cli.app import app
from tests.test_train_config import refused

runner = CliRunner()
ASK = [{"from": "human", "value": "<image>\nWhat is it?"}, {"from": "gpt", "value": "A square."}]
SMALL = ["--set", "global_batch_size=2", "--set", "per_device_train_batch_size=1", "--max-steps", "1"]


@pytest.fixture(scope="module")
def shared(dpa_workspace, tmp_path_factory) -> dict[str, Path]:
    """A workspace (hashed around each refusal, never changed) and a folder with one image."""
    root = tmp_path_factory.mktemp("sources")
    (root / "images").mkdir()
    Image.new("RGB", (40, 40), (200, 30, 30)).save(root / "images" / "red.png")
    return {"ws": Path(shutil.copytree(dpa_workspace("next_qwen"), root / "ws")), "images": root / "images"}


# --- video samples -------------------------------------------------------------------------------------------
def _llava(sample_id: str, **extra) -> dict:
    return {"id": sample_id, "image": "red.png", "conversations": ASK, **extra}


def _video_turns(marker: str, turn: int) -> list[dict]:
    turns = [dict(t) for t in ASK] + [{"from": "human", "value": "And then?"}, {"from": "gpt", "value": "Nothing."}]
    turns[turn] = {**turns[turn], "value": f"{marker}\n{turns[turn]['value']}"}
    return turns


def _chat(sample_id: str, content: list | str, **extra) -> dict:
    return {
        "id": sample_id,
        "messages": [{"role": "user", "content": content}, {"role": "assistant", "content": "A square."}],
        **extra,
    }


def video_samples() -> list[dict]:
    """Every way the LLaVA-Video / ShareGPT / ms-swift / transformers formats write a video sample."""
    found = []
    for marker in ("<video>", "<VIDEO>", "<Video>"):
        for turn in (0, 2):
            found.append({"id": f"marker-{marker[1:-1]}-{turn}", "conversations": _video_turns(marker, turn)})
    for key, value in (
        ("video", "clip.mp4"),
        ("videos", ["clip.mp4"]),
        ("videos", "clip.mp4"),
        ("video", {"path": "clip.mp4"}),
        ("videos", ["a.mp4", "b.mp4"]),
    ):
        found.append(_llava(f"llava-{key}-{len(found)}", **{key: value}))
        found.append(_chat(f"chat-{key}-{len(found)}", "<image>What is it?", images=["red.png"], **{key: value}))
    found.append(_chat("swift-marker", "<video>What happens?", videos=["clip.mp4"]))
    found.append(_chat("block-video", [{"type": "video", "video": "clip.mp4"}, {"type": "text", "text": "What?"}]))
    found.append(
        _chat(
            "block-video-url",
            [{"type": "video_url", "video_url": {"url": "clip.mp4"}}, {"type": "text", "text": "What?"}],
        )
    )
    return found


VIDEOS = video_samples()


def test_data_check_lists_every_video_sample_by_kind(shared, tmp_path):
    data = tmp_path / "data.json"
    data.write_text(json.dumps([_llava("good"), *VIDEOS]))
    result = runner.invoke(
        app,
        [
            "data",
            "check",
            str(data),
            "--image-root",
            str(shared["images"]),
            "-w",
            str(shared["ws"]),
            "--fast",
            "--json",
        ],
    )
    assert result.exit_code == 2, result.stderr
    found = {p["kind"]: p for p in json.loads(result.stdout)["problems"]}
    assert found["video_sample"]["count"] == len(VIDEOS), found
    assert "extract frames" in found["video_sample"]["message"]
    from dpa_cli.data.formats import open_samples

    said = [[kind for kind, _ in open_samples(data)[i].problems] for i in range(1, len(VIDEOS) + 1)]
    assert said == [["video_sample"]] * len(VIDEOS), "a video sample is said once, as a video (no bad_record beside it)"


@pytest.mark.parametrize("sample", VIDEOS[::3], ids=lambda s: s["id"])
def test_train_refuses_a_video_sample_naming_it_and_the_file(shared, tmp_path, sample):
    data = tmp_path / "data.json"
    data.write_text(json.dumps([_llava("good"), sample]))
    argv = [
        "train",
        "--stage",
        "1",
        "-w",
        str(shared["ws"]),
        "--data",
        str(data),
        "--image-root",
        str(shared["images"]),
        *SMALL,
    ]
    refused(
        argv,
        [tmp_path, shared["ws"]],
        (f"sample {sample['id']}", "sample #1", "video sample", str(data), "extract frames"),
    )


# --- URLs ----------------------------------------------------------------------------------------------------
URLS = [
    "http://example.com/data.json",
    "https://example.com/a/b.jsonl?x=1",
    "HTTPS://EXAMPLE.COM/D.JSON",
    "s3://bucket/data.json",
    "hf://datasets/org/name",
    "ftp://host/data.json",
    "gs://bucket/images",
]


@pytest.mark.parametrize("url", URLS)
def test_a_url_as_data_or_image_root_is_named_by_every_reader(shared, tmp_path, url):
    data = tmp_path / "data.json"
    data.write_text(json.dumps([_llava("good"), _llava("good2")]))
    watched, ws = [tmp_path, shared["ws"]], str(shared["ws"])
    scheme = url.split("://")[0]
    for argv, flag in (
        (["train", "--stage", "1", "-w", ws, "--data", url, *SMALL], "--data"),
        (["train", "--stage", "1", "-w", ws, "--data", str(data), "--image-root", url, *SMALL], "--image-root"),
        (["data", "check", url, "-w", ws], "--data"),
        (["data", "check", str(data), "--image-root", url, "-w", ws], "--image-root"),
        (["eval", ws, "--data", url, "-o", str(tmp_path / "p.jsonl")], "--data"),
        (
            ["analyze", "modality-gap", ws, "--data", str(data), "--image-root", url, "-o", str(tmp_path / "g")],
            "--image-root",
        ),
    ):
        refused(argv, watched, (f"{flag} {url}: a URL ({scheme}://)", "download it first"))


@pytest.mark.parametrize("url", [u.replace("data.json", "cat.png") for u in URLS[:4]] + ["http://x/y.jpg#frag"])
def test_generate_names_an_image_url_as_given(shared, tmp_path, url):
    """The URL as typed (not folded to `http:/...` by a path), what to do, before any model loads."""
    stderr = refused(
        ["generate", str(shared["ws"]), "--image", url, "--prompt", "hi"],
        [tmp_path, shared["ws"]],
        (url, "a URL", "download it first"),
    )
    assert "no such" not in stderr


def test_generate_reads_a_data_uri_as_an_image_and_refuses_other_media(shared, tmp_path):
    import base64

    from dpa_cli.generate import open_image

    png = base64.b64encode((shared["images"] / "red.png").read_bytes()).decode()
    assert open_image(f"data:image/png;base64,{png}").size == (40, 40)
    refused(
        ["generate", str(shared["ws"]), "--image", "data:text/plain;base64,aGVsbG8=", "--prompt", "hi"],
        [tmp_path, shared["ws"]],
        ("data:text/plain", "not an image"),
    )


# --- a top-level system ---------------------------------------------------------------------------------------
SYSTEM = "You are a terse assistant who answers in three words."
SYSTEM_SAMPLES = [
    {"id": "sharegpt", "image": "red.png", "system": SYSTEM, "conversations": ASK},
    {
        "id": "swift",
        "images": ["red.png"],
        "system": SYSTEM,
        "messages": [{"role": "user", "content": "<image>What is it?"}, {"role": "assistant", "content": "A square."}],
    },
]


@pytest.mark.parametrize("record", SYSTEM_SAMPLES, ids=lambda r: r["id"])
def test_a_top_level_system_is_the_system_turn_and_is_masked(shared, tmp_path, record):
    from dpa_cli import loading
    from dpa_cli.data import SampleEncoder, open_samples
    from dpa_cli.data.render import supervised_segments

    data = tmp_path / "data.json"
    data.write_text(json.dumps([record]))
    processor = loading.load_processor(shared["ws"] / "model")
    features = SampleEncoder(processor, stage=2, max_length=512)(open_samples(data, shared["images"])[0])
    segments = supervised_segments(processor, features)
    text = "".join(part for part, _ in segments)
    assert SYSTEM in text and text.index(SYSTEM) < text.index("What is it?")  # rendered first, as the system turn
    assert all(kind != "supervised" for part, kind in segments if SYSTEM in part or "terse" in part)
    learned = "".join(part for part, kind in segments if kind == "supervised")
    assert "A square." in learned and "terse" not in learned


@pytest.mark.parametrize(
    "system, needle",
    [(["a", "b"], "`system` is a list"), (5, "`system` is a int"), ({"text": "x"}, "`system` is a dict")],
)
def test_a_system_that_is_no_text_or_given_twice_is_a_bad_record(shared, tmp_path, system, needle):
    twice = {
        "id": "twice",
        "image": "red.png",
        "system": SYSTEM,
        "conversations": [{"from": "system", "value": "Other."}, *ASK],
    }
    data = tmp_path / "data.json"
    data.write_text(json.dumps([_llava("good"), {**_llava("bad"), "system": system}, twice]))
    result = runner.invoke(
        app,
        [
            "data",
            "check",
            str(data),
            "--image-root",
            str(shared["images"]),
            "-w",
            str(shared["ws"]),
            "--fast",
            "--json",
        ],
    )
    found = {p["kind"]: p for p in json.loads(result.stdout)["problems"]}
    assert result.exit_code == 2 and found["bad_record"]["count"] == 2, found
    assert found["bad_record"]["examples"] == ["bad", "twice"]


# --- the export's model card and generation config -----------------------------------------------------------
def test_export_card_names_local_sources_repos_and_generation_stops(tiny_checkpoint, tmp_path):
    """The target sits in a Hub cache folder (models--org--name), the perceiver is a folder whose config names
    its repo (`_name_or_path`); neither was given as a repo id. The target ships no generation config and its
    config names no stop token: the export's generation config gets them from the tokenizer."""
    from huggingface_hub import ModelCard
    from transformers import AutoTokenizer

    target = Path(
        shutil.copytree(
            tiny_checkpoint("llava_next"),
            tmp_path / "hub" / "models--llava-hf--llava-v1.6-tiny" / "snapshots" / "0123abc",
        )
    )
    (target / "generation_config.json").unlink(missing_ok=True)
    config = json.loads((target / "config.json").read_text())
    for part in (config, config["text_config"]):
        for key in ("eos_token_id", "pad_token_id", "bos_token_id"):
            part.pop(key, None)
    (target / "config.json").write_text(json.dumps(config))
    perceiver = Path(shutil.copytree(tiny_checkpoint("qwen2_5_vl"), tmp_path / "downloaded-perceiver"))
    config = json.loads((perceiver / "config.json").read_text())
    (perceiver / "config.json").write_text(json.dumps({**config, "_name_or_path": "Qwen/Qwen2.5-VL-3B-Instruct"}))
    ws, out = tmp_path / "ws", tmp_path / "export"
    for argv in (
        ["upgrade", str(target), "--perceiver", str(perceiver), "-o", str(ws), "--no-verify-load"],
        ["export", "-w", str(ws), "-o", str(out), "--no-verify"],
    ):
        result = runner.invoke(app, argv)
        assert result.exit_code == 0, result.stderr[-2000:]
    card = ModelCard.load(out / "README.md")
    assert card.data.base_model == ["llava-hf/llava-v1.6-tiny", "Qwen/Qwen2.5-VL-3B-Instruct"]
    assert card.data.library_name == "transformers" and card.data.pipeline_tag == "image-text-to-text"
    tokenizer = AutoTokenizer.from_pretrained(out)
    generation = json.loads((out / "generation_config.json").read_text())
    stops = generation["eos_token_id"] if isinstance(generation["eos_token_id"], list) else [generation["eos_token_id"]]
    assert tokenizer.convert_tokens_to_ids("<|im_end|>") in stops and generation["pad_token_id"] is not None
    manifest = yaml.safe_load((ws / "dpa.yaml").read_text())
    assert manifest["plan"]["target"]["repo_id"] is None  # named from the folder, not from an id given


def test_the_demo_target_ships_its_stop_tokens(tmp_path):
    from transformers import AutoTokenizer, GenerationConfig

    from dpa_cli.demo.build import build_models

    for folder in build_models(tmp_path):
        generation = GenerationConfig.from_pretrained(folder)
        tokenizer = AutoTokenizer.from_pretrained(folder)
        stops = generation.eos_token_id if isinstance(generation.eos_token_id, list) else [generation.eos_token_id]
        assert tokenizer.convert_tokens_to_ids("<|im_end|>") in stops and generation.pad_token_id is not None
