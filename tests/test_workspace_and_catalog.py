"""Finding a workspace the way git finds a repo; catalog aliases (built-in and $DPA_CATALOG); `dpa bench`."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from dpa_cli.catalog import expand_alias, load_catalog
from dpa_cli.cli.app import app
from dpa_cli.errors import BadInputError, ModelNotFoundError
from dpa_cli.upgrade.sources import ComposedSpec, parse_perceiver_spec
from dpa_cli.workspace.manifest import find_workspace, read_manifest, write_manifest

runner = CliRunner()


def make_workspace(folder):
    folder.mkdir(parents=True)
    write_manifest(folder, {"stages": {}})
    return folder


def test_workspace_is_found_from_flag_env_cwd_parent_or_single_child(tmp_path, monkeypatch):
    ws = make_workspace(tmp_path / "ws")
    (ws / "model" / "deep").mkdir(parents=True)
    monkeypatch.delenv("DPA_WORKSPACE", raising=False)
    assert find_workspace(cwd=ws / "model" / "deep") == ws.resolve()  # a parent holds dpa.yaml
    assert find_workspace(cwd=tmp_path) == ws.resolve()  # the one child that does
    assert find_workspace(explicit=ws) == ws.resolve()
    monkeypatch.setenv("DPA_WORKSPACE", str(ws))
    assert find_workspace(cwd=tmp_path / "elsewhere") == ws.resolve()


def test_workspace_errors_say_what_to_do(tmp_path, monkeypatch):
    monkeypatch.delenv("DPA_WORKSPACE", raising=False)
    with pytest.raises(BadInputError, match="no dpa workspace") as missing:
        find_workspace(cwd=tmp_path)
    assert "dpa upgrade" in missing.value.hint
    make_workspace(tmp_path / "a")
    make_workspace(tmp_path / "b")
    with pytest.raises(BadInputError, match=r"several workspaces here \(a, b\)"):
        find_workspace(cwd=tmp_path)
    (tmp_path / "c").mkdir()
    with pytest.raises(BadInputError, match="not a dpa workspace"):
        find_workspace(explicit=tmp_path / "c")


def test_a_hand_edited_manifest_is_refused(tmp_path):
    ws = make_workspace(tmp_path / "ws")
    (ws / "dpa.yaml").write_text("stages: [unclosed\n")
    with pytest.raises(BadInputError, match="dpa.yaml: cannot read it"):
        read_manifest(ws)


def test_builtin_catalog_has_the_paper_setups():
    catalog = load_catalog()
    assert catalog["qwen3-0.6b-vl"].source == "vit=target,lm=Qwen/Qwen3-0.6B"
    assert {"llava-next-qwen3-4b", "llava-next-qwen3-32b", "llava-next-llama3.2-3b"} <= set(catalog)
    assert parse_perceiver_spec("qwen3-0.6b-vl") == ComposedSpec("target", "Qwen/Qwen3-0.6B")


def test_user_catalog_adds_and_overrides_aliases(tmp_path, monkeypatch, tiny_checkpoint):
    user = tmp_path / "catalog.yaml"
    user.write_text(
        f"targets:\n  llava-next-qwen3-4b:\n    source: {tiny_checkpoint('llava_next')}\n    description: my baseline\n"
    )
    monkeypatch.setenv("DPA_CATALOG", str(user))
    assert expand_alias("llava-next-qwen3-4b") == str(tiny_checkpoint("llava_next"))
    result = runner.invoke(app, ["inspect", "llava-next-qwen3-4b", "--json"])
    assert result.exit_code == 0 and json.loads(result.stdout)["family"] == "llava_next"
    listed = json.loads(runner.invoke(app, ["catalog", "--json"]).stdout)
    assert {"name": "llava-next-qwen3-4b", "source": str(tiny_checkpoint("llava_next"))}.items() <= next(
        a for a in listed if a["name"] == "llava-next-qwen3-4b"
    ).items()


def test_unpublished_alias_and_broken_catalog_are_clear_errors(tmp_path, monkeypatch):
    with pytest.raises(ModelNotFoundError, match="no public checkpoint") as err:
        expand_alias("llava-next-qwen3-32b")
    assert "DPA_CATALOG" in err.value.hint
    (tmp_path / "bad.yaml").write_text("models: {}\n")
    monkeypatch.setenv("DPA_CATALOG", str(tmp_path / "bad.yaml"))
    result = runner.invoke(app, ["catalog"])
    assert result.exit_code == 2 and "only the sections targets, perceivers" in result.stderr


def test_bench_upgrade_prints_ratios(tmp_path):
    """A smoke run of the benchmark command on a small input: it measures, it does not assert speed."""
    result = runner.invoke(
        app,
        [
            "bench",
            "upgrade",
            "--size",
            "30MB",
            "--input-shard",
            "10MB",
            "--shard-size",
            "20MB",
            "--repeats",
            "1",
            "--workdir",
            str(tmp_path),
            "--json",
        ],
    )
    assert result.exit_code == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["input_bytes"] > 25_000_000 and set(report["ratios"]) == {"keep_dtype", "cast_fp16"}
    for ratios in report["ratios"].values():
        assert ratios["time_over_cp"]["min"] > 0 and ratios["rss_growth_over_shard"]["median"] >= 0
    assert list(tmp_path.iterdir()) == []  # the inputs live in a temporary folder, removed afterwards


def test_bench_export_prints_ratios(tmp_path):
    """A smoke run of the merge benchmark on a small input (it measures, it does not assert speed)."""
    result = runner.invoke(
        app,
        [
            "bench",
            "export",
            "--size",
            "30MB",
            "--shard-size",
            "20MB",
            "--repeats",
            "1",
            "--workdir",
            str(tmp_path),
            "--json",
        ],
    )
    assert result.exit_code == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["lora_modules"] > 0 and report["ratios"]["merge"]["time_over_cp_sync"]["min"] > 0
