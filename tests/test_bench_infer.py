"""`dpa bench infer` / `flops` / `all`: a real DPA workspace against the real LLaVA-NeXT it was upgraded from,
and the analytic FLOP arithmetic against torch's FLOP counter on real (tiny) transformers models."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from dpa_cli.bench import analytic
from dpa_cli.bench.infer import FIGURES, count_prefill_flops
from dpa_cli.cli.app import app
from dpa_cli.flops import flop_counter

MODEL_KEYS = {
    "path",
    "params",
    "weights_bytes",
    "memory_growth_bytes",
    "peak_memory_bytes",
    "flops_per_image",
    "prompt_tokens",
    "encoder_calls_per_prompt",
    *FIGURES,
}


def invoke(*args: str):
    return CliRunner().invoke(app, list(args))


@pytest.fixture(scope="module")
def workspace(dpa_workspace):
    return dpa_workspace("next_composed")


@pytest.fixture(scope="module")
def infer_result(workspace) -> dict:
    # One intra-op thread: these models are tiny, and on a shared 2-core machine threads only wait on each other.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        result = invoke(
            "bench",
            "infer",
            str(workspace),
            "--device",
            "cpu",
            "--max-new-tokens",
            "3",
            "--repeats",
            "2",
            "--prompts",
            "2",
            "--json",
        )
    finally:
        torch.set_num_threads(threads)
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def test_infer_reports_every_documented_figure_positive_for_both_models(infer_result, tiny_checkpoint):
    assert infer_result["device"] == "cpu" and infer_result["repeats"] == 2 and infer_result["max_new_tokens"] == 3
    assert len(infer_result["prompts"]) == 2
    models = infer_result["models"]
    assert set(models) == {"original", "dpa"}
    # The baseline came from dpa.yaml: the LLaVA-NeXT target that was upgraded.
    assert models["original"]["path"] == str(tiny_checkpoint("llava_next").resolve())
    for figures in models.values():
        assert MODEL_KEYS <= set(figures)
        assert 0 < figures["prefill_s_per_image"]["best"] <= figures["prefill_s_per_image"]["median"]
        for key in ("decode_tokens_per_s", "e2e_tokens_per_s"):  # best: the fastest pass
            assert figures[key]["best"] >= figures[key]["median"] > 0
        assert figures["flops_per_image"] > 0 and figures["weights_bytes"] > 0 and figures["peak_memory_bytes"] > 0
    ratios = infer_result["ratios"]
    assert set(ratios) == {*FIGURES, "flops_per_image", "peak_memory_bytes"}
    assert all(ratios[key]["best"] > 0 and ratios[key]["median"] > 0 for key in FIGURES)
    # DPA adds the perceiver's language blocks and phi to the same ViT and target LLM.
    assert ratios["flops_per_image"] > 1
    assert {"machine", "paper", "prompts", "targets"} <= set(infer_result)


def test_the_perceiver_runs_once_per_prompt_never_per_decoded_token(infer_result):
    # 3 new tokens per prompt, 2 prompts, 6 generations each: a perceiver in the decode loop would show 3.
    assert infer_result["perceiver_calls_per_prompt"] == 1
    assert infer_result["models"]["dpa"]["encoder_calls_per_prompt"] == 1
    assert infer_result["models"]["original"]["encoder_calls_per_prompt"] == 1


def test_a_model_that_is_not_a_workspace_needs_baseline_and_bad_pairs_are_refused(workspace, tiny_checkpoint):
    result = invoke("bench", "infer", str(workspace / "model"))
    assert result.exit_code == 2 and "--baseline" in result.stderr
    result = invoke("bench", "infer", str(tiny_checkpoint("llava_next")), "--baseline", str(workspace / "model"))
    assert result.exit_code == 2 and "not a DPA model" in result.stderr
    result = invoke("bench", "infer", str(workspace), "--baseline", str(tiny_checkpoint("llava_llama3")))
    assert result.exit_code == 2 and "another language model" in result.stderr


def _inputs(spec: str):
    from dpa_cli.bench.infer import PROMPTS, prompt_images
    from dpa_cli.generate import build_inputs, open_runnable, user_turn

    runnable = open_runnable(spec, device="cpu")
    return runnable.model, build_inputs(runnable.processor, [user_turn(PROMPTS[0][0], [prompt_images()[0]])])


def test_analytic_flops_match_the_counter_on_a_real_llava_next_and_its_dpa_upgrade(workspace, tiny_checkpoint):
    model, inputs = _inputs(str(tiny_checkpoint("llava_next")))
    config, tiles, seq = model.config.to_dict(), inputs["pixel_values"].shape[1], inputs["input_ids"].shape[1]
    vit, text = config["vision_config"], config["text_config"]
    patches = tiles * (vit["image_size"] // vit["patch_size"]) ** 2
    original = (
        analytic.clip_vit_flops(vit, tiles)
        + analytic.mlp_flops(patches, vit["hidden_size"], text["hidden_size"], text["hidden_size"])
        + analytic.lm_prefill_flops(text, seq)
    )
    assert original == pytest.approx(count_prefill_flops(model, inputs), rel=0.03)

    model, inputs = _inputs(str(workspace))
    config = model.config.to_dict()
    perceiver, p_text, text = (
        config["perceiver_config"],
        config["perceiver_config"]["text_config"],
        config["text_config"],
    )
    d_v, d_p, d_t = perceiver["vision_config"]["hidden_size"], p_text["hidden_size"], text["hidden_size"]
    features = int(inputs["input_ids"].eq(config["image_token_id"]).sum())
    dpa = (
        analytic.clip_vit_flops(perceiver["vision_config"], tiles)
        + analytic.mlp_flops(patches, d_v, d_p, d_p)
        + analytic.Stack.from_text_config(p_text).prefill_flops(inputs["perceiver_input_ids"].shape[1])
        + analytic.mlp_flops(features, d_p, d_p, d_t)
        + analytic.lm_prefill_flops(text, seq)
    )
    assert dpa == pytest.approx(count_prefill_flops(model, inputs), rel=0.03)


def test_analytic_windowed_qwen2_5_vit_matches_the_counter():
    from transformers import Qwen2_5_VLVisionConfig
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VisionTransformerPretrainedModel

    # Windows of 2x2 merge units (4x4 patches), cut at the edge of a 12 x 10 patch grid; one full-attention block.
    vision = {
        "depth": 3,
        "hidden_size": 32,
        "intermediate_size": 48,
        "num_heads": 4,
        "out_hidden_size": 40,
        "patch_size": 14,
        "window_size": 56,
        "fullatt_block_indexes": [1],
        "spatial_merge_size": 2,
        "temporal_patch_size": 2,
    }
    model = Qwen2_5_VisionTransformerPretrainedModel._from_config(Qwen2_5_VLVisionConfig(**vision)).eval()
    grid = (12, 10)
    pixels = torch.randn(grid[0] * grid[1], 3 * 2 * 14 * 14)
    with torch.no_grad(), flop_counter() as counter:
        model(pixels, grid_thw=torch.tensor([[1, *grid]]))
    assert analytic.qwen2_5_vit_flops(vision, grid, 40) == pytest.approx(counter.get_total_flops(), rel=0.03)


def test_paper_configs_are_the_real_checkpoints_and_ratios_follow_the_paper():
    # Parameters with embeddings (the 32B's head is untied): 0.60B, 4.02B, 32.76B as the model cards say.
    embed = 151936
    assert analytic.params_billions(analytic.QWEN3_0_6B) + 1024 * embed / 1e9 == pytest.approx(0.596, abs=0.005)
    assert analytic.params_billions(analytic.QWEN3_4B) + 2560 * embed / 1e9 == pytest.approx(4.02, abs=0.01)
    assert analytic.params_billions(analytic.QWEN3_32B) + 2 * 5120 * embed / 1e9 == pytest.approx(32.76, abs=0.02)
    table = analytic.paper_table()
    small, large = table["qwen3-4b"], table["qwen3-32b"]
    assert large["image_features"] == 326  # 36 x 36 patches merged 2x2, plus the two markers
    assert 1 < large["prefill_ratio"] < small["prefill_ratio"] < 1.1
    # At 32B the target dominates: within 2% of the original, as the paper's 98% throughput.
    assert large["generate_ratio"] < 1.02 and large["decode_ratio"] == 1.0
    assert small["prefill_ratio_perceiver_sees_prompt"] > small["prefill_ratio"]


def test_bench_flops_all_and_infer_parse_and_refuse_unknown_names():
    result = invoke("bench", "flops", "--prompt-tokens", "32", "--json")
    assert result.exit_code == 0 and set(json.loads(result.stdout)) == {"qwen3-4b", "qwen3-32b"}
    for command in ("all", "infer", "flops"):
        assert invoke("bench", command, "--help").exit_code == 0
    result = invoke("bench", "all", "--quick", "--only", "nonsense")
    assert result.exit_code == 2 and "nonsense" in result.stderr
    result = invoke("bench", "infer", "--synthetic", "huge")
    assert result.exit_code == 2 and "huge" in result.stderr


def test_bench_all_summarises_an_infer_result_in_one_row_per_headline_ratio(infer_result):
    from dpa_cli.bench.suite import BENCHES, SETTINGS, summary

    rows = summary({"infer": infer_result})
    assert [row["bench"] for row in rows] == ["infer", "infer"]
    assert rows[0]["ratio"].startswith("decode tokens/s") and " / " in rows[0]["value"]
    assert set(BENCHES) == {"upgrade", "train", "export", "infer"} and all(quick for quick, _ in SETTINGS.values())
