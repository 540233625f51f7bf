"""`dpa export`: LoRA and full stage-2 results become self-contained folders that plain transformers reloads
with the trained model's logits; the merge equals peft's own; ties, dtypes and refusals hold."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from typer.testing import CliRunner

from dpa_cli.checkpoint import LazyTensorReader, read_checkpoint_index
from dpa_cli.cli.app import app
from dpa_cli.errors import CheckpointError
from dpa_cli.export import verify
from dpa_cli.export.adapter import read_adapter_config
from dpa_cli.export.merge import export_weights
from dpa_cli.loading import load_as_trained
from dpa_cli.workspace.results import StageResult, stage_result
from tests.trained_workspace import add_full_stage2, add_lora_stage2, add_stage1, random_lora, upgraded

runner = CliRunner()
EMBED, HEAD = "model.language_model.embed_tokens.weight", "lm_head.weight"


def export(*args: str) -> tuple[int, dict | None, str]:
    result = runner.invoke(app, ["export", *args, "--json"])
    payload = json.loads(result.stdout) if result.exit_code == 0 else None
    return result.exit_code, payload, result.stderr


def disk_tensors(folder: Path) -> dict[str, torch.Tensor]:
    tensors = {}
    for file in sorted(folder.glob("*.safetensors")):
        tensors.update(load_file(file))
    return tensors


@pytest.fixture(scope="module")
def lora_ws(tiny_checkpoint, tmp_path_factory) -> Path:
    """llava_next target (tied embeddings), stage 1 and a LoRA stage 2."""
    ws = upgraded(tiny_checkpoint, "llava_next", tmp_path_factory.mktemp("lora") / "ws")
    add_stage1(ws)
    add_lora_stage2(ws)
    return ws


@pytest.fixture(scope="module")
def lora_export(lora_ws) -> dict:
    """The default export of the LoRA workspace, with what its verification's fresh process reported."""
    reports = []
    run_check = verify.run_check
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(verify, "run_check", lambda *args: reports.append(run_check(*args)) or reports[-1])
        code, payload, stderr = export("-w", str(lora_ws))
    assert code == 0, stderr
    return {**payload, "child": reports[0]}


@pytest.fixture(scope="module")
def full_ws(tiny_checkpoint, tmp_path_factory) -> Path:
    """llava_llama3 target (untied LM head), stage 1 and a full stage 2."""
    ws = upgraded(tiny_checkpoint, "llava_llama3", tmp_path_factory.mktemp("full") / "ws")
    add_stage1(ws)
    add_full_stage2(ws)
    return ws


def test_lora_export_is_verified_self_contained_and_documented(lora_ws, lora_export):
    out = lora_ws / "export"
    assert lora_export["path"] == str(out) and lora_export["verified"] is True
    assert lora_export["max_abs_diff"] <= 1e-4 and lora_export["tolerance"] == 1e-4
    assert lora_export["stage"] == "stage2" and lora_export["lora"] == "merged"
    assert lora_export["weights"]["merged_modules"] == 14  # 7 linears x 2 layers of the target LLM
    # The check ran in a fresh process, offline, that never imported dpa_cli, on the export's own processor.
    child = lora_export["child"]
    assert child["offline"] and not child["dpa_cli_imported"] and not child["mismatched_inputs"]
    config = json.loads((out / "config.json").read_text())
    assert config["auto_map"]["AutoModelForImageTextToText"] == "modeling_dpa.DPAForConditionalGeneration"
    for name in (
        "modeling_dpa.py",
        "configuration_dpa.py",
        "processing_dpa.py",
        "processor_config.json",
        "tokenizer.json",
        "chat_template.jinja",
        "generation_config.json",
        "perceiver_tokenizer",
    ):
        assert (out / name).exists(), name
    assert not (out / "adapter").exists() and not list(out.glob("*.bin"))
    card = (out / "README.md").read_text()
    assert "pipeline_tag: image-text-to-text" in card and "| stage2 | stage2-test (phi full, llm lora)" in card
    assert "0123456789abcdef" in card and "trust_remote_code=True" in card and "LoRA merged" in card
    assert not list(lora_ws.glob(".export*")), "no temporary folder is left"


def test_the_merge_equals_peft_merge_and_unload(lora_ws, lora_export):
    peft_model = load_as_trained(stage_result(lora_ws))
    merged = peft_model.merge_and_unload().state_dict()
    written = disk_tensors(lora_ws / "export")
    assert set(written) == set(merged) - {HEAD}  # tied: the LM head is the embedding, stored once
    diff = max(float((written[name] - merged[name]).abs().max()) for name in written)
    assert diff <= 1e-6, diff


def test_rslora_and_per_module_ranks_and_alphas_merge_as_peft_merges_them(lora_ws, tmp_path):
    source = lora_ws / "stage1" / "model"
    model = random_lora(source, seed=3, use_rslora=True, rank_pattern={"q_proj": 2}, alpha_pattern={"v_proj": 3})
    model.save_pretrained(tmp_path / "adapter")
    (tmp_path / "out").mkdir()
    summary = export_weights(source, tmp_path / "out", tmp_path / "adapter")
    merged = model.merge_and_unload().state_dict()
    written = disk_tensors(tmp_path / "out")
    assert summary["merged_modules"] == 14 and set(written) == set(merged) - {HEAD}
    assert max(float((written[name] - merged[name]).abs().max()) for name in written) <= 1e-6


def test_the_adapter_matters_far_beyond_the_tolerance(lora_ws, tmp_path):
    """Without the adapter the logits move by much more than 1e-4: a merge that is skipped cannot pass."""
    result = stage_result(lora_ws)
    verify.reference_probe(result, tmp_path / "with.safetensors")
    verify.reference_probe(StageResult(result.name, result.model_dir), tmp_path / "without.safetensors")
    with_adapter, without = load_file(tmp_path / "with.safetensors"), load_file(tmp_path / "without.safetensors")
    assert float((with_adapter["logits"] - without["logits"]).abs().max()) > 1e-2


def test_tied_embeddings_stay_tied_and_are_stored_once(lora_ws, lora_export):
    from transformers import AutoModelForImageTextToText

    out = lora_ws / "export"
    with safe_open(out / "model.safetensors", "pt") as handle:
        keys = set(handle.keys())
    assert EMBED in keys and HEAD not in keys
    model = AutoModelForImageTextToText.from_pretrained(out, trust_remote_code=True)
    assert model.lm_head.weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()


def test_unchanged_tensors_are_copied_not_loaded(lora_ws, tmp_path, monkeypatch):
    """Only the adapted weights (and the adapter) are read into memory; the rest is a kernel copy."""
    loaded = []
    original = LazyTensorReader.get
    monkeypatch.setattr(
        LazyTensorReader, "get", lambda self, name, **kw: loaded.append(name) or original(self, name, **kw)
    )
    result = stage_result(lora_ws)
    summary = export_weights(result.model_dir, tmp_path, result.adapter_dir)
    base = [name for name in loaded if not name.startswith("base_model.")]
    assert len(base) == summary["merged_modules"] == 14 and all(name.endswith("_proj.weight") for name in base)


def test_full_stage2_in_bf16_keeps_an_untied_head_and_passes_the_16_bit_tolerance(full_ws):
    code, payload, stderr = export("-w", str(full_ws), "--dtype", "bf16", "-o", str(full_ws.parent / "bf16"))
    assert code == 0, stderr
    assert payload["lora"] == "none" and payload["dtype"] == "bfloat16" and payload["verified"]
    assert 1e-4 < payload["tolerance"] and payload["max_abs_diff"] <= payload["tolerance"]
    index = read_checkpoint_index(Path(payload["path"]))
    assert {info.dtype for info in index.tensors.values()} == {"BF16"}
    assert HEAD in index.tensors and EMBED in index.tensors
    assert json.loads((Path(payload["path"]) / "config.json").read_text())["dtype"] == "bfloat16"


def test_keep_adapter_ships_it_unmerged_and_sharded_weights_load(lora_ws, tmp_path):
    out = tmp_path / "keep"
    code, payload, stderr = export("-w", str(lora_ws), "--keep-adapter", "-o", str(out), "--shard-size", "200KB")
    assert code == 0, stderr
    assert payload["lora"] == "kept" and payload["verified"] and payload["max_abs_diff"] <= 1e-4
    adapter = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert adapter["base_model_name_or_path"] == str(out) and "dpa_cli" not in json.dumps(adapter["auto_mapping"])
    assert payload["weights"]["shards"] > 1 and (out / "model.safetensors.index.json").is_file()
    assert 'AutoPeftModel.from_pretrained(f"{path}/adapter"' in (out / "README.md").read_text()


def test_a_failed_verification_leaves_no_export_and_the_workspace_untouched(lora_ws, tmp_path, monkeypatch):
    before = sorted((str(p), p.stat().st_mtime_ns) for p in lora_ws.rglob("*"))
    report = {
        "max_abs_diff": 0.5,
        "reference_max_abs": 1.0,
        "mismatched_inputs": [],
        "load_problems": [],
        "dpa_cli_imported": False,
    }
    monkeypatch.setattr(verify, "run_check", lambda folder, probe, adapter, allow_code=False: report)
    result = runner.invoke(app, ["export", "-w", str(lora_ws), "-o", str(tmp_path / "out")])
    assert result.exit_code == 1
    assert "differ from the trained model's by 0.5 on the probe (tolerance 0.0001)" in result.stderr
    assert list(tmp_path.iterdir()) == []  # neither the export nor its temporary sibling
    assert sorted((str(p), p.stat().st_mtime_ns) for p in lora_ws.rglob("*")) == before


def test_force_replaces_an_export_and_no_verify_says_so(lora_ws, lora_export, tmp_path):
    out = tmp_path / "again"
    assert export("-w", str(lora_ws), "-o", str(out), "--no-verify")[0] == 0
    code, payload, stderr = export("-w", str(lora_ws), "-o", str(out), "--no-verify", "--force", "--stage", "1")
    assert code == 0, stderr
    assert payload["stage"] == "stage1" and payload["verified"] is False and payload["max_abs_diff"] is None
    assert "not verified" in (out / "README.md").read_text()


def test_an_untrained_workspace_exports_its_upgraded_model(tiny_checkpoint, tmp_path):
    ws = upgraded(tiny_checkpoint, "llava_next", tmp_path / "ws")
    code, payload, stderr = export("-w", str(ws), "--no-verify")
    assert code == 0, stderr
    assert payload["stage"] == "model" and "No stage has been trained" in (ws / "export" / "README.md").read_text()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--merge-lora", "--keep-adapter"], "--merge-lora and --keep-adapter contradict each other"),
        (["-o", "{ws}/stage2/model"], "overlap"),
        (["-o", "{ws}/stage2/adapter/out"], "overlap"),
        (["-o", "{ws}"], "overlap"),
        (["-o", "{ws}/export"], "already exists"),
        (["-o", "{ws}/dpa.yaml"], "is a file"),
        (["-o", "{ws}/stage1/model/out"], "overlap"),
        (["-o", "{ws}/stage2", "--force"], "overlap"),
        (["-o", "{ws}/data", "--force"], "not one (no dpa_export.json)"),
        (["--stage", "3"], "stages 1 and 2"),
        (["--dtype", "int8"], "--dtype 'int8' is not one of"),
        (["--stage", "1", "--keep-adapter"], "no LoRA adapter to keep"),
    ],
)
def test_refusals_are_one_line_and_write_nothing(lora_ws, lora_export, args, message):
    (lora_ws / "data").mkdir(exist_ok=True)
    (lora_ws / "data" / "captions.json").touch()
    before = sorted(str(p) for p in lora_ws.rglob("*"))
    result = runner.invoke(app, ["export", "-w", str(lora_ws), *[a.format(ws=lora_ws) for a in args]])
    assert result.exit_code == 2 and message in result.stderr, result.stderr
    assert result.stdout == "" and len(result.stderr.strip().splitlines()) <= 2
    assert sorted(str(p) for p in lora_ws.rglob("*")) == before


def test_a_lora_stage_without_its_adapter_is_named(lora_ws, tmp_path):
    ws = tmp_path / "ws"
    shutil.copytree(lora_ws, ws, ignore=shutil.ignore_patterns("export", "adapter"))
    result = runner.invoke(app, ["export", "-w", str(ws)])
    assert result.exit_code == 2 and "stage2 was trained with LoRA but" in result.stderr


def test_an_adapter_peft_cannot_apply_fails_before_anything_is_written(lora_ws, tmp_path):
    ws = tmp_path / "ws"
    shutil.copytree(lora_ws, ws, ignore=shutil.ignore_patterns("export"))
    config = ws / "stage2" / "adapter" / "adapter_config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), "target_modules": "no_such_layer"}))
    result = runner.invoke(app, ["export", "-w", str(ws)])
    assert result.exit_code == 2 and "adapter: peft cannot apply it" in result.stderr, result.stderr
    assert not (ws / "export").exists() and not list(ws.glob(".export*"))


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"use_dora": True}, "use_dora is set"),
        ({"peft_type": "IA3"}, "IA3 adapter, not LoRA"),
        ({"modules_to_save": ["lm_head"]}, "modules_to_save is set"),
    ],
)
def test_adapters_a_merge_cannot_reproduce_are_refused_by_name(lora_ws, tmp_path, change, message):
    config = json.loads((lora_ws / "stage2" / "adapter" / "adapter_config.json").read_text())
    (tmp_path / "adapter_config.json").write_text(json.dumps({**config, **change}))
    with pytest.raises(CheckpointError, match=message) as caught:
        read_adapter_config(tmp_path)
    assert "--keep-adapter" in caught.value.hint
