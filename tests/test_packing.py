"""Packing (issue 18): first-fit-decreasing rows, packed batches equal to unpacked ones (loss within 1e-5,
gradients within 1e-4, CPU fp32) for a LLaVA-NeXT target and a Qwen-VL-style target, the perceiver's one call
per batch equal to one call per image, `dpa train --pack`, and the recipe key `pack` through the recipe gate.
"""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from dpa_cli import loading
from dpa_cli.cli.app import app
from dpa_cli.data import DPACollator, EncodedDataset, SampleEncoder, open_samples
from dpa_cli.data.packing import PACKED, PackingCollator, model_inputs, pack_dataset, pack_lengths, uses_mrope
from dpa_cli.errors import BadInputError
from dpa_cli.train.recipe import RECIPES, load_recipe
from tests.fixtures.data import clean_samples
from tests.test_bad_inputs import Env
from tests.test_gate_recipe import _recipe_file, assert_gate_refuses, refused

runner = CliRunner()


# --- first-fit decreasing -------------------------------------------------------------------------------------
def _reference(lengths: list[int], max_length: int) -> list[list[int]]:
    """First-fit decreasing written the plain O(n * rows) way."""
    sizes = [min(max(n, 0), max_length) for n in lengths]
    rows: list[list[int]] = []
    free: list[int] = []
    for index in sorted(range(len(sizes)), key=lambda i: (-sizes[i], i)):
        row = next((r for r, room in enumerate(free) if room >= sizes[index]), None)
        if row is None:
            rows.append([])
            free.append(max_length)
            row = len(rows) - 1
        rows[row].append(index)
        free[row] -= sizes[index]
    return rows


def _length_cases() -> list[tuple[list[int], int]]:
    rng = random.Random(18)
    cases = [
        ([], 8),
        ([0], 8),
        ([8], 8),
        ([9], 8),
        ([8, 8, 8], 8),
        ([1] * 17, 4),
        ([0, 0, 12, 0, 3], 10),
        ([5, 3, 8, 2, 9, 1, 0, 12], 10),
        ([1], 1),
        ([2, 2, 2], 1),
        ([7, 7, 1, 1], 8),
    ]
    for _ in range(30):  # skewed like LLaVA data: many short, a few near or over max_length
        max_length = rng.choice([16, 64, 256, 2048])
        cases.append(([int(rng.paretovariate(1.2) * max_length / 8) for _ in range(rng.randint(1, 120))], max_length))
    return cases


@pytest.mark.parametrize(("lengths", "max_length"), _length_cases())
def test_rows_never_exceed_max_length_and_hold_every_sample_exactly_once(lengths, max_length):
    rows = pack_lengths(lengths, max_length)
    assert sorted(i for row in rows for i in row) == list(range(len(lengths)))
    assert all(sum(min(lengths[i], max_length) for i in row) <= max_length for row in rows)
    for row in rows:  # one over max_length (cut to it by the encoder, or dropped) shares its row with nothing
        if any(lengths[i] > max_length for i in row):
            assert [i for i in row if lengths[i] > 0] == [next(i for i in row if lengths[i] > max_length)]
    assert rows == _reference(lengths, max_length)


@pytest.mark.parametrize("max_length", [0, -1, -512])
def test_a_max_length_that_holds_no_token_is_refused(max_length):
    with pytest.raises(BadInputError, match="max_length"):
        pack_lengths([1, 2], max_length)


# --- real samples ---------------------------------------------------------------------------------------------
def _samples(folder: Path, extra: list[dict] = ()) -> Path:
    path = folder / "data.json"
    path.write_text(json.dumps(clean_samples() + list(extra)))
    return path


def _dataset(processor, data: Path, images: Path, max_length: int = 4096) -> EncodedDataset:
    return EncodedDataset(open_samples(data, images), SampleEncoder(processor, stage=2, max_length=max_length))


def test_a_sample_over_max_length_is_cut_or_dropped_as_without_packing(dpa_workspace, data_files, tmp_path):
    long_answer = " ".join(["The quick brown fox jumps over the lazy dog."] * 30)
    image_late = " ".join(["Look closely."] * 60) + "\n<image>"
    extra = [
        {
            "id": "long-text",
            "conversations": [{"from": "human", "value": "Tell me."}, {"from": "gpt", "value": long_answer}],
        },
        {
            "id": "image-late",
            "image": "red.png",
            "conversations": [{"from": "human", "value": image_late}, {"from": "gpt", "value": "Red."}],
        },
    ]
    processor = loading.load_processor(dpa_workspace("next_qwen") / "model")
    data = _samples(tmp_path, extra)
    unpacked = _dataset(processor, data, data_files / "images", max_length=128)
    by_id = {f["sample_id"]: len(f["input_ids"]) for i in range(len(unpacked)) if (f := unpacked.encode_or_skip(i))}
    packed = pack_dataset(_dataset(processor, data, data_files / "images", max_length=128), 128)
    rows = [packed[r] for r in range(len(packed))]
    assert all(sum(len(f["input_ids"]) for f in row) <= 128 for row in rows)
    seen = [f["sample_id"] for row in rows for f in row]
    assert sorted(seen) == sorted(by_id) and "image-late" not in seen  # every kept sample once; the uncuttable dropped
    assert {f["sample_id"]: len(f["input_ids"]) for row in rows for f in row} == by_id  # "long-text" cut to 128
    assert by_id["long-text"] == 128 and packed.skipped == unpacked.skipped == {"too_long": 1}


def test_samples_known_bad_before_training_take_no_room_and_every_good_one_trains_once(
    dpa_workspace, data_files, tmp_path
):
    """With --on-bad-sample skip, a sample the lengths already find bad (a missing image file, a conversation
    without an answer) is skipped and counted up front, never planned into a row: no row is left empty, so no
    row trains twice in an epoch in its place."""
    rng = random.Random(3)
    bad = [
        {"id": f"missing-{i}", "image": f"nope-{i}.png", "conversations": [{"from": "human", "value": "<image>Hi"}]}
        for i in range(6)
    ]
    extra = [*bad, *({"id": f"no-answer-{i}", "conversations": [{"from": "human", "value": "Hi"}]} for i in range(3))]
    rng.shuffle(extra)
    processor = loading.load_processor(dpa_workspace("next_qwen") / "model")
    data = _samples(tmp_path, extra)
    encoder = SampleEncoder(processor, stage=2, max_length=96)
    unpacked = EncodedDataset(open_samples(data, data_files / "images"), encoder, on_bad_sample="skip", precheck=False)
    good = sorted(f["sample_id"] for i in range(len(unpacked)) if (f := unpacked.encode_or_skip(i)))
    packed = pack_dataset(
        EncodedDataset(open_samples(data, data_files / "images"), encoder, on_bad_sample="skip", precheck=False), 96
    )
    assert sum(packed.skipped.values()) == len(extra) == sum(unpacked.skipped.values())
    planned = [i for row in packed.rows for i in row]
    assert all(packed.rows) and len(planned) == len(set(planned)) == len(good)
    seen = sorted(f["sample_id"] for r in range(len(packed)) for f in packed[r])
    assert seen == good  # every good sample exactly once, no bad one, no row served twice


# --- packed == unpacked ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def paper_workspace(tiny_checkpoint, tmp_path_factory) -> Path:
    """A Qwen-VL-style target: the paper's skeleton (Qwen2.5-VL ViT + Qwen3 blocks), a Qwen2.5-VL perceiver."""
    folder = tmp_path_factory.mktemp("packing") / "paper"
    argv = [
        "upgrade",
        str(tiny_checkpoint("paper_vl")),
        "--perceiver",
        str(tiny_checkpoint("qwen2_5_vl")),
        "-o",
        str(folder),
    ]
    assert runner.invoke(app, argv).exit_code == 0
    return folder


def _with_mrope_llm(model):
    """The same weights with the target LLM as a Qwen2.5-VL-style M-RoPE text model. dpa's upgrade drives the
    skeleton's LLM with 1-D RoPE (the official thinker's); M-RoPE with equal t/h/w rows is 1-D RoPE exactly,
    so the loss is unchanged and only the position ids' form (`[4, rows, seq]`) is under test."""
    from dpa_cli.model.configuration_paper_dpa import Qwen2_5_VLQwen3TextConfig

    config = model.config
    text = {k: v for k, v in config.text_config.to_dict().items() if k not in ("model_type", "transformers_version")}
    half = config.text_config.head_dim // 2
    text["rope_parameters"] = {
        **text["rope_parameters"],
        "mrope_section": [half - 2 * (half // 3), half // 3, half // 3],
    }
    config.text_config = Qwen2_5_VLQwen3TextConfig(**text)
    config.text_config._attn_implementation = model.config._attn_implementation
    mrope = type(model)(config)
    mrope.load_state_dict(model.state_dict())
    assert uses_mrope(mrope.config.text_config) and "Qwen2_5_VL" in type(mrope.model.language_model).__name__
    return mrope.train()


TARGETS = ["llava_next", "paper", "paper_mrope"]


def _workspace(name: str, dpa_workspace, paper_workspace) -> Path:
    return dpa_workspace("next_qwen") if name == "llava_next" else paper_workspace


def _loss_and_grads(model, batch: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    loss = model(**model_inputs(dict(batch))).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("target", TARGETS)
def test_packed_and_unpacked_give_the_same_loss_and_gradients(target, dpa_workspace, paper_workspace, data_files):
    folder = _workspace(target, dpa_workspace, paper_workspace) / "model"
    torch.manual_seed(0)
    model = loading.load_model(folder, dtype=torch.float32).train()
    model = _with_mrope_llm(model) if target == "paper_mrope" else model
    processor = loading.load_processor(folder)
    data = data_files / "clean.json"  # one image, several images over several turns, text-only, a system turn
    dataset = _dataset(processor, data, data_files / "images")
    features = [dataset[i] for i in range(len(dataset))]
    rows = pack_lengths([len(f["input_ids"]) for f in features], max_length=200)
    assert len(rows) < len(features) and any(len(row) > 1 for row in rows), rows
    collator = DPACollator(processor)
    unpacked = collator(features)
    packed = PackingCollator(collator, mrope=uses_mrope(model.config.text_config))(
        [[features[i] for i in row] for row in rows]
    )
    assert packed["position_ids"].dim() == (3 if target == "paper_mrope" else 2)
    # The same reduction on both sides: the mean over every supervised token of the batch, and the same tokens.
    assert (packed["labels"] != -100).sum() == (unpacked["labels"][:, 1:] != -100).sum()

    calls = []
    handle = model.model.perceiver.register_forward_hook(lambda *_: calls.append(1))
    loss, grads = _loss_and_grads(model, unpacked)
    packed_loss, packed_grads = _loss_and_grads(model, packed)
    handle.remove()
    assert calls == [1, 1]  # every image of a batch, packed or not, in one perceiver call
    assert torch.isfinite(loss) and abs(loss - packed_loss) <= 1e-5, (loss, packed_loss)
    assert grads.keys() == packed_grads.keys() and len(grads) > 10
    worst = max((grads[n] - packed_grads[n]).abs().max().item() for n in grads)
    assert worst <= 1e-4, worst
    # The test can fail: with the padding mask kept, transformers sees no packing and samples attend across rows.
    leaked, _ = _loss_and_grads(model, {**packed, PACKED: False})
    assert abs(leaked - loss) > 1e-4


# --- the perceiver: one call per batch ------------------------------------------------------------------------
PERCEIVERS = ["next_qwen", "next_composed", "paper"]


@pytest.mark.parametrize("name", PERCEIVERS)
def test_one_perceiver_call_over_a_batch_equals_one_call_per_image(name, dpa_workspace, paper_workspace, data_files):
    from PIL import Image

    folder = (paper_workspace if name == "paper" else dpa_workspace(name)) / "model"
    model = loading.load_model(folder, dtype=torch.float32).eval()
    processor = loading.load_processor(folder)
    images = [Image.open(data_files / "images" / p).convert("RGB") for p in ("red.png", "green.jpg", "sub/blue.png")]
    text = processor.image_token

    def features(batch: list) -> list[torch.Tensor]:
        inputs = processor(images=[[image] for image in batch], text=[text] * len(batch), return_tensors="pt")
        kwargs = {k: v for k, v in inputs.items() if k not in ("input_ids", "attention_mask")}
        with torch.no_grad():
            return list(model.model.get_image_features(**kwargs).pooler_output)

    batched = features(images)
    single = [features([image])[0] for image in images]
    assert [f.shape for f in batched] == [f.shape for f in single] and len({f.shape[0] for f in single}) > 1
    worst = max((b - s).abs().max().item() for b, s in zip(batched, single))
    assert worst <= 1e-5, worst


# --- dpa train --pack -----------------------------------------------------------------------------------------
def test_dpa_train_pack_trains_a_few_steps(dpa_workspace, data_files, tmp_path):
    workspace = Path(shutil.copytree(dpa_workspace("next_qwen"), tmp_path / "ws"))
    data = tmp_path / "data.json"
    data.write_text(json.dumps(clean_samples() * 2))
    argv = [
        "train",
        "--stage",
        "1",
        "-w",
        str(workspace),
        "--data",
        str(data),
        "--image-root",
        str(data_files / "images"),
        "--pack",
        "--max-steps",
        "2",
        "--set",
        "max_length=256",
        "--set",
        "global_batch_size=2",
        "--set",
        "per_device_train_batch_size=1",
        "--set",
        "save_steps=1000",
        "--set",
        "gradient_checkpointing=false",
        "--set",
        "logging_steps=1",
        "--json",
    ]
    result = runner.invoke(app, argv)
    assert result.exit_code == 0, (result.stderr[-3000:], result.exception)
    summary = json.loads(result.stdout)
    assert summary["steps"] == 2 and summary["recipe"]["pack"] is True
    # 4 rows of up to 256 tokens: the 8 samples packed; tokens counted without the rows' padding
    assert 0 < summary["tokens_seen"] <= 4 * 256 and summary["final_loss"] > 0
    assert (workspace / "stage1" / "model" / "config.json").is_file()


# --- the recipe key `pack` ------------------------------------------------------------------------------------
BAD_PACK = ["2", "0", "1", "-1", "1.5", "abc", "tru", "nan", "inf", "[true]", "{a: 1}", "null", "'true'", '"false"']
GOOD_PACK = [("true", True), ("false", False), ("True", True), ("FALSE", False), ("yes", True), ("off", False)]


@pytest.mark.parametrize("value", BAD_PACK)
def test_the_gate_refuses_a_pack_value_that_is_not_true_or_false(tmp_path, value):
    assert_gate_refuses("stage1", [f"pack={value}"], "pack")
    assert_gate_refuses(str(_recipe_file(tmp_path, "pack", value)), [], "pack")


@pytest.mark.parametrize(("value", "expected"), GOOD_PACK)
def test_pack_values_pass_the_gate_typed(value, expected):
    assert load_recipe("stage2-full", [f"pack={value}"]).pack is expected


@pytest.mark.parametrize("name", [p.stem for p in RECIPES.glob("*.yaml")])
def test_the_packaged_recipes_do_not_pack_as_the_official_scripts(name):
    assert load_recipe(name).pack is False and "pack" in load_recipe(name).as_dict()


@pytest.fixture(scope="module")
def gate_env(tiny_checkpoint, dpa_workspace, data_files, tmp_path_factory) -> Env:
    workspace = Path(shutil.copytree(dpa_workspace("next_qwen"), tmp_path_factory.mktemp("pack-gate") / "ws"))
    return Env(tiny_checkpoint, workspace, data_files / "images", Path())


@pytest.mark.parametrize("value", BAD_PACK[::4])
def test_dpa_train_refuses_a_bad_pack_value_and_writes_nothing(gate_env, tmp_path, value):
    env = Env(gate_env.tiny, gate_env.workspace, gate_env.images, tmp_path)
    data = env.data(clean_samples()[:2])
    refused(
        env,
        [
            "train",
            "--stage",
            "1",
            "-w",
            str(env.workspace),
            "--data",
            str(data),
            "--image-root",
            str(env.images),
            "--pack",
            "--set",
            f"pack={value}",
        ],
        "pack",
    )


def test_the_pack_flag_sets_the_recipe_key_and_set_wins(gate_env, data_files):
    base = [
        "train",
        "--stage",
        "1",
        "-w",
        str(gate_env.workspace),
        "--data",
        str(data_files / "clean.json"),
        "--image-root",
        str(data_files / "images"),
        "--dry-run",
        "--json",
    ]
    for extra, expected in (([], False), (["--pack"], True), (["--pack", "--set", "pack=false"], False)):
        result = runner.invoke(app, base + extra)
        assert result.exit_code == 0, result.stderr
        assert json.loads(result.stdout)["recipe"]["pack"] is expected


# --- dpa bench train --pack -----------------------------------------------------------------------------------
def test_the_pack_bench_compares_the_same_samples_packed_and_padded(dpa_workspace, tmp_path):
    from dpa_cli.bench.pack import bench_pack
    from dpa_cli.cli.bench_tables import PACK_COLUMNS, pack_rows, pack_title

    result = bench_pack(dpa_workspace("next_qwen") / "model", tmp_path, samples=6, batch=3, max_length=256, repeats=1)
    padded, packed = result["padded"], result["packed"]
    assert padded["tokens"] == packed["tokens"] and padded["supervised_tokens"] == packed["supervised_tokens"]
    assert packed["padding_share"] < padded["padding_share"]
    assert result["loss_per_token_difference"] <= 1e-5 and sum(result["mix"]["by_kind"].values()) == 6
    assert result["ratio"]["best"] > 0 and result["ratio_cpu_time"]["best"] > 0
    assert all(len(row) == len(PACK_COLUMNS) for row in pack_rows(result)) and "max_length 256" in pack_title(result)


# --- transformers' packed masks, per text model a target can have ----------------------------------------------
def _text_configs() -> dict[str, object]:
    import transformers as tf

    from dpa_cli.model.configuration_paper_dpa import Qwen2_5_VLQwen3TextConfig

    base = dict(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        max_position_embeddings=128,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    mrope = {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 1, 1]}
    return {
        "llama": tf.LlamaConfig(**base),
        "qwen2": tf.Qwen2Config(**base),
        "qwen3": tf.Qwen3Config(**base),
        "mistral": tf.MistralConfig(**base, sliding_window=4),
        "gemma": tf.GemmaConfig(**base),
        "qwen2_vl_text": tf.Qwen2VLTextConfig(**base, rope_parameters=mrope),
        "qwen2_5_vl_text": tf.Qwen2_5_VLTextConfig(**base, rope_parameters=mrope),
        "qwen3_vl_text": tf.Qwen3VLTextConfig(**base, rope_parameters={**mrope, "mrope_interleaved": True}),
        "qwen2_5_vl_qwen3_text": Qwen2_5_VLQwen3TextConfig(**base, rope_parameters=mrope),
    }


@pytest.mark.parametrize(("kind", "attention"), [(k, "sdpa") for k in _text_configs()] + [("qwen3", "eager")])
def test_transformers_keeps_packed_samples_apart_for_every_text_model_kind(kind, attention):
    """What the packed collator relies on: position ids restarting per sample (the M-RoPE 4-row form where the
    model reads M-RoPE), no 2-D mask and no cache give each sample exactly its own forward."""
    from transformers import AutoModel

    from dpa_cli.data.packing import position_ids

    config = _text_configs()[kind]
    config._attn_implementation = attention
    torch.manual_seed(0)
    model = AutoModel.from_config(config).eval()
    samples = [torch.randint(3, 64, (1, n)) for n in (5, 7, 3)]
    positions = position_ids([5, 7, 3], 17)[None]  # two tokens of padding, a block of their own
    if uses_mrope(config):
        positions = positions.unsqueeze(0).expand(4, -1, -1)
    ids = torch.cat([*samples, torch.zeros(1, 2, dtype=torch.long)], dim=1)
    with torch.no_grad():
        packed = model(**model_inputs({"input_ids": ids, "position_ids": positions, PACKED: True})).last_hidden_state
        alone = torch.cat([model(input_ids=s).last_hidden_state for s in samples], dim=1)
    assert (packed[:, :15] - alone).abs().max() <= 1e-5


@pytest.mark.parametrize(
    "spelling",
    [["pack=true", "train_sampling_strategy=group_by_length"], ["train_sampling_strategy=group_by_length", "pack=yes"]],
)
def test_packing_and_length_grouping_together_are_refused(spelling):
    with pytest.raises(BadInputError, match="pack=true and train_sampling_strategy=group_by_length"):
        load_recipe("stage2-full", spelling)


def test_a_row_that_would_overflow_its_plan_stops_naming_its_samples(dpa_workspace, data_files):
    from dpa_cli.data.packing import PackedDataset
    from dpa_cli.errors import DpaError

    processor = loading.load_processor(dpa_workspace("next_qwen") / "model")
    dataset = _dataset(processor, data_files / "clean.json", data_files / "images")
    wrong = PackedDataset(dataset, pack_lengths([1] * len(dataset), 64), 64)  # planned as 1 token each
    with pytest.raises(DpaError, match=r"packed row 0 holds \d+ tokens, over max_length 64.*one-image"):
        wrong[0]
