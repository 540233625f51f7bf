"""`dpa analyze modality-gap`: the per-layer measures equal their textbook definitions, and on a tiny workspace
the command writes one CSV row per layer per model (DPA and the original target) and a PNG plot."""

from __future__ import annotations

import csv
import json
import math

import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from dpa_cli.analyze.gap_stats import LayerStats, ModalityStats, centroid_gap, linear_cka, mean_cosine
from dpa_cli.cli.app import app
from tests.trained_workspace import upgraded

runner = CliRunner()
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


# --- the measures -------------------------------------------------------------------------------------
def _stats(samples: list[torch.Tensor]) -> ModalityStats:
    stats = ModalityStats()
    for tokens in samples:
        stats.add(tokens)
    return stats


def test_streamed_centroid_gap_equals_the_formula_on_all_tokens():
    generator = torch.Generator().manual_seed(0)
    image = [torch.randn(n, 8, generator=generator, dtype=torch.float64) + 2.0 for n in (5, 9, 3)]
    text = [torch.randn(n, 8, generator=generator, dtype=torch.float64) * 3 for n in (4, 6, 7)]
    x, y = torch.cat(image), torch.cat(text)
    spread = ((torch.cov(x.T, correction=0).trace() + torch.cov(y.T, correction=0).trace()) / 2).sqrt()
    expected = float(torch.linalg.vector_norm(x.mean(0) - y.mean(0)) / spread)
    assert math.isclose(centroid_gap(_stats(image), _stats(text)), expected, rel_tol=1e-9)
    assert centroid_gap(_stats(image), _stats(image)) == 0.0


def test_mean_cosine_is_the_mean_over_every_image_text_pair_of_each_sample():
    generator = torch.Generator().manual_seed(1)
    image = [torch.randn(n, 6, generator=generator, dtype=torch.float64) for n in (3, 5)]
    text = [torch.randn(n, 6, generator=generator, dtype=torch.float64) for n in (4, 2)]
    per_sample = [
        torch.nn.functional.cosine_similarity(a[:, None], b[None], dim=-1).mean() for a, b in zip(image, text)
    ]
    assert math.isclose(mean_cosine(_stats(image), _stats(text)), float(sum(per_sample) / 2), rel_tol=1e-9)


def test_linear_cka_matches_the_feature_space_formula_and_its_invariances():
    generator = torch.Generator().manual_seed(2)
    x = torch.randn(10, 6, generator=generator, dtype=torch.float64)
    y = x @ torch.randn(6, 4, generator=generator, dtype=torch.float64) + 0.3 * torch.randn(
        10, 4, generator=generator, dtype=torch.float64
    )
    xc, yc = x - x.mean(0), y - y.mean(0)
    expected = float(
        torch.linalg.matrix_norm(yc.T @ xc) ** 2
        / (torch.linalg.matrix_norm(xc.T @ xc) * torch.linalg.matrix_norm(yc.T @ yc))
    )
    assert math.isclose(linear_cka(x, y), expected, rel_tol=1e-9)
    rotation, _ = torch.linalg.qr(torch.randn(6, 6, generator=generator, dtype=torch.float64))
    assert math.isclose(linear_cka(x, x), 1.0, rel_tol=1e-12)
    assert math.isclose(linear_cka(3.0 * x @ rotation + 1.0, y), expected, rel_tol=1e-9)  # scale, rotation, shift
    assert math.isnan(linear_cka(x[:2], y[:2]))  # two samples: centred CKA is always 1, so it is not reported


def test_layer_measures_name_their_counts():
    layer = LayerStats()
    for n in (2, 3, 4):
        layer.image.add(torch.ones(n, 4) * n)
        layer.text.add(torch.arange(4.0).repeat(5, 1) + n)
    measures = layer.measures()
    assert (measures["image_tokens"], measures["text_tokens"], measures["samples"]) == (9, 15, 3)


# --- the command on a tiny workspace ------------------------------------------------------------------
@pytest.fixture(scope="module")
def setup(tiny_checkpoint, tmp_path_factory) -> dict:
    """A composed-perceiver workspace of the tiny LLaVA-NeXT target and five image-text pairs (plus one text-only
    sample, which the analysis passes over)."""
    root = tmp_path_factory.mktemp("gap")
    ws = upgraded(tiny_checkpoint, "llava_next", root / "ws")
    (root / "images").mkdir()
    records = []
    for i, colour in enumerate([(200, 30, 30), (30, 200, 30), (30, 30, 200), (200, 200, 30), (30, 200, 200)]):
        Image.new("RGB", (30 + 9 * i, 40 - 2 * i), colour).save(root / "images" / f"{i}.png")
        records.append(
            {
                "id": f"s{i}",
                "image": f"images/{i}.png",
                "conversations": [
                    {"from": "human", "value": "<image>\nWhat is in the picture?"},
                    {"from": "gpt", "value": f"A plain square of colour number {i}."},
                ],
            }
        )
    records.insert(
        1, {"id": "text", "conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello"}]}
    )
    (root / "pairs.json").write_text(json.dumps(records))
    return {"root": root, "ws": ws, "target": tiny_checkpoint("llava_next")}


def test_csv_has_one_row_per_layer_per_model_and_a_png(setup):
    root, ws = setup["root"], setup["ws"]
    out = root / "gap"
    result = runner.invoke(
        app, ["analyze", "modality-gap", str(ws), "--data", str(root / "pairs.json"), "-o", str(out), "--json"]
    )
    assert result.exit_code == 0, result.stderr
    payload = json.loads(result.stdout)
    layers = json.loads((ws / "model" / "config.json").read_text())["text_config"]["num_hidden_layers"] + 1
    with open(out / "modality_gap.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 2 * layers and len(payload["rows"]) == 2 * layers
    assert [(r["role"], int(r["layer"])) for r in rows] == [
        (role, i) for role in ("model", "baseline") for i in range(layers)
    ]
    assert {r["model_type"] for r in rows if r["role"] == "model"} == {"dpa"}
    assert {r["path"] for r in rows if r["role"] == "baseline"} == {str(setup["target"])}  # from dpa.yaml
    assert all(r["samples"] == "5" and int(r["image_tokens"]) > 0 and int(r["text_tokens"]) > 0 for r in rows)
    for row, reported in zip(rows, payload["rows"]):
        for key in ("centroid_gap", "cka", "cosine"):
            assert math.isclose(float(row[key]), reported[key], rel_tol=1e-5) and math.isfinite(reported[key])
    assert (out / "modality_gap.png").read_bytes()[:8] == PNG_MAGIC
    assert payload["files"] == {"csv": str(out / "modality_gap.csv"), "png": str(out / "modality_gap.png")}
    # Layer 0 of the DPA model holds the projected perceiver features; the original's, its own projector's.
    model0 = next(r for r in payload["rows"] if r["role"] == "model" and r["layer"] == 0)
    base0 = next(r for r in payload["rows"] if r["role"] == "baseline" and r["layer"] == 0)
    assert model0["text_tokens"] == base0["text_tokens"] and model0["centroid_gap"] != base0["centroid_gap"]


def test_outside_a_workspace_there_is_no_default_baseline_and_outputs_are_not_overwritten(setup):
    root = setup["root"]
    out = root / "alone"
    args = [
        "analyze",
        "modality-gap",
        str(setup["target"]),
        "--data",
        str(root / "pairs.json"),
        "-o",
        str(out),
        "--limit",
        "3",
    ]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.stderr
    assert "no baseline" in result.stderr and "--baseline" in result.stderr and "gap model" in result.stdout
    with open(out / "modality_gap.csv", newline="") as handle:
        assert {row["role"] for row in csv.DictReader(handle)} == {"model"}
    again = runner.invoke(app, args)
    assert again.exit_code == 2 and "modality_gap.csv exists" in again.stderr and "--force" in again.stderr


def test_a_bad_image_is_named_before_any_model_loads(setup):
    root = setup["root"]
    bad = [{"id": "broken", "image": "missing.png", "conversations": [{"from": "human", "value": "<image>\nHi"}]}]
    (root / "bad.json").write_text(json.dumps(bad))
    result = runner.invoke(
        app, ["analyze", "modality-gap", str(setup["ws"]), "--data", str(root / "bad.json"), "-o", str(root / "bad")]
    )
    assert result.exit_code == 2 and "sample broken" in result.stderr and "missing.png" in result.stderr
    assert not (root / "bad").exists()


def test_help_has_examples():
    result = runner.invoke(app, ["analyze", "modality-gap", "--help"], env={"COLUMNS": "120"})
    assert result.exit_code == 0 and "Examples" in result.stdout
