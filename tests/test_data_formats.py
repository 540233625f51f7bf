"""Reading data: LLaVA JSON / JSONL and Hugging Face datasets into one Sample shape, lazily; bad files refused
with one clear line; images read safely (root kept, bombs refused, odd modes converted and said so)."""

from __future__ import annotations

import json

import pytest
from PIL import Image

from dpa_cli.data import ImageRef, dataset_fingerprint, open_samples
from dpa_cli.data.images import ImageError, load_image, probe_image
from dpa_cli.data.samples import structural_problems, text_blocks
from dpa_cli.errors import BadInputError

IMAGE, TEXT = {"type": "image"}, lambda t: {"type": "text", "text": t}  # noqa: E731


def summary(source) -> list[tuple]:
    return [(s.id, [r.path for r in s.images], s.messages) for s in source]


def test_llava_json_becomes_chat_messages_with_image_blocks_in_reading_order(data_files):
    source = open_samples(data_files / "clean.json", data_files / "images")
    assert len(source) == 4 and not source.streaming
    multi = source[1]
    assert multi.id == "multi-turn" and [r.path for r in multi.images] == ["red.png", "green.jpg", "sub/blue.png"]
    assert multi.messages[0] == {"role": "user", "content": [IMAGE, IMAGE, TEXT("Compare the two.")]}
    assert multi.messages[1] == {"role": "assistant", "content": [TEXT("Red and green.")]}
    assert multi.messages[2] == {"role": "user", "content": [TEXT("And this one?"), IMAGE]}
    assert source[2].images == [] and source[3].messages[0]["role"] == "system"
    assert all(structural_problems(sample) == [] for sample in source)
    assert source[-1].id == "with-system"


def test_jsonl_and_streaming_give_the_same_samples(data_files):
    images = data_files / "images"
    expected = summary(open_samples(data_files / "clean.json", images))
    jsonl = open_samples(data_files / "clean.jsonl", images)
    assert len(jsonl) == 4 and jsonl[3].id == "with-system" and jsonl[-1].id == "with-system"
    assert summary(jsonl) == expected
    for name in ("clean.json", "clean.jsonl"):
        streamed = open_samples(data_files / name, images, streaming=True)
        assert streamed.streaming and not hasattr(streamed, "__len__")
        assert summary(streamed) == expected


@pytest.mark.parametrize("name", ["chat", "chat.parquet/train.parquet"])
def test_hugging_face_datasets_keep_images_as_bytes_until_loaded(data_files, name):
    source = open_samples(data_files / name)
    assert len(source) == 3
    first, text_only, two = source[0], source[1], source[2]
    assert first.id == "chat-image" and first.images[0].data == (data_files / "images" / "red.png").read_bytes()
    assert first.messages == [
        {"role": "user", "content": [IMAGE, TEXT("What is in the picture?")]},
        {"role": "assistant", "content": [TEXT("A red square.")]},
    ]
    assert text_only.images == [] and len(two.images) == 2 and len(two.messages) == 4
    assert load_image(first.images[0])[0].size == (60, 40)
    streamed = open_samples(data_files / name, streaming=True)
    assert [(s.id, s.messages) for s in streamed] == [(s.id, s.messages) for s in source]


def test_json_lists_stream_across_chunk_boundaries(tmp_path):
    from dpa_cli.data.formats import _iter_json_list

    values = [{"id": "a", "n": 12345}, 678, "a string, with [brackets]", [1, 2], {"x": "é"}, 3.5, True]
    path = tmp_path / "d.json"
    path.write_text(" \n" + json.dumps(values, indent=2, ensure_ascii=False) + "\n")
    for chunk in (1, 3, 7, 1 << 20):
        assert list(_iter_json_list(path, chunk_size=chunk)) == values
    path.write_text('[{"id": "a"}, {"id": ')
    with pytest.raises(BadInputError, match="not valid JSON"):
        list(_iter_json_list(path, chunk_size=4))


def test_text_blocks_split_llava_markers_and_their_newlines():
    assert text_blocks("<image>\nWhat?") == [IMAGE, TEXT("What?")]
    assert text_blocks("Look:\n<image>\nand\n<image>") == [TEXT("Look:"), IMAGE, TEXT("and"), IMAGE]
    assert text_blocks("No image.") == [TEXT("No image.")]


@pytest.mark.parametrize(
    "content, message",
    [
        (b"", "empty (0 bytes)"),
        (b"  \n ", "only whitespace"),
        ('[{"id": "caf\xe9"}]'.encode("latin-1"), "not UTF-8 text (byte 0xe9"),
        (json.dumps({"data": [{"id": "a"}], "version": 1}, indent=2).encode(), "top level is a JSON object"),
        (json.dumps({"data": [{"id": "a"}]}).encode(), "top level is a JSON object"),
        (b'[{"id": "a",', "not valid JSON"),
        (b"[]", "no samples"),
        (b"id,image\n1,a.png\n", "not LLaVA JSON"),
    ],
)
def test_files_that_are_not_data_are_refused_by_name(tmp_path, content, message):
    path = tmp_path / "data.json"
    path.write_bytes(content)
    with pytest.raises(BadInputError, match=str(path)) as caught:
        open_samples(path)
    assert message in caught.value.message
    if b'"version"' in content:
        assert "'data'" in caught.value.hint


def test_one_pretty_printed_sample_and_bad_jsonl_lines(tmp_path):
    one = tmp_path / "one.json"
    turns = [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Yo"}]
    one.write_text(json.dumps({"id": "a", "conversations": turns}, indent=2))
    assert [s.id for s in open_samples(one)] == ["a"]
    lines = tmp_path / "data.jsonl"
    lines.write_bytes(b'{"id": "a", "conversations": []}\n{not json\n\n\xff\n')
    source = open_samples(lines)
    assert len(source) == 3
    assert source[1].problems[0][0] == "bad_record" and "line 2" in source[1].problems[0][1]
    assert source[2].problems[0][0] == "bad_record" and "not UTF-8" in source[2].problems[0][1]


def test_missing_data_and_image_root(tmp_path):
    with pytest.raises(BadInputError, match="no such file"):
        open_samples(tmp_path / "nope.json")
    (tmp_path / "d.json").write_text("[]")
    with pytest.raises(BadInputError, match="not a folder"):
        open_samples(tmp_path / "d.json", image_root=tmp_path / "nope")


def test_fingerprint_is_the_sha256_of_the_data(tmp_path, data_files):
    import hashlib

    path = tmp_path / "d.json"
    path.write_text("[1]")
    assert dataset_fingerprint(path) == hashlib.sha256(b"[1]").hexdigest()
    before = dataset_fingerprint(data_files / "chat")
    assert before == dataset_fingerprint(data_files / "chat") and len(before) == 64
    path.write_text("[2]")
    assert dataset_fingerprint(path) == hashlib.sha256(b"[2]").hexdigest()


# --- images -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "name, kind",
    [
        ("nowhere.png", "missing_image"),
        ("notes.png", "unreadable_image"),
        ("empty.png", "unreadable_image"),
        ("huge.png", "image_too_large"),
        ("../outside.png", "unsafe_image_path"),
        ("/etc/hostname", "unsafe_image_path"),
        ("link.png", "unsafe_image_path"),
        ("sub/../red.png", "unsafe_image_path"),
    ],
)
def test_bad_images_are_named_by_kind_from_the_header_alone(data_files, name, kind):
    ref = ImageRef(path=name, root=data_files / "images")
    for read in (probe_image, load_image):
        with pytest.raises(ImageError) as caught:
            read(ref)
        assert caught.value.kind == kind and name in caught.value.message


def test_truncation_is_caught_when_decoding(data_files):
    ref = ImageRef(path="truncated.jpg", root=data_files / "images")
    assert probe_image(ref)[0] == (64, 64)  # the header is intact
    with pytest.raises(ImageError) as caught:
        load_image(ref)
    assert caught.value.kind == "truncated_image"


@pytest.mark.parametrize(
    "name, kind, pixel",
    [
        ("cmyk.jpg", "converted_cmyk", None),
        ("alpha.png", "converted_alpha", (227, 142, 142)),  # half-transparent red over white
        ("gray.png", "converted_grayscale", (128, 128, 128)),
        ("deep.png", "converted_16bit", (155, 155, 155)),  # 40000 / 257, not clipped to 255
        ("sub/blue.png", None, (30, 30, 200)),
    ],
)
def test_unusual_modes_become_rgb_and_are_reported(data_files, name, kind, pixel):
    ref = ImageRef(path=name, root=data_files / "images")
    image, warnings = load_image(ref)
    assert image.mode == "RGB"
    assert [w[0] for w in warnings] == ([kind] if kind else [])
    assert [w[0] for w in probe_image(ref)[1]] == ([kind] if kind else [])
    if pixel:
        assert all(abs(a - b) <= 1 for a, b in zip(image.getpixel((0, 0)), pixel))


def test_embedded_and_decoded_images(data_files):
    data = (data_files / "images" / "green.jpg").read_bytes()
    assert load_image(ImageRef(data=data))[0].size == (90, 50)
    assert load_image(ImageRef(image=Image.new("L", (5, 6))))[0].mode == "RGB"
    with pytest.raises(ImageError) as caught:
        load_image(ImageRef(data=b"junk"))
    assert caught.value.kind == "unreadable_image"
