"""`dpa inspect`: right numbers for every family, headers only, and clear one-line errors."""

from __future__ import annotations

import json
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers as tf
from safetensors.torch import save_file
from typer.testing import CliRunner

from dpa_cli.cli.app import app
from dpa_cli.describe import describe_model
from tests.factories import SPECS, copy_checkpoint, original_vit, tiny_config

runner = CliRunner()

# Where each family's parts live in the transformers module tree: (vision, projectors, language model).
MODULES = {
    "llava": ("model.vision_tower", ["model.multi_modal_projector"], "model.language_model"),
    "llava_next": ("model.vision_tower", ["model.multi_modal_projector"], "model.language_model"),
    "llava_onevision": ("model.vision_tower", ["model.multi_modal_projector"], "model.language_model"),
    "qwen2_vl": ("model.visual", ["model.visual.merger"], "model.language_model"),
    "qwen2_5_vl": ("model.visual", ["model.visual.merger"], "model.language_model"),
    "qwen3_vl": ("model.visual", ["model.visual.merger", "model.visual.deepstack_merger_list"], "model.language_model"),
    "qwen2_5_vl_qwen3": ("model.visual", ["model.visual.merger"], "model.language_model"),
    "idefics3": ("model.vision_model", ["model.connector"], "model.text_model"),
    "smolvlm": ("model.vision_model", ["model.connector"], "model.text_model"),
    "causal_lm": (None, [], "model"),
}
HF_SPECS = [name for name, spec in SPECS.items() if spec.prefix]


def inspect_json(folder) -> dict:
    result = runner.invoke(app, ["inspect", str(folder), "--json"])
    assert result.exit_code == 0, result.stderr
    return json.loads(result.stdout)


def count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


@pytest.mark.parametrize("layout", ["hub", "v5"])
@pytest.mark.parametrize("name", HF_SPECS)
def test_json_numbers_match_the_real_model(tiny_checkpoint, name, layout):
    spec = SPECS[name]
    report = inspect_json(tiny_checkpoint(name, layout=layout))
    config = tiny_config(name)
    model = spec.model_class(config)
    text = config.get_text_config()
    vision_path, projector_paths, lm_path = MODULES[spec.family]
    projector = sum(count(model.get_submodule(p)) for p in projector_paths)

    assert (report["family"], report["unmapped_keys"], report["warnings"]) == (spec.family, [], [])
    assert report["total_params"] == count(model)  # parameters() counts a tied embedding once
    assert report["projector"]["params"] == projector
    lm = report["language_model"]
    assert lm["params"] == count(model.get_submodule(lm_path))
    assert (lm["hidden_size"], lm["num_layers"]) == (text.hidden_size, text.num_hidden_layers)
    assert lm["vocab_size"] == text.vocab_size == len(tf.AutoTokenizer.from_pretrained(tiny_checkpoint(name)))
    assert lm["tie_word_embeddings"] == config.tie_word_embeddings == report["lm_head"]["tied"]
    assert report["lm_head"]["params"] == (0 if config.tie_word_embeddings else text.vocab_size * text.hidden_size)
    if vision_path:
        vision = report["vision"]
        nested = sum(count(model.get_submodule(p)) for p in projector_paths if p.startswith(vision_path + "."))
        assert vision["params"] == count(model.get_submodule(vision_path)) - nested
        assert vision["num_layers"] == config.vision_config.num_hidden_layers
        assert vision["external"] is False and vision["class"]
    assert report["chat_template"] is True and report["dtype"] == "float32"


def test_widths_are_the_vit_widths_not_the_merger_outputs(tiny_checkpoint):
    report = inspect_json(tiny_checkpoint("qwen2_vl"))
    assert report["vision"]["hidden_size"] == tiny_config("qwen2_vl").vision_config.embed_dim
    assert report["vision"]["class"] == "Qwen2VisionTransformerPretrainedModel"
    assert report["marker_token_ids"] and report["role"] == ["perceiver"]
    assert inspect_json(tiny_checkpoint("llava_next"))["extra"] == {"image_newline": [64]}


@pytest.mark.parametrize("name", ["llava_original_llama", "llava_original_qwen", "llava_v15"])
def test_original_llava_reports_an_external_vit(tiny_checkpoint, name):
    folder = tiny_checkpoint(name)
    config = json.loads((folder / "config.json").read_text())
    report = inspect_json(folder)
    vision, lm = report["vision"], report["language_model"]
    assert (report["family"], report["role"], report["image_token_id"]) == ("llava_original", ["target"], -200)
    assert vision["external"] is True and vision["source"] == config["mm_vision_tower"]
    assert vision["hidden_size"] == config["mm_hidden_size"]
    has_vit = SPECS[name].options.get("vision_weights", True)
    assert vision["params"] == (count(original_vit(config["mm_vision_tower"])) if has_vit else 0)
    hidden, width = config["hidden_size"], config["mm_hidden_size"]
    assert report["projector"]["params"] == width * hidden + hidden + hidden * hidden + hidden
    assert report["projector"]["type"] == "mlp2x_gelu"
    fields = {k: v for k, v in config.items() if k not in ("model_type", "architectures")}
    text_model = tf.AutoModel.from_config(tf.AutoConfig.for_model(lm["model_type"], **fields))
    assert lm["params"] == count(text_model) and lm["hidden_size"] == hidden
    assert (report["lm_head"]["tied"], report["lm_head"]["shape"]) == (False, [config["vocab_size"], hidden])
    assert any("not in the checkpoint" in w for w in report["warnings"]) == (not has_vit)


def test_dpa_checkpoint_reports_its_perceiver_and_target(tiny_checkpoint):
    folder = tiny_checkpoint("dpa")
    config = json.loads((folder / "config.json").read_text())
    report = inspect_json(folder)
    perceiver = report["perceiver"]
    base = tf.AutoModel.from_config(tf.AutoConfig.for_model(**config["perceiver_config"]))
    assert (report["family"], report["role"], report["vision"]) == ("dpa", [], None)
    assert (perceiver["family"], perceiver["unmapped_keys"]) == ("qwen2_5_vl", [])
    assert perceiver["params"] == count(base)
    assert perceiver["vision"]["params"] + perceiver["projector"]["params"] == count(base.visual)
    assert perceiver["language_model"]["params"] == count(base.language_model)
    d_p, d_t = 32, config["text_config"]["hidden_size"]
    assert report["projector"]["tensors"]["model.multi_modal_projector.linear_2.weight"] == [d_t, d_p]
    assert report["language_model"]["hidden_size"] == d_t and report["unmapped_keys"] == []


@pytest.mark.parametrize("name", list(SPECS))
def test_people_see_the_family_and_every_part(tiny_checkpoint, name):
    result = runner.invoke(app, ["inspect", str(tiny_checkpoint(name))], env={"COLUMNS": "160"})
    assert result.exit_code == 0, result.stderr
    assert SPECS[name].family in result.stdout
    multimodal = SPECS[name].family != "causal_lm"
    for part in ("language model", "lm head", "projector", "vision"):
        assert (part in result.stdout) == (multimodal or part in ("language model", "lm head"))


def test_sharded_checkpoints_list_their_shards(tiny_checkpoint):
    folder = tiny_checkpoint("qwen2_5_vl", sharded=True)
    report = inspect_json(folder)
    files = sorted(folder.glob("model-*.safetensors"))
    assert report["num_shards"] == len(files) > 1 and report["shards"] == [f.name for f in files]
    assert report["total_bytes"] == sum(f.stat().st_size for f in files)
    assert report["total_params"] == inspect_json(tiny_checkpoint("qwen2_5_vl"))["total_params"]


def _data_start(path) -> int:
    return 8 + struct.unpack("<Q", path.read_bytes()[:8])[0]


def test_inspect_never_reads_tensor_data(tiny_checkpoint, tmp_path):
    source = tiny_checkpoint("llava_next")
    expected = describe_model(source)
    folder = copy_checkpoint(source, tmp_path / "zeroed")
    weights = folder / "model.safetensors"
    start, size = _data_start(weights), weights.stat().st_size
    with weights.open("r+b") as handle:  # zero every tensor byte: the headers alone must give the answer
        handle.seek(start)
        handle.write(b"\0" * (size - start))
    assert {**describe_model(folder), "path": None} == {**expected, "path": None}
    with weights.open("r+b") as handle:  # now cut the data short, like an interrupted download
        handle.truncate(start + 100)
    report = inspect_json(folder)
    assert report["total_params"] == expected["total_params"]
    assert report["warnings"] == [
        f"model.safetensors is truncated: {start + 100} of {size} bytes on disk; re-download it"
    ]


def test_a_chat_template_in_tokenizer_config_counts(tiny_checkpoint, tmp_path):
    folder = copy_checkpoint(tiny_checkpoint("causal_lm_llama"), tmp_path / "legacy")
    template = (folder / "chat_template.jinja").read_text()
    (folder / "chat_template.jinja").unlink()
    assert inspect_json(folder)["chat_template"] is False
    tokenizer_config = json.loads((folder / "tokenizer_config.json").read_text())
    (folder / "tokenizer_config.json").write_text(json.dumps({**tokenizer_config, "chat_template": template}))
    assert inspect_json(folder)["chat_template"] is True


# --- errors: exit 2, one line on stderr naming the thing, nothing on stdout, no traceback --------------
def _missing_config(folder):
    (folder / "config.json").unlink()


def _unknown_family(folder):
    (folder / "config.json").write_text(json.dumps({"model_type": "mystery_vlm", "architectures": ["Mystery"]}))


def _pickled_only(folder):
    (folder / "model.safetensors").rename(folder / "pytorch_model.bin")  # not a pickle: it must not be loaded


def _no_weights(folder):
    (folder / "model.safetensors").unlink()


def _header_length(folder):
    path = folder / "model.safetensors"
    path.write_bytes(struct.pack("<Q", 1 << 40) + path.read_bytes()[8:])


def _header_json(folder):
    path = folder / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[:8] + b"{" * (_data_start(path) - 8) + data[_data_start(path) :])


def _header_offsets(folder):
    path = folder / "model.safetensors"
    save_file({"model.norm.weight": torch.zeros(4)}, str(path))
    data = path.read_bytes()
    path.write_bytes(data.replace(b'"shape":[4]', b'"shape":[5]'))


def _missing_shard(folder):
    next(folder.glob("model-00002-of-*.safetensors")).unlink()


def _duplicate_keys(folder):
    (folder / "model.safetensors").rename(folder / "model-a.safetensors")
    shutil.copy(folder / "model-a.safetensors", folder / "model-b.safetensors")


ERRORS = {
    "missing config": (_missing_config, "no config.json"),
    "unknown family": (_unknown_family, "'mystery_vlm'"),
    "pickled weights only": (_pickled_only, "pytorch_model.bin"),
    "no weights": (_no_weights, "no *.safetensors"),
    "header length": (_header_length, "header length"),
    "header json": (_header_json, "not UTF-8 JSON"),
    "header offsets": (_header_offsets, "needs"),
    "missing shard": (_missing_shard, "missing"),
    "duplicate keys": (_duplicate_keys, "also stored in"),
}


def _assert_clean_refusal(exit_code: int, stdout: str, stderr: str, needle: str) -> None:
    lines = stderr.strip().splitlines()
    assert exit_code == 2, stderr
    assert stdout == "" and "Traceback" not in stderr
    assert lines[0].startswith("error:") and needle in lines[0] and len(lines) <= 2


@pytest.mark.parametrize("case", list(ERRORS))
def test_bad_checkpoints_are_refused_in_one_line(tiny_checkpoint, tmp_path, case):
    damage, needle = ERRORS[case]
    sharded = case == "missing shard"
    folder = copy_checkpoint(tiny_checkpoint("causal_lm_qwen3", sharded=sharded), tmp_path / "model")
    damage(folder)
    result = runner.invoke(app, ["inspect", str(folder), "--json"])
    _assert_clean_refusal(result.exit_code, result.stdout, result.stderr, needle)
    if case != "unknown family":
        assert str(folder) in result.stderr.splitlines()[0]


def test_a_missing_folder_is_refused(tmp_path):
    result = runner.invoke(app, ["inspect", str(tmp_path / "nope")])
    _assert_clean_refusal(result.exit_code, result.stdout, result.stderr, "no such folder")


def test_the_real_command_line(tiny_checkpoint, tmp_path):
    """`python -m dpa_cli inspect` in real processes (run side by side: each pays the torch import)."""
    broken = copy_checkpoint(tiny_checkpoint("qwen3_vl"), tmp_path / "no-config")
    _missing_config(broken)
    command = [sys.executable, "-m", "dpa_cli", "inspect"]
    runs = [
        subprocess.Popen([*command, str(folder), *flags], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for folder, flags in ((tiny_checkpoint("qwen3_vl"), ["--json"]), (broken, []))
    ]
    (ok_out, ok_err), (bad_out, bad_err) = (run.communicate(timeout=300) for run in runs)
    assert runs[0].returncode == 0, ok_err
    assert json.loads(ok_out)["family"] == "qwen3_vl"
    _assert_clean_refusal(runs[1].returncode, bad_out, bad_err, "no config.json")


def test_help_has_examples():
    result = runner.invoke(app, ["inspect", "--help"], env={"COLUMNS": "120"})
    assert result.exit_code == 0 and "Examples" in result.stdout and "dpa inspect" in result.stdout


def test_inspect_imports_neither_torch_nor_transformers(tiny_checkpoint):
    """Configs and headers only: no heavy imports, so inspect answers in well under a second."""
    script = (
        "import sys; from dpa_cli.cli.app import app; "
        "app(args=['inspect', sys.argv[1], '--json'], standalone_mode=False); "
        "print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))"
    )
    result = subprocess.run(
        [sys.executable, "-c", script, str(tiny_checkpoint("llava_next"))], capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout[: result.stdout.rindex("}") + 1])["family"] == "llava_next"
    assert result.stdout.strip().splitlines()[-1] == "[]"


def test_the_bundled_example_of_the_readme():
    report = inspect_json(Path(__file__).resolve().parents[1] / "examples" / "tiny-llava-next")
    assert (report["family"], report["role"], report["unmapped_keys"]) == ("llava_next", ["target", "perceiver"], [])
    assert report["chat_template"] is True and report["language_model"]["tie_word_embeddings"] is True
