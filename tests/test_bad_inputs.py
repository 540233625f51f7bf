"""The bad-input catalogue (issue 10): one case per input a user may hand `dpa`, each refused with exit code 2,
an `error:` line naming the file / key / sample (plus at most one hint line), no traceback, and nothing
written: the trees of every input and of the shared workspace hash the same before and after, and no
output folder appears. Dataset problems that `dpa data check` lists (exit 2, a table) are checked through
`--json`: the kind, the sample it names, and that the message names the image.

Every message stem the catalogue meets is listed in docs/troubleshooting.md (last test).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import struct
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from dpa_cli.cli.app import app
from dpa_cli.data.check import PROBLEMS
from tests.factories import copy_checkpoint

runner = CliRunner()
ROOT = Path(__file__).resolve().parent.parent
TROUBLESHOOTING = ROOT / "docs" / "troubleshooting.md"
QUESTION = [{"from": "human", "value": "<image>\nWhat is it?"}, {"from": "gpt", "value": "A square."}]
SMALL = [
    "--set",
    "global_batch_size=2",
    "--set",
    "per_device_train_batch_size=1",
    "--set",
    "save_steps=1000",
    "--set",
    "max_length=512",
    "--set",
    "gradient_checkpointing=false",
    "--max-steps",
    "1",
]


@dataclass
class Env:
    """What a case builds on: the session's tiny checkpoints, a shared workspace (never changed: hashed), a
    folder of images, and the case's own empty folder."""

    tiny: Callable[..., Path]
    workspace: Path
    images: Path
    tmp: Path
    vars: dict[str, str] = field(default_factory=dict)  # environment of the command

    def ckpt(self, name: str, sharded: bool = False) -> Path:
        """A private copy of a tiny checkpoint, to damage."""
        return copy_checkpoint(self.tiny(name, sharded=sharded), self.tmp / f"{name}-copy")

    def data(self, samples: object, name: str = "data.json") -> Path:
        path = self.tmp / name
        path.write_text(json.dumps(samples))
        return path

    def own_workspace(self) -> Path:
        return Path(shutil.copytree(self.workspace, self.tmp / "ws", symlinks=True))


@dataclass(frozen=True)
class Case:
    """`build(env)` makes the input and returns the argv; `needles` must all be in the error (or, for a
    `problem` case, the data check reports kind `problem` at sample `bad`). `stem` is the message as
    docs/troubleshooting.md lists it (default: the first needle)."""

    id: str
    build: Callable[[Env], list[str]]
    needles: tuple[str, ...] = ()
    problem: str | None = None
    code: int = 2
    stem: str | None = None
    sample: str = "bad"  # the sample a `problem` case names

    @property
    def doc_stem(self) -> str:
        return self.stem or self.problem or self.needles[0]


# --- helpers that build bad inputs --------------------------------------------------------------------------
def edit_json(path: Path, change: Callable[[dict], object]) -> None:
    value = json.loads(path.read_text())
    change(value)
    path.write_text(json.dumps(value))


def rewrite_header(path: Path, change: Callable[[dict], None], length_delta: int = 0) -> None:
    """Rewrite a safetensors file's JSON header (the tensor bytes stay as they are)."""
    raw = path.read_bytes()
    (length,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + length])
    change(header)
    encoded = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(encoded) + length_delta) + encoded + raw[8 + length :])


def last_tensor(header: dict) -> str:
    return max((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"][1])


def shift_last(header: dict) -> None:
    """The last tensor's offsets moved 4 bytes on: a gap the header claims and the data do not have."""
    entry = header[last_tensor(header)]
    entry["data_offsets"] = [entry["data_offsets"][0] + 4, entry["data_offsets"][1] + 4]


def grow_first(header: dict) -> None:
    """The first tensor claims 4 bytes more than its dtype and shape need."""
    name = min((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"][0])
    header[name]["data_offsets"][1] += 4


def png_claiming(width: int, height: int) -> bytes:
    """A 60-byte PNG whose header claims `width` x `height` pixels (a decompression bomb, cheaply)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")


def sample(image: object = "red.png", conversations: object = None, sample_id: str = "bad") -> dict:
    record = {"id": sample_id, "conversations": QUESTION if conversations is None else conversations}
    if image is not None:
        record["image"] = image
    return record


def clean() -> dict:
    return sample(sample_id="good")


def upgrade(env: Env, target: Path | str, perceiver: Path | str, *extra: str) -> list[str]:
    return ["upgrade", str(target), "--perceiver", str(perceiver), "-o", str(env.tmp / "out"), *extra]


def upgrade_target(env: Env, damage: Callable[[Path], None], name: str = "llava", sharded: bool = False) -> list[str]:
    target = env.ckpt(name, sharded=sharded)
    damage(target)
    return upgrade(env, target, env.tiny("qwen2_5_vl"))


def only_shard(folder: Path) -> Path:
    return next(folder.glob("*.safetensors"))


def check(env: Env, data: Path, *extra: str, root: Path | None = None) -> list[str]:
    return ["data", "check", str(data), "--image-root", str(root or env.images), "-w", str(env.workspace), *extra]


def check_samples(env: Env, *samples: dict, root: Path | None = None) -> list[str]:
    return check(env, env.data([clean(), *samples]), "--max-length", "256", root=root)


def train(
    env: Env, data: Path, *extra: str, workspace: Path | None = None, stage: str = "1", root: Path | None = None
) -> list[str]:
    return [
        "train",
        "--stage",
        stage,
        "-w",
        str(workspace or env.workspace),
        "--data",
        str(data),
        "--image-root",
        str(root or env.images),
        *SMALL,
        *extra,
    ]


def train_clean(env: Env, *extra: str, **kw) -> list[str]:
    return train(env, env.data([clean(), clean() | {"id": "good2"}]), *extra, **kw)


def export(env: Env, workspace: Path, *extra: str) -> list[str]:
    return ["export", "-w", str(workspace), "-o", str(env.tmp / "export"), "--no-verify", *extra]


# --- checkpoints ---------------------------------------------------------------------------------------------
def _no_config(env: Env) -> list[str]:
    return upgrade_target(env, lambda f: (f / "config.json").unlink())


def _config_not_json(env: Env) -> list[str]:
    return upgrade_target(env, lambda f: (f / "config.json").write_text('{"model_type": "llava",'))


def _unknown_model_type(env: Env) -> list[str]:
    return upgrade_target(env, lambda f: edit_json(f / "config.json", lambda c: c.update(model_type="llava_xl")))


def _shape_disagreement(env: Env) -> list[str]:
    return upgrade_target(
        env,
        lambda f: edit_json(
            f / "config.json",
            lambda c: c["text_config"].update(intermediate_size=c["text_config"]["intermediate_size"] + 8),
        ),
    )


def _header_gap(env: Env) -> list[str]:
    return upgrade_target(env, lambda f: rewrite_header(only_shard(f), shift_last))


def _header_span(env: Env) -> list[str]:
    return upgrade_target(env, lambda f: rewrite_header(only_shard(f), grow_first))


def _header_length(env: Env) -> list[str]:
    return upgrade_target(env, lambda f: rewrite_header(only_shard(f), lambda h: None, length_delta=1 << 40))


def _truncated_weights(env: Env) -> list[str]:
    def cut(folder: Path) -> None:
        shard = only_shard(folder)
        shard.write_bytes(shard.read_bytes()[:-100])

    return upgrade_target(env, cut)


def _shard_absent(env: Env) -> list[str]:
    return upgrade_target(env, lambda f: sorted(f.glob("model-*.safetensors"))[-1].unlink(), sharded=True)


def _duplicate_keys(env: Env) -> list[str]:
    def duplicate(folder: Path) -> None:
        first, second = sorted(folder.glob("model-*.safetensors"))[:2]
        tensors = load_file(second)
        name, tensor = next(iter(load_file(first).items()))
        save_file({**tensors, name: tensor.clone()}, second, metadata={"format": "pt"})

    return upgrade_target(env, duplicate, sharded=True)


def _only_pickled(env: Env) -> list[str]:
    def pickle(folder: Path) -> None:
        shard = only_shard(folder)
        torch.save(load_file(shard), folder / "pytorch_model.bin")
        shard.unlink()

    return upgrade_target(env, pickle)


def _no_language_blocks(env: Env) -> list[str]:
    perceiver = env.ckpt("qwen2_5_vl")
    edit_json(perceiver / "config.json", lambda c: c["text_config"].update(num_hidden_layers=0, layer_types=[]))
    return upgrade(env, env.tiny("llava"), perceiver)


def _perceiver_without_image_token(env: Env) -> list[str]:
    perceiver = env.ckpt("qwen2_5_vl")
    edit_json(perceiver / "config.json", lambda c: c.pop("image_token_id"))
    return upgrade(env, env.tiny("llava"), perceiver)


def _image_token_beyond_tokenizer(env: Env) -> list[str]:
    return upgrade_target(env, lambda f: edit_json(f / "config.json", lambda c: c.update(image_token_index=10**6)))


def _config_vocab_over_weights(env: Env) -> list[str]:
    def bigger_vocab(folder: Path) -> None:
        edit_json(
            folder / "config.json", lambda c: c["text_config"].update(vocab_size=c["text_config"]["vocab_size"] + 64)
        )

    return upgrade_target(env, bigger_vocab)


def _tokenizer_over_vocab(env: Env) -> list[str]:
    def bigger_tokenizer(folder: Path) -> None:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(folder)
        tokenizer.add_tokens([f"<extra_{i}>" for i in range(64)])
        tokenizer.save_pretrained(folder)

    return upgrade_target(env, bigger_tokenizer)


def _tokenizer_missing(env: Env) -> list[str]:
    def drop(folder: Path) -> None:
        for name in ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt"):
            (folder / name).unlink(missing_ok=True)

    return upgrade_target(env, drop)


def _no_such_target(env: Env) -> list[str]:
    return upgrade(env, env.tmp / "nowhere", env.tiny("qwen2_5_vl"))


def _inspect_lying_header(env: Env) -> list[str]:
    target = env.ckpt("llava")
    rewrite_header(only_shard(target), shift_last)
    return ["inspect", str(target)]


# --- data: `dpa data check` problem kinds, one sample each -------------------------------------------------
def _problem(record: Callable[[Env], dict], root: Callable[[Env], Path] | None = None) -> Callable[[Env], list[str]]:
    return lambda env: check_samples(env, record(env), root=root(env) if root else None)


def _long(env: Env) -> dict:
    """Over max_length with the image's slots beyond it: training cannot cut it (a long answer would be cut)."""
    words = " ".join(["The quick brown fox."] * 120)
    return sample(conversations=[{"from": "human", "value": f"{words}\n<image>\nWhat is it?"}, QUESTION[1]])


def _root(env: Env) -> Path:
    """The case's own image root, holding red.png (the clean sample's image)."""
    root = env.tmp / "root"
    root.mkdir(exist_ok=True)
    shutil.copy2(env.images / "red.png", root / "red.png")
    return root


def _outside_root(env: Env) -> Path:
    """An image root whose `escape.png` is a symlink to a file outside it, and `sub` a symlink to a folder."""
    root = _root(env)
    os.symlink(env.images.parent / "outside.png", root / "escape.png")
    os.symlink(env.images.parent, root / "sub")
    return root


def _bomb(env: Env) -> dict:
    (_root(env) / "bomb.png").write_bytes(png_claiming(20_000, 20_000))
    return sample("bomb.png")


def _processor_refuses(env: Env) -> dict:
    Image.new("RGB", (3000, 10), (10, 200, 10)).save(_root(env) / "sliver.png")  # aspect ratio 300:1
    return sample("sliver.png")


# --- data files ----------------------------------------------------------------------------------------------
def _empty_data(env: Env) -> list[str]:
    (env.tmp / "data.json").write_bytes(b"")
    return check(env, env.tmp / "data.json")


def _latin1_data(env: Env) -> list[str]:
    text = json.dumps(
        [sample(conversations=[QUESTION[0], {"from": "gpt", "value": "Un carré rouge."}])], ensure_ascii=False
    )
    (env.tmp / "data.json").write_bytes(text.encode("latin-1"))
    return check(env, env.tmp / "data.json")


def _utf16_data(env: Env) -> list[str]:
    (env.tmp / "data.json").write_bytes(json.dumps([clean()]).encode("utf-16"))
    return check(env, env.tmp / "data.json")


def _dict_data(env: Env) -> list[str]:
    return check(env, env.data({"version": 1, "samples": [clean()]}))


def _broken_json(env: Env) -> list[str]:
    (env.tmp / "data.json").write_text(json.dumps([clean(), clean()])[:-20])
    return check(env, env.tmp / "data.json")


def _no_samples(env: Env) -> list[str]:
    return check(env, env.data([]))


def _no_data_file(env: Env) -> list[str]:
    return check(env, env.tmp / "missing.json")


def _image_root_not_folder(env: Env) -> list[str]:
    return check(env, env.data([clean()]), root=env.tmp / "data.json")


# --- train: bad data, flags and recipes ----------------------------------------------------------------------
def _train_bad(record: dict) -> Callable[[Env], list[str]]:
    return lambda env: train(env, env.data([clean(), record]))


def _train_latin1(env: Env) -> list[str]:
    (env.tmp / "data.json").write_bytes(json.dumps([clean()]).replace("square", "carré").encode("latin-1"))
    assert b"\xe9" in (env.tmp / "data.json").read_bytes()
    return train(env, env.tmp / "data.json")


def _train_truncated_image(env: Env) -> list[str]:
    return train(env, env.data([sample("truncated.jpg"), sample("truncated.jpg", sample_id="bad2")]))


def _train_truncated_second(env: Env) -> list[str]:
    """The first sample is clean (it is the one shown), the second is met only in the first batch."""
    return train(env, env.data([clean(), sample("truncated.jpg")]))


def _restart_with_bad_flag(env: Env) -> list[str]:
    """--restart must not clear the finished stage 1 when the run is then refused."""
    ws = env.own_workspace()
    shutil.copytree(ws / "model", ws / "stage1" / "model")
    edit_json_yaml(ws, lambda m: m.setdefault("stages", {}).update(stage1={"steps": 3, "lora": False}))
    return train_clean(
        env, "--restart", "--set", "global_batch_size=3", "--set", "per_device_train_batch_size=2", workspace=ws
    )


def _broken_catalog(env: Env) -> list[str]:
    (env.tmp / "catalog.yaml").write_text("targets:\n  mine: {source: [unclosed\n")
    env.vars["DPA_CATALOG"] = str(env.tmp / "catalog.yaml")
    return ["catalog"]


def _bad_deepspeed(env: Env) -> list[str]:
    (env.tmp / "ds.json").write_text('{"zero_optimization": {"stage": 3,}')
    return train_clean(env, "--deepspeed", str(env.tmp / "ds.json"))


def _deepspeed_list(env: Env) -> list[str]:
    (env.tmp / "ds.json").write_text("[1, 2]")
    return train_clean(env, "--deepspeed", str(env.tmp / "ds.json"))


def _bad_recipe_yaml(env: Env) -> list[str]:
    (env.tmp / "recipe.yaml").write_text("stage: 1\ntrainable: {phi: full\n")
    return train_clean(env, "--recipe", str(env.tmp / "recipe.yaml"))


def _recipe_without_parts(env: Env) -> list[str]:
    (env.tmp / "recipe.yaml").write_text("stage: 1\ntrainable: {phi: full}\nlearning_rate: 1.0e-3\n")
    return train_clean(env, "--recipe", str(env.tmp / "recipe.yaml"))


# --- workspaces ----------------------------------------------------------------------------------------------
def _nonsense_manifest(env: Env) -> list[str]:
    ws = env.own_workspace()
    (ws / "dpa.yaml").write_text("- this\n- is: [not, a, manifest]\n")
    return train_clean(env, workspace=ws)


def _manifest_not_yaml(env: Env) -> list[str]:
    ws = env.own_workspace()
    (ws / "dpa.yaml").write_text("dpa_workspace: 1\nplan: {target: [\n")
    return export(env, ws)


def _stage_deleted_train(env: Env) -> list[str]:
    ws = env.own_workspace()
    (ws / "stage1").mkdir()
    edit_json_yaml(ws, lambda m: m.setdefault("stages", {}).update(stage1={"steps": 3, "lora": False}))
    return train_clean(env, workspace=ws, stage="2")


def _stage_deleted_export(env: Env) -> list[str]:
    ws = env.own_workspace()
    edit_json_yaml(ws, lambda m: m.setdefault("stages", {}).update(stage1={"steps": 3, "lora": False}))
    return export(env, ws, "--stage", "1")


def _lora_adapter_deleted(env: Env) -> list[str]:
    ws = env.own_workspace()
    shutil.copytree(ws / "model", ws / "stage2" / "model")
    edit_json_yaml(ws, lambda m: m.setdefault("stages", {}).update(stage2={"steps": 3, "lora": True}))
    return export(env, ws)


def _model_swapped_train(env: Env) -> list[str]:
    ws = env.own_workspace()
    shutil.rmtree(ws / "model")
    shutil.copytree(env.tiny("llava_next"), ws / "model")
    return train_clean(env, workspace=ws)


def _model_swapped_export(env: Env) -> list[str]:
    ws = env.own_workspace()
    shutil.rmtree(ws / "model")
    shutil.copytree(env.tiny("llava_next"), ws / "model")
    return export(env, ws)


def _model_deleted(env: Env) -> list[str]:
    ws = env.own_workspace()
    shutil.rmtree(ws / "model")
    return train_clean(env, workspace=ws)


def _not_a_workspace(env: Env) -> list[str]:
    (env.tmp / "plain").mkdir()
    return train_clean(env, workspace=env.tmp / "plain")


def _export_exists(env: Env) -> list[str]:
    (env.tmp / "export").mkdir()
    (env.tmp / "export" / "mine.txt").write_text("keep me")
    return ["export", "-w", str(env.workspace), "-o", str(env.tmp / "export"), "--no-verify"]


def edit_json_yaml(ws: Path, change: Callable[[dict], None]) -> None:
    import yaml

    manifest = yaml.safe_load((ws / "dpa.yaml").read_text())
    change(manifest)
    (ws / "dpa.yaml").write_text(yaml.safe_dump(manifest, sort_keys=False))


CASES = [
    # checkpoints
    Case("ckpt-missing-config", _no_config, ("no config.json",)),
    Case("ckpt-config-not-json", _config_not_json, ("config.json: not valid JSON",)),
    Case(
        "ckpt-unknown-model-type",
        _unknown_model_type,
        ("'llava_xl'", "is not a supported family"),
        stem="is not a supported family",
    ),
    Case(
        "ckpt-config-weights-shape",
        _shape_disagreement,
        ("has shape", "but the DPA model needs"),
        stem="but the DPA model needs",
    ),
    Case("ckpt-header-offsets-gap", _header_gap, ("unused bytes before tensor",)),
    Case("ckpt-header-offsets-span", _header_span, ("spans", "bytes but", "needs"), stem="bytes but"),
    Case("ckpt-header-length", _header_length, ("header length", "is impossible"), stem="is impossible for a"),
    Case(
        "ckpt-truncated-weights",
        _truncated_weights,
        ("truncated:", "bytes on disk, the header declares"),
        stem="bytes on disk, the header declares",
    ),
    Case("ckpt-index-shard-absent", _shard_absent, ("weight file is missing",)),
    Case("ckpt-duplicate-keys", _duplicate_keys, ("is also stored in",)),
    Case("ckpt-only-pickled", _only_pickled, ("only pickled weights", "pytorch_model.bin")),
    Case("ckpt-perceiver-no-language-blocks", _no_language_blocks, ("the perceiver has no language blocks",)),
    Case(
        "ckpt-perceiver-no-image-token",
        _perceiver_without_image_token,
        ("config.json: names no image token id",),
        stem="names no image token id",
    ),
    Case(
        "ckpt-image-token-beyond-tokenizer",
        _image_token_beyond_tokenizer,
        ("names image token id 1000000",),
        stem="names image token id",
    ),
    Case("ckpt-config-vocab-over-weights", _config_vocab_over_weights, ("rows, but config.json says vocab_size",)),
    Case(
        "ckpt-tokenizer-over-vocab",
        _tokenizer_over_vocab,
        ("its tokenizer has", "but config.json vocab_size is"),
        stem="but config.json vocab_size is",
    ),
    Case("ckpt-tokenizer-missing", _tokenizer_missing, ("cannot load its tokenizer",)),
    Case("ckpt-no-such-folder", _no_such_target, ("no such folder",)),
    Case("inspect-lying-header", _inspect_lying_header, ("unused bytes before tensor",)),
    # data check: every problem kind (exit 2 for errors), at the named sample
    Case("data-missing-image", _problem(lambda e: sample("nowhere.png")), problem="missing_image"),
    Case("data-unreadable-image", _problem(lambda e: sample("notes.png")), problem="unreadable_image"),
    Case("data-zero-byte-image", _problem(lambda e: sample("empty.png")), problem="unreadable_image"),
    Case("data-truncated-image", _problem(lambda e: sample("truncated.jpg")), problem="truncated_image"),
    Case("data-100-megapixels", _problem(lambda e: sample("huge.png")), problem="image_too_large"),
    Case("data-bomb-header", _problem(_bomb, _root), problem="image_too_large"),
    Case("data-path-dotdot", _problem(lambda e: sample("../outside.png")), problem="unsafe_image_path"),
    Case("data-path-absolute", _problem(lambda e: sample(str(e.images / "red.png"))), problem="unsafe_image_path"),
    Case("data-symlink-file-out", _problem(lambda e: sample("escape.png"), _outside_root), problem="unsafe_image_path"),
    Case(
        "data-symlink-folder-out",
        _problem(lambda e: sample("sub/outside.png"), _outside_root),
        problem="unsafe_image_path",
    ),
    Case("data-marker-mismatch", _problem(lambda e: sample(["red.png", "green.jpg"])), problem="marker_mismatch"),
    Case(
        "data-image-in-assistant",
        _problem(
            lambda e: sample(
                conversations=[{"from": "human", "value": "Describe."}, {"from": "gpt", "value": "<image>\nThis."}]
            )
        ),
        problem="image_in_assistant",
    ),
    Case("data-empty-conversation", _problem(lambda e: sample(conversations=[])), problem="empty_conversation"),
    Case(
        "data-no-assistant",
        _problem(lambda e: sample(None, [{"from": "human", "value": "Hi?"}])),
        problem="no_assistant",
    ),
    Case("data-too-long", _problem(_long), problem="too_long"),
    Case(
        "data-duplicate-id",
        _problem(lambda e: sample("green.jpg", sample_id="good")),
        problem="duplicate_id",
        sample="good",
    ),
    Case(
        "data-bad-record", _problem(lambda e: sample(None, [{"speaker": "human", "text": "hi"}])), problem="bad_record"
    ),
    Case("data-processor-refuses", _problem(_processor_refuses, _root), problem="processor_error"),
    # data files
    Case("data-zero-byte-file", _empty_data, ("the file is empty (0 bytes)",)),
    Case("data-not-utf8", _latin1_data, ("not UTF-8 text", "offset"), stem="not UTF-8 text"),
    Case("data-utf16", _utf16_data, ("UTF-16 text, not UTF-8",)),
    Case(
        "data-dict-not-list",
        _dict_data,
        ("the top level is a JSON object", "'samples'"),
        stem="the top level is a JSON object",
    ),
    Case("data-broken-json", _broken_json, ("not valid JSON",)),
    Case("data-no-samples", _no_samples, ("no samples",)),
    Case("data-file-missing", _no_data_file, ("no such file or folder",)),
    Case("data-image-root-not-folder", _image_root_not_folder, ("--image-root", "not a folder"), stem="not a folder"),
    # train: data
    Case(
        "train-missing-image",
        _train_bad(sample("nowhere.png")),
        ("sample bad", "no such file", "dpa data check"),
        stem="Bad samples:",
    ),
    Case(
        "train-path-escapes-root",
        _train_bad(sample("../outside.png")),
        ("sample bad", "leaves the image root"),
        stem="leaves the image root",
    ),
    Case("train-truncated-image", _train_truncated_image, ("sample bad", "truncated"), stem="truncated ("),
    Case("train-truncated-mid-run", _train_truncated_second, ("sample bad", "truncated"), stem="truncated ("),
    Case(
        "train-restart-refused-keeps-stage",
        _restart_with_bad_flag,
        ("global batch 3 is not a multiple",),
        stem="is not a multiple of per-device batch",
    ),
    Case(
        "catalog-not-yaml",
        _broken_catalog,
        ("catalog.yaml: cannot read the catalog (line 3",),
        stem="cannot read the catalog",
    ),
    Case("train-not-utf8", _train_latin1, ("not UTF-8 text",)),
    Case(
        "train-dict-not-list",
        lambda env: train(env, env.data({"data": [clean()]})),
        ("the top level is a JSON object",),
    ),
    # train: flags and recipes
    Case(
        "train-unknown-set-key",
        lambda env: train_clean(env, "--set", "learning_rat=1e-3"),
        ("unknown recipe key 'learning_rat'", "learning_rate"),
        stem="unknown recipe key",
    ),
    Case(
        "train-negative-lr",
        lambda env: train_clean(env, "--set", "learning_rate=-1e-4"),
        ("learning_rate=-0.0001", "must be positive"),
        stem="must be positive",
    ),
    Case(
        "train-batch-not-divisible",
        lambda env: train_clean(env, "--set", "global_batch_size=5", "--set", "per_device_train_batch_size=2"),
        ("global batch 5 is not a multiple",),
        stem="is not a multiple of per-device batch",
    ),
    Case(
        "train-stage-3",
        lambda env: train_clean(env, stage="3"),
        ("--stage 3", "stages 1 and 2"),
        stem="the recipe has stages 1 and 2",
    ),
    Case(
        "train-deepspeed-not-json", _bad_deepspeed, ("--deepspeed", "ds.json", "not valid JSON"), stem="not valid JSON"
    ),
    Case("train-deepspeed-not-object", _deepspeed_list, ("a DeepSpeed config is a JSON object",)),
    Case(
        "train-deepspeed-missing",
        lambda env: train_clean(env, "--deepspeed", "zero4"),
        ("--deepspeed zero4: no such file",),
        stem="no such file",
    ),
    Case("train-recipe-not-yaml", _bad_recipe_yaml, ("recipe.yaml", "not valid YAML"), stem="not valid YAML"),
    Case("train-recipe-missing-parts", _recipe_without_parts, ("does not say how to train",)),
    Case(
        "train-no-such-recipe",
        lambda env: train_clean(env, "--recipe", "stage9"),
        ("no recipe 'stage9'",),
        stem="no recipe",
    ),
    Case("train-set-not-key-value", lambda env: train_clean(env, "--set", "learning_rate"), ("is not key=value",)),
    Case(
        "train-set-managed-key",
        lambda env: train_clean(env, "--set", "output_dir=/tmp/x"),
        ("'output_dir' is set by dpa itself",),
        stem="is set by dpa itself",
    ),
    Case(
        "train-bad-trainable-mode",
        lambda env: train_clean(env, "--set", "trainable.vit=half"),
        ("trainable.vit='half'", "is not one of frozen, full, lora"),
        stem="is not one of frozen, full, lora",
    ),
    Case("train-lora-and-full", lambda env: train_clean(env, "--lora", "--full"), ("contradict each other",)),
    Case(
        "upgrade-bad-projector",
        lambda env: upgrade(env, env.tiny("llava"), env.tiny("qwen2_5_vl"), "--projector", "mlp9x"),
        ("--projector 'mlp9x' is not one of",),
        stem="is not one of",
    ),
    Case(
        "upgrade-bad-shard-size",
        lambda env: upgrade(env, env.tiny("llava"), env.tiny("qwen2_5_vl"), "--shard-size", "lots"),
        ("bad size 'lots'",),
        stem="bad size",
    ),
    Case(
        "export-bad-dtype",
        lambda env: export(env, env.workspace, "--dtype", "fp8"),
        ("--dtype 'fp8' is not one of",),
        stem="is not one of",
    ),
    # workspaces
    Case(
        "ws-manifest-nonsense",
        _nonsense_manifest,
        ("dpa.yaml", "not a dpa workspace manifest"),
        stem="not a dpa workspace manifest",
    ),
    Case(
        "ws-manifest-not-yaml",
        _manifest_not_yaml,
        ("dpa.yaml: cannot read it (not valid YAML, line 3",),
        stem="cannot read it (not valid YAML",
    ),
    Case("ws-stage-folder-deleted-train", _stage_deleted_train, ("stage 1 has not been run",)),
    Case(
        "ws-stage-folder-deleted-export",
        _stage_deleted_export,
        ("stage 1 has not finished",),
        stem="has not finished in",
    ),
    Case(
        "ws-lora-adapter-deleted",
        _lora_adapter_deleted,
        ("was trained with LoRA but", "adapter_config.json is missing"),
        stem="was trained with LoRA but",
    ),
    Case("ws-model-swapped-train", _model_swapped_train, ("not the DPA model",)),
    Case("ws-model-swapped-export", _model_swapped_export, ("not the DPA model",)),
    Case("ws-model-deleted", _model_deleted, ("is not a model folder (no config.json)",)),
    Case("ws-not-a-workspace", _not_a_workspace, ("is not a dpa workspace",)),
    Case("export-output-exists", _export_exists, ("already exists",)),
]


# --- the run -------------------------------------------------------------------------------------------------
def tree_hash(*folders: Path) -> dict[str, str]:
    """Relative path -> sha256 (or link target, or "dir") of everything under the folders."""
    found: dict[str, str] = {}
    for folder in folders:
        for path in sorted(folder.rglob("*")):
            key = f"{folder.name}/{path.relative_to(folder)}"
            if path.is_symlink():
                found[key] = "link:" + os.readlink(path)
            elif path.is_dir():
                found[key] = "dir"
            else:
                found[key] = hashlib.sha256(path.read_bytes()).hexdigest()
    return found


@pytest.fixture(scope="module")
def shared(tiny_checkpoint, dpa_workspace, data_files, tmp_path_factory) -> Env:
    """The workspace every case may read (a private copy of the session's, hashed around each case)."""
    workspace = Path(shutil.copytree(dpa_workspace("next_qwen"), tmp_path_factory.mktemp("bad") / "ws"))
    return Env(tiny_checkpoint, workspace, data_files / "images", Path())


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input_is_refused_clearly_and_writes_nothing(shared, tmp_path, case):
    env = Env(shared.tiny, shared.workspace, shared.images, tmp_path)
    argv = case.build(env)
    json_flag = ["--json"] if case.problem else []
    before = tree_hash(tmp_path, shared.workspace, shared.images.parent)
    result = runner.invoke(app, [*argv, *json_flag], env=env.vars)
    stderr = result.stderr
    assert "Traceback" not in stderr, stderr
    assert result.exception is None or isinstance(result.exception, SystemExit), (stderr, result.exception)
    assert result.exit_code == case.code, (result.exit_code, stderr, result.stdout[-2000:])
    assert tree_hash(tmp_path, shared.workspace, shared.images.parent) == before, "an input or output changed"
    for output in ("out", "export"):  # written by no case (export-output-exists made its own beforehand)
        assert (tmp_path / output).exists() == (f"{tmp_path.name}/{output}" in before), output
    if case.problem:
        found = {p["kind"]: p for p in json.loads(result.stdout)["problems"]}
        assert case.problem in found and PROBLEMS[case.problem][0] == "error", found
        assert found[case.problem]["examples"] == [case.sample], found[case.problem]
        return
    lines = stderr.strip().splitlines()
    assert lines and lines[0].startswith("error:") and len(lines) <= 2, stderr
    for needle in case.needles:
        assert needle in stderr, (needle, stderr)


def test_every_message_of_the_catalogue_is_in_troubleshooting():
    text = TROUBLESHOOTING.read_text()
    missing = [case.id for case in CASES if case.doc_stem not in text]
    assert not missing, f"docs/troubleshooting.md lacks the messages of {missing}"
    assert len(CASES) >= 30


def test_a_target_without_an_image_token_gets_one_chosen_not_refused(tiny_checkpoint, tmp_path):
    """Not a bad input: a target whose config names no image token (a text LM, or a VLM config without
    `image_token_index`) gets a placeholder its tokenizer already has, or an added one, said in the plan."""
    target = copy_checkpoint(tiny_checkpoint("llava"), tmp_path / "target")
    edit_json(target / "config.json", lambda c: c.pop("image_token_index"))
    result = runner.invoke(
        app,
        [
            "upgrade",
            str(target),
            "--perceiver",
            str(tiny_checkpoint("qwen2_5_vl")),
            "-o",
            str(tmp_path / "out"),
            "--dry-run",
            "--json",
        ],
    )
    assert result.exit_code == 0, result.stderr
    assert '"<image>"' in result.stdout and not (tmp_path / "out").exists()
