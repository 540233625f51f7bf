"""Tiny checkpoints in the DPA paper's three official on-disk formats (transcription sec. 1), from configs with the
official field names and weights under the official key names; the hub ids they name are PAPER_REPOS
(tests/factories.py), found through a local cache (`paper_hub_cache`).

| format                           | keys on disk                                                              |
|----------------------------------|---------------------------------------------------------------------------|
| qwen_custom_vl_hw_new ("legacy") | visual.*, model.{embed_tokens,layers,norm}.*, lm_head.weight (absent tied) |
| qwen_custom_vl_hw_new ("v5")     | model.visual.*, model.language_model.*, lm_head.weight (absent tied)      |
| llava_baseline                   | model.vlm.visual.*, model.vlm.language_model.*, lm_head.weight            |
| forward_visual_tokens_llava_arch | model.perceiver.{model.vlm.*,lm_head.weight}, model.thinker.{model.*,     |
|                                  | lm_head.weight}, lm_head.weight, model.linear_align_dim.{0,2}.*           |

Each folder also ships the official remote-code files its `auto_map` names; they raise when imported, so a test
passes only if nothing runs them. Weights are built with dpa's own skeleton class (the reading is under test).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from tests.factories import PAPER_REPOS, _qwen_tokens, _unique_state_dict, tiny_config
from tests.tiny_processors import qwen_processor
from tests.tiny_tokenizers import tiny_tokenizer

VIT, PERCEIVER_LM, THINKER = "Qwen/Qwen2.5-VL-3B-Instruct", "Qwen/Qwen3-0.6B", "Qwen/Qwen3-4B"
TRAP = 'raise RuntimeError("the official remote code was run")\n'
MROPE = [2, 3, 3]  # sums to head_dim 16 / 2, as [16, 24, 24] to 128 / 2
HW_MODULE, LB_MODULE = "modeling_qwen_custom_vl_hw", "modeling_llava_baseline"
FVT_MODULE = "modeling_forward_visual_tokens_llava_arch"


def _hub_config(repo_id: str) -> dict[str, Any]:
    spec, overrides = PAPER_REPOS[repo_id]
    return tiny_config(spec, **overrides).to_dict()


def _skeleton(vision: dict, text: dict, ids: dict, tie: bool, seed: int) -> torch.nn.Module:
    from dpa_cli.model import Qwen2_5_VLQwen3Config, Qwen2_5_VLQwen3ForConditionalGeneration

    vision = {**vision, "model_type": "qwen2_5_vl_vision"}
    text = {k: v for k, v in text.items() if k not in ("rope_scaling", "rope_theta", "architectures", "_name_or_path")}
    torch.manual_seed(seed)
    config = Qwen2_5_VLQwen3Config(
        vision_config=vision, text_config={**text, "tie_word_embeddings": tie}, tie_word_embeddings=tie, **ids
    )
    return Qwen2_5_VLQwen3ForConditionalGeneration(config).eval()


def _files(folder: Path, config: dict, modules: tuple[str, ...], tokenizer: str) -> None:
    (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    for module in modules:
        (folder / f"{module}.py").write_text(TRAP)
    qwen_processor("Qwen2_5_VLProcessor", 14)(folder, tiny_tokenizer(tokenizer), None)


def _save(folder: Path, tensors: dict[str, torch.Tensor], storage: str) -> None:
    tensors = {k: v.detach().clone().contiguous() for k, v in tensors.items()}
    if storage == "bin":
        torch.save(tensors, folder / "pytorch_model.bin")
    else:
        save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})


# --- qwen_custom_vl_hw_new: the baseline target (official ref_dir/config.json, tiny) ---------------------------
def hw_config(tie: bool | None = None) -> dict[str, Any]:
    tok = tiny_tokenizer("qwen3")
    ids = _qwen_tokens(tok)
    text = dict(
        _name_or_path=THINKER,
        architectures=["Qwen3ForCausalLM"],
        attention_bias=False,
        head_dim=16,
        hidden_act="silu",
        hidden_size=32,
        intermediate_size=64,
        max_position_embeddings=512,
        model_type="qwen2_5_vl_text",
        num_attention_heads=4,
        num_hidden_layers=2,
        num_key_value_heads=2,
        rms_norm_eps=1e-6,
        rope_scaling={"mrope_section": MROPE, "rope_type": "default", "type": "default"},
        rope_theta=1000000,
        sliding_window=None,
        use_sliding_window=False,
        vocab_size=len(tok),
        bos_token_id=tok.convert_tokens_to_ids("<|endoftext|>"),
        eos_token_id=tok.eos_token_id,
    )
    vision = dict(
        depth=2,
        fullatt_block_indexes=[1],
        hidden_act="silu",
        hidden_size=32,
        in_channels=3,
        intermediate_size=64,
        model_type="qwen2_5_vl",
        num_heads=4,
        out_hidden_size=32,
        patch_size=14,
        spatial_merge_size=2,
        temporal_patch_size=2,
        tokens_per_second=4,
        window_size=56,
    )
    auto_map = {
        f"Auto{kind}": f"{HW_MODULE}.Qwen2_5_VL{'Config' if kind == 'Config' else 'ForConditionalGeneration'}"
        for kind in ("Config", "Model", "ModelForCausalLM")
    }
    config = dict(
        architectures=["Qwen2_5_VLForConditionalGeneration"],
        auto_map=auto_map,
        model_type="qwen_custom_vl_hw_new",
        text_config=text,
        vision_config=vision,
        torch_dtype="float32",
        **ids,
        **{k: v for k, v in text.items() if k not in ("model_type", "architectures")},
    )
    if tie is not None:  # absent in the official file: its config class defaults it to True
        config["tie_word_embeddings"] = tie
    return config


def build_hw(folder: Path, names: str = "legacy", tie: bool | None = None, seed: int = 1) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    config = hw_config(tie)
    ids = {k: config[k] for k in ("image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id")}
    text = {
        **config["text_config"],
        "model_type": "qwen2_5_vl_qwen3_text",
        "rope_parameters": {"rope_type": "default", "rope_theta": 1e6, "mrope_section": MROPE},
    }
    model = _skeleton(config["vision_config"], text, ids, tie is not False, seed)
    tensors = _unique_state_dict(model)
    if names == "legacy":  # what transformers 4.5x save_pretrained wrote (HW:3531-3534 reversed)
        tensors = {
            k.replace("model.visual.", "visual.", 1).replace("model.language_model.", "model.", 1): v
            for k, v in tensors.items()
        }
    _save(folder, tensors, "safetensors")
    _files(folder, config, (HW_MODULE,), "qwen3")
    return folder


# --- llava_baseline: the perceiver -------------------------------------------------------------------------
def baseline_config() -> dict[str, Any]:
    """A LLaVABaselineConfig as saved: Qwen2Config fields (copied from a Qwen2.5-VL config, whose width / heads
    give the rotary dimension) and the two hub ids."""
    return dict(
        architectures=["LLaVABaselineModelForConditionalGeneration"],
        model_type="llava_baseline",
        auto_map={
            "AutoConfig": f"{LB_MODULE}.LLaVABaselineConfig",
            "AutoModelForCausalLM": f"{LB_MODULE}.LLaVABaselineModelForConditionalGeneration",
        },
        vit_path=VIT,
        llm_path=PERCEIVER_LM,
        hidden_size=64,
        num_attention_heads=4,
        num_hidden_layers=2,
        intermediate_size=128,
        rope_theta=1000000.0,
        rope_scaling={"type": "default", "mrope_section": MROPE},
        tie_word_embeddings=False,
        vocab_size=151936,
        torch_dtype="bfloat16",
    )


def baseline_tensors(seed: int = 2) -> dict[str, torch.Tensor]:
    """The perceiver's weights under its in-memory names (`model.vlm.*`, `lm_head.weight`): the ViT from
    vit_path's config (merger out at the LM width), Qwen3 blocks from llm_path's, M-RoPE theta 1e6."""
    vlm, lm = _hub_config(VIT), _hub_config(PERCEIVER_LM)
    text = {
        **lm,
        "model_type": "qwen2_5_vl_qwen3_text",
        "rope_parameters": {"rope_type": "default", "rope_theta": 1e6, "mrope_section": MROPE},
    }
    vision = {**vlm["vision_config"], "out_hidden_size": lm["hidden_size"]}
    ids = {k: vlm[k] for k in ("image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id")}
    model = _skeleton(vision, text, ids, False, seed)
    return {
        k.replace("model.", "model.vlm.", 1) if k.startswith("model.") else k: v for k, v in model.state_dict().items()
    }


def build_baseline(folder: Path, storage: str = "safetensors") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    _save(folder, baseline_tensors(), storage)
    _files(folder, baseline_config(), (LB_MODULE,), "qwen2")
    return folder


# --- forward_visual_tokens_llava_arch: the DPA model (DPA-4B-init, DPA-4B) ---------------------------------------
def official_dpa_config() -> dict[str, Any]:
    tok = tiny_tokenizer("qwen3")
    thinker = _hub_config(THINKER)
    classes = {
        "AutoConfig": "ForwardVisualTokensArchConfig",
        "AutoModel": "ForwardVisualTokensArchForCausalLM",
        "AutoModelForCausalLM": "ForwardVisualTokensArchForCausalLM",
    }
    return dict(
        architectures=["ForwardVisualTokensArchForCausalLM"],
        model_type="forward_visual_tokens_llava_arch",
        auto_map={k: f"{FVT_MODULE}.{v}" for k, v in classes.items()},
        perceiver_config=baseline_config(),
        thinker_name_or_path=THINKER,
        t_tokenizer_name_or_path=THINKER,
        p_processor_name_or_path=VIT,
        image_token_id=_qwen_tokens(tok)["image_token_id"],
        use_cache=True,
        vocab_size=thinker["vocab_size"],
        eos_token_id=[tok.eos_token_id, tok.pad_token_id],
        pad_token_id=tok.pad_token_id,
        torch_dtype="bfloat16",
    )


HEAD_ALIASES = ("lm_head.weight", "model.thinker.lm_head.weight")


def official_dpa_tensors(heads: tuple[str, ...] = HEAD_ALIASES, seed: int = 3) -> dict[str, torch.Tensor]:
    """Every tensor of the DPA model under its official names; the thinker ties its head (Qwen3-4B does), stored
    as equal copies under `heads` (any of its alias names, or none)."""
    import transformers as tf

    torch.manual_seed(seed)
    thinker = tf.Qwen3ForCausalLM(tf.Qwen3Config(**_hub_config(THINKER)))
    d_p, d_t = _hub_config(PERCEIVER_LM)["hidden_size"], thinker.config.hidden_size
    phi = torch.nn.Sequential(torch.nn.Linear(d_p, d_p), torch.nn.ReLU(), torch.nn.Linear(d_p, d_t))
    tensors = {f"model.perceiver.{k}": v for k, v in baseline_tensors().items()}
    tensors.update({f"model.thinker.model.{k}": v for k, v in thinker.model.state_dict().items()})
    tensors.update({f"model.linear_align_dim.{k}": v for k, v in phi.state_dict().items()})
    tensors.update({name: thinker.lm_head.weight for name in heads})
    return tensors


def build_official_dpa(
    folder: Path,
    storage: str = "safetensors",
    heads: tuple[str, ...] = HEAD_ALIASES,
    dtype: torch.dtype = torch.bfloat16,
) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.to(dtype) for k, v in official_dpa_tensors(heads).items()}
    _save(folder, tensors, storage)
    _files(folder, official_dpa_config(), (FVT_MODULE, LB_MODULE), "qwen2")
    return folder
