"""Tiny real checkpoints of every supported family, built from configs in milliseconds, no network.

Each spec builds a random model with the real transformers class from a tiny config whose vocab equals
`len(tokenizer)`, and saves it like the hub repos, with tokenizer, chat template and processor files.
`build(name, folder, layout=...)` picks the key names on disk:

- "hub" (default): the names real hub repos hold. For most families that is what v5's `save_pretrained`
  writes; for the llava family real repos nest the ViT once more (`vision_tower.vision_model.*`), which
  v5 no longer writes, so it is added back (transformers loads both).
- "save_pretrained": exactly what transformers 5.23 `save_pretrained` writes.
- "v5": the in-memory `named_parameters` names (tied copies dropped), as `save_file` would write them.

Keys on disk, observed with transformers 5.23 (N = layer index):

| family (spec)          | "save_pretrained" / "hub" on disk                          | "v5" in memory                |
|------------------------|------------------------------------------------------------|-------------------------------|
| llava, llava_next,     | language_model.model.{embed_tokens,layers.N,norm}          | model.language_model.*        |
| llava_onevision        | language_model.lm_head.weight (absent when tied)           | lm_head.weight                |
|                        | vision_tower.{embeddings,encoder.layers.N,...} (v5 save)   | model.vision_tower.*          |
|                        | vision_tower.vision_model.* (hub repos)                    |                               |
|                        | multi_modal_projector.linear_{1,2}.*, image_newline (NeXT) | model.multi_modal_projector.* |
| qwen2_vl, qwen2_5_vl   | model.{embed_tokens,layers.N,norm}, visual.{patch_embed,   | model.language_model.*,       |
|                        | blocks.N,merger.*}, lm_head.weight (absent when tied)      | model.visual.*, lm_head       |
| qwen3_vl               | model.language_model.*, model.visual.{blocks.N,merger,     | same names                    |
|                        | deepstack_merger_list.N,pos_embed,patch_embed}, lm_head    |                               |
| idefics3, smolvlm      | model.{vision_model,connector.modality_projection,         | same names                    |
|                        | text_model}.*, lm_head.weight (absent when tied)           |                               |
| causal_lm              | model.{embed_tokens,layers.N,norm}, lm_head (absent tied)  | same names                    |
| llava_original (no HF  | model.{embed_tokens,layers.N,norm}, lm_head.weight,        | (written by hand)             |
| class)                 | model.mm_projector.{0,2}.*, model.image_newline,           |                               |
|                        | model.vision_tower.vision_tower.vision_model.*             |                               |
| dpa (by hand, like     | model.perceiver.{visual,language_model}.*, lm_head,        | same names                    |
| DPAForConditionalGen.) | model.multi_modal_projector.linear_{1,2}.*,                |                               |
|                        | model.language_model.*                                     |                               |

Tied embeddings: `save_pretrained` drops the tied `lm_head.weight`, so tied checkpoints have no LM head.

Public API: `SPECS` (name -> TinySpec), `tiny_config`, `tiny_model`, `build`, `build_sharded`,
`example_inputs`, `read_keys`, `read_tensors`, `write_weights`, `copy_checkpoint`. Tokenizers live in
tests/tiny_tokenizers.py, processor files and model inputs in tests/tiny_processors.py.
"""

from __future__ import annotations

import copy
import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import transformers as tf
from huggingface_hub import save_torch_state_dict
from safetensors import safe_open

from tests import tiny_processors
from tests.tiny_processors import (
    PINPOINTS,
    clip_images,
    idefics3_processor,
    llava_processor,
    next_images,
    onevision_processor,
    qwen_processor,
    smolvlm_processor,
    tokenizer_only,
)
from tests.tiny_tokenizers import tiny_tokenizer

# --- sub-configs: tiny but with every shape constraint of the real ones ---------------------------------
_ROPE = {"rope_type": "default", "rope_theta": 10000.0}


def _text(kind: str, tok: Any, hidden: int = 64, tie: bool = True, **kw: Any) -> dict[str, Any]:
    """A tiny text config dict of `kind` (qwen3, qwen2, llama) sized to the tokenizer's vocab."""
    heads = 4
    cfg = dict(
        model_type=kind,
        vocab_size=len(tok),
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=2,
        num_attention_heads=heads,
        num_key_value_heads=2,
        head_dim=hidden // heads,
        max_position_embeddings=512,
        tie_word_embeddings=tie,
        rope_parameters=dict(_ROPE),
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    cfg.update(kw)
    return cfg


def _mrope(hidden: int, **extra: Any) -> dict[str, Any]:
    """M-RoPE sections (temporal, height, width) must add up to head_dim / 2."""
    half = hidden // 4 // 2
    return {**_ROPE, "mrope_section": [1, 1, half - 2], **extra}


def _vit(model_type: str, **kw: Any) -> dict[str, Any]:
    cfg = dict(
        model_type=model_type,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        image_size=28,
        patch_size=14,
    )
    cfg.update(kw)
    return cfg


def _ids(tok: Any, *tokens: str) -> list[int]:
    return [tok.convert_tokens_to_ids(t) for t in tokens]


# --- top-level configs, one function per spec ----------------------------------------------------------
def _llava(tok: Any, text: str = "qwen3", tie: bool = True) -> dict[str, Any]:
    return dict(
        vision_config=_vit("clip_vision_model", projection_dim=32),
        text_config=_text(text, tok, tie=tie),
        image_token_index=_ids(tok, "<image>")[0],
        image_seq_length=4,
        tie_word_embeddings=tie,
        vision_feature_select_strategy="default",
        vision_feature_layer=-2,
    )


def _llava_next(tok: Any) -> dict[str, Any]:
    return {**_llava(tok), "image_grid_pinpoints": PINPOINTS}


def _llava_onevision(tok: Any) -> dict[str, Any]:
    image, video = _ids(tok, "<image>", "<video>")
    vision = _vit("siglip_vision_model", vision_use_head=False)  # OneVision drops SigLIP's pooling head
    return dict(
        vision_config=vision,
        text_config=_text("qwen2", tok, tie=False),
        image_token_index=image,
        video_token_index=video,
        image_grid_pinpoints=PINPOINTS,
        vision_feature_select_strategy="full",
        vision_feature_layer=-1,
        tie_word_embeddings=False,
    )


def _qwen_tokens(tok: Any) -> dict[str, int]:
    image, video, start, end = _ids(tok, "<|image_pad|>", "<|video_pad|>", "<|vision_start|>", "<|vision_end|>")
    return dict(image_token_id=image, video_token_id=video, vision_start_token_id=start, vision_end_token_id=end)


def _qwen2_vl(tok: Any) -> dict[str, Any]:
    # Qwen2-VL's vision `hidden_size` is the merger output: it must equal the text width.
    vision = dict(depth=2, embed_dim=32, hidden_size=32, num_heads=4, mlp_ratio=2, patch_size=14)
    text = _text("qwen2_vl_text", tok, hidden=32, tie=False, rope_parameters=_mrope(32))
    return dict(vision_config=vision, text_config=text, tie_word_embeddings=False, **_qwen_tokens(tok))


def _qwen2_5_vl(tok: Any) -> dict[str, Any]:
    vision = dict(
        depth=2,
        hidden_size=32,
        intermediate_size=64,
        num_heads=4,
        out_hidden_size=32,
        patch_size=14,
        window_size=56,
        fullatt_block_indexes=[1],
    )
    text = _text("qwen2_5_vl_text", tok, hidden=32, tie=True, rope_parameters=_mrope(32))
    return dict(vision_config=vision, text_config=text, tie_word_embeddings=True, **_qwen_tokens(tok))


def _qwen3_vl(tok: Any) -> dict[str, Any]:
    vision = dict(
        depth=2,
        hidden_size=32,
        intermediate_size=64,
        num_heads=4,
        out_hidden_size=32,
        patch_size=16,
        num_position_embeddings=16,
        deepstack_visual_indexes=[0],
    )
    text = _text("qwen3_vl_text", tok, hidden=32, tie=True, rope_parameters=_mrope(32, mrope_interleaved=True))
    return dict(vision_config=vision, text_config=text, tie_word_embeddings=True, **_qwen_tokens(tok))


def _paper_vl(tok: Any, tie: bool = True) -> dict[str, Any]:
    """The DPA paper's skeleton: Qwen2.5-VL ViT, merger out at the LM width, Qwen3 blocks (head_dim 16 x 4 heads
    != width 32, as Qwen3-0.6B's 128 x 16 != 1024) with M-RoPE sections adding up to head_dim / 2."""
    vision = dict(
        depth=2,
        hidden_size=32,
        intermediate_size=64,
        num_heads=4,
        out_hidden_size=32,
        patch_size=14,
        window_size=56,
        fullatt_block_indexes=[1],
    )
    rope = {**_ROPE, "mrope_section": [2, 3, 3]}
    text = _text("qwen2_5_vl_qwen3_text", tok, hidden=32, tie=tie, head_dim=16, rope_parameters=rope)
    return dict(vision_config=vision, text_config=text, tie_word_embeddings=tie, **_qwen_tokens(tok))


def _idefics3(tok: Any, tie: bool = False) -> dict[str, Any]:
    # 56 px tiles of 14 px patches, pixel-shuffled by 2: 4 image tokens per tile.
    vision = dict(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=56, patch_size=14
    )
    text = _text("llama", tok, hidden=32, tie=tie)
    return dict(
        vision_config=vision,
        text_config=text,
        image_token_id=_ids(tok, "<image>")[0],
        scale_factor=2,
        tie_word_embeddings=tie,
    )


def _causal_lm(kind: str, tie: bool) -> Callable[[Any], dict[str, Any]]:
    return lambda tok: _text(kind, tok, tie=tie)


# --- the registry --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class TinySpec:
    """How to build one tiny checkpoint: its family, tokenizer kind, config, classes and extra files.

    Classes are named, not imported, so importing this module does not import every model family.
    """

    family: str
    tokenizer: str
    config: Callable[[Any], dict[str, Any]]
    prefix: str | None = None  # transformers class prefix: "Llava" -> LlavaConfig, Llava<model_suffix>
    model_suffix: str = "ForConditionalGeneration"
    save_processor: Callable[[Path, Any, Any], None] = tokenizer_only
    writer: Callable[[TinySpec, Path, dict[str, Any]], None] | None = None  # for layouts HF has no class for
    options: dict[str, Any] = field(default_factory=dict)

    @property
    def config_class(self) -> type | None:
        return _class(f"{self.prefix}Config") if self.prefix else None

    @property
    def model_class(self) -> type | None:
        return _class(f"{self.prefix}{self.model_suffix}") if self.prefix else None


def _class(name: str) -> type:
    """A transformers class by name; dpa's own model classes (the paper skeleton) are looked up there."""
    import dpa_cli.model

    return getattr(tf, name, None) or getattr(dpa_cli.model, name)


def _spec(
    family: str,
    tokenizer: str,
    config: Callable,
    prefix: str,
    processor: Callable = tokenizer_only,
    model: str = "ForConditionalGeneration",
) -> TinySpec:
    return TinySpec(family, tokenizer, config, prefix, model, processor)


def _deep_merge(base: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for key, value in overrides.items():
        out[key] = _deep_merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def tiny_config(name: str, **overrides: Any) -> Any:
    """The spec's config: a transformers `PreTrainedConfig`, or a plain dict for families transformers
    has no class for (llava_original, dpa). Nested dict overrides merge into sub-configs."""
    spec = SPECS[name]
    kwargs = _deep_merge(spec.config(tiny_tokenizer(spec.tokenizer)), overrides)
    return spec.config_class(**kwargs) if spec.config_class else kwargs


def tiny_model(name: str, seed: int = 0, **overrides: Any) -> torch.nn.Module:
    """A random model of the spec's real transformers class (not for llava_original / dpa)."""
    spec = SPECS[name]
    if spec.model_class is None:
        raise ValueError(f"{name} has no transformers class; use build()")
    torch.manual_seed(seed)
    return spec.model_class(tiny_config(name, **overrides)).eval()


def _unique_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """In-memory names, each storage once: a tied lm_head shares the embedding and is dropped, as HF does."""
    seen: set[int] = set()
    out: dict[str, torch.Tensor] = {}
    for name, tensor in model.state_dict().items():
        if tensor.data_ptr() not in seen:
            seen.add(tensor.data_ptr())
            out[name] = tensor.detach().contiguous()
    return out


def write_weights(folder: Path, tensors: dict[str, torch.Tensor], max_shard_size: int | str = "5GB") -> None:
    """Safetensors with HF shard names and index (`model-00001-of-00002.safetensors`), format metadata."""
    for old in [*folder.glob("model*.safetensors"), *folder.glob("model.safetensors.index.json")]:
        old.unlink()
    save_torch_state_dict(tensors, folder, max_shard_size=max_shard_size, metadata={"format": "pt"})


def read_tensors(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a folder's safetensors files (tiny checkpoints only: this reads the data)."""
    out: dict[str, torch.Tensor] = {}
    for path in sorted(Path(folder).glob("*.safetensors")):
        with safe_open(str(path), "pt") as handle:
            out.update({key: handle.get_tensor(key) for key in handle.keys()})
    return out


def read_keys(folder: Path) -> dict[str, list[int]]:
    """Key -> shape of every tensor on disk, from the headers."""
    out: dict[str, list[int]] = {}
    for path in sorted(Path(folder).glob("*.safetensors")):
        with safe_open(str(path), "pt") as handle:
            out.update({key: list(handle.get_slice(key).get_shape()) for key in handle.keys()})
    return out


def _hub_vit_names(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """llava-hf repos store the CLIP/SigLIP tower as `vision_tower.vision_model.*`."""
    return {
        f"vision_tower.vision_model.{k[len('vision_tower.') :]}" if k.startswith("vision_tower.") else k: v
        for k, v in tensors.items()
    }


def _save_hf(spec: TinySpec, folder: Path, opts: dict[str, Any]) -> None:
    torch.manual_seed(opts["seed"])
    model = spec.model_class(spec.config_class(**opts["config"])).eval()
    shard = opts["max_shard_size"]
    if opts["layout"] == "v5":
        model.config.save_pretrained(folder)
        model.generation_config.save_pretrained(folder)
        write_weights(folder, _unique_state_dict(model), shard)
        return
    model.save_pretrained(folder, max_shard_size=shard)
    if opts["layout"] == "hub" and spec.family in ("llava", "llava_next", "llava_onevision"):
        write_weights(folder, _hub_vit_names(read_tensors(folder)), shard)


# --- original LLaVA repos and DPA: no transformers class, written by hand from real parts ---------------
_ORIGINAL_TEXT = {"LlavaLlamaForCausalLM": "llama", "LlavaQwenForCausalLM": "qwen2"}


def _original(arch: str, model_type: str, text: str, tower: str, anyres: bool) -> Callable[[Any], dict[str, Any]]:
    """Config of an original-repo LLaVA: the LM's fields at the top, the ViT only by hub id."""

    def config(tok: Any) -> dict[str, Any]:
        fields = tf.AutoConfig.for_model(
            text, **{k: v for k, v in _text(text, tok, tie=False).items() if k != "model_type"}
        ).to_dict()
        mm = dict(
            mm_vision_tower=tower,
            mm_hidden_size=32,
            mm_projector_type="mlp2x_gelu",
            mm_vision_select_layer=-2,
            mm_vision_select_feature="patch",
            mm_use_im_start_end=False,
            mm_use_im_patch_token=False,
            use_mm_proj=True,
            tune_mm_mlp_adapter=False,
            freeze_mm_mlp_adapter=False,
            image_aspect_ratio="anyres" if anyres else "pad",
            tokenizer_model_max_length=2048,
        )
        if anyres:
            mm.update(mm_patch_merge_type="spatial_unpad", image_grid_pinpoints=PINPOINTS)
        return {**fields, **mm, "model_type": model_type, "architectures": [arch]}

    return config


def original_vit(tower: str) -> torch.nn.Module:
    """The tower the hub id names, tiny: CLIP for openai/clip-*, SigLIP for google/siglip-*."""
    if "siglip" in tower:
        return tf.SiglipVisionModel(tf.SiglipVisionConfig(**_vit("siglip_vision_model", vision_use_head=False)))
    return tf.CLIPVisionModel(tf.CLIPVisionConfig(**_vit("clip_vision_model")))


def _write_original(spec: TinySpec, folder: Path, opts: dict[str, Any]) -> None:
    """LlavaLlama / LlavaQwen layout: LM keys at `model.*`, projector `model.mm_projector.{0,2}`, ViT at
    `model.vision_tower.vision_tower.vision_model.*` (v5 CLIP keeps no `vision_model.` prefix in memory)."""
    config, seed = opts["config"], opts["seed"]
    torch.manual_seed(seed)
    text_fields = {k: v for k, v in config.items() if k not in ("model_type", "architectures")}
    lm = tf.AutoModelForCausalLM.from_config(
        tf.AutoConfig.for_model(_ORIGINAL_TEXT[config["architectures"][0]], **text_fields)
    )
    tensors = _unique_state_dict(lm)
    hidden, width = config["hidden_size"], config["mm_hidden_size"]
    projector = torch.nn.Sequential(torch.nn.Linear(width, hidden), torch.nn.GELU(), torch.nn.Linear(hidden, hidden))
    tensors.update({f"model.mm_projector.{k}": v for k, v in projector.state_dict().items()})
    if spec.options.get("vision_weights", True):
        vit = original_vit(config["mm_vision_tower"])
        tensors.update({f"model.vision_tower.vision_tower.vision_model.{k}": v for k, v in vit.state_dict().items()})
    if config.get("image_aspect_ratio") == "anyres":
        tensors["model.image_newline"] = torch.randn(hidden)
    (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    write_weights(folder, tensors, opts["max_shard_size"])


def _dpa(tok: Any) -> dict[str, Any]:
    """A DPA checkpoint's config: Qwen2.5-VL perceiver (width 32) -> phi -> Qwen3 target (width 64)."""
    perceiver = tf.Qwen2_5_VLConfig(**_qwen2_5_vl(tok)).to_dict()
    target = tf.Qwen3Config(**{k: v for k, v in _text("qwen3", tok).items() if k != "model_type"}).to_dict()
    qwen = _qwen_tokens(tok)
    return dict(
        model_type="dpa",
        architectures=["DPAForConditionalGeneration"],
        perceiver_config=perceiver,
        text_config=target,
        projector_type="mlp2x_relu",
        projector_bias=True,
        feature_span="image",
        early_fusion=False,
        image_token_id=_ids(tok, "<image>")[0],
        perceiver_image_token_id=qwen["image_token_id"],
        perceiver_marker_token_ids=[qwen["vision_start_token_id"], qwen["vision_end_token_id"]],
        tie_word_embeddings=target["tie_word_embeddings"],
    )


def _write_dpa(spec: TinySpec, folder: Path, opts: dict[str, Any]) -> None:
    """The names `DPAForConditionalGeneration` holds: the perceiver's *base* model (no LM head) under
    `model.perceiver.`, phi under `model.multi_modal_projector.`, the target under `model.language_model.`."""
    config = opts["config"]
    torch.manual_seed(opts["seed"])
    perceiver = tf.AutoModel.from_config(tf.AutoConfig.for_model(**config["perceiver_config"]))
    target = tf.AutoModel.from_config(tf.AutoConfig.for_model(**config["text_config"]))
    d_p = config["perceiver_config"]["text_config"]["hidden_size"]
    d_t, vocab = config["text_config"]["hidden_size"], config["text_config"]["vocab_size"]
    tensors = {f"model.perceiver.{k}": v for k, v in _unique_state_dict(perceiver).items()}
    phi = {"linear_1": torch.nn.Linear(d_p, d_p), "linear_2": torch.nn.Linear(d_p, d_t)}
    for name, linear in phi.items():
        tensors.update({f"model.multi_modal_projector.{name}.{k}": v for k, v in linear.state_dict().items()})
    tensors.update({f"model.language_model.{k}": v for k, v in _unique_state_dict(target).items()})
    if not config["tie_word_embeddings"]:
        tensors["lm_head.weight"] = torch.randn(vocab, d_t) * 0.02
    (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    write_weights(folder, tensors, opts["max_shard_size"])


def _hand(family: str, tokenizer: str, config: Callable, writer: Callable, **options: Any) -> TinySpec:
    return TinySpec(family, tokenizer, config, writer=writer, options=options)


_CLIP_ID, _SIGLIP_ID = "openai/clip-vit-large-patch14-336", "google/siglip-so400m-patch14-384"

# Spec name -> how to build it. Several specs may share a family (LLaVA with Qwen3 or Llama-3 text).
SPECS: dict[str, TinySpec] = {
    "llava": _spec("llava", "qwen3_llava", _llava, "Llava", llava_processor("LlavaProcessor", clip_images)),
    "llava_llama3": _spec(
        "llava",
        "llama3",
        lambda tok: _llava(tok, "llama", tie=False),
        "Llava",
        llava_processor("LlavaProcessor", clip_images),
    ),
    "llava_next": _spec(
        "llava_next", "qwen3_llava", _llava_next, "LlavaNext", llava_processor("LlavaNextProcessor", next_images)
    ),
    "llava_onevision": _spec("llava_onevision", "qwen2_llava", _llava_onevision, "LlavaOnevision", onevision_processor),
    "qwen2_vl": _spec("qwen2_vl", "qwen2", _qwen2_vl, "Qwen2VL", qwen_processor("Qwen2VLProcessor", 14)),
    "qwen2_5_vl": _spec("qwen2_5_vl", "qwen2", _qwen2_5_vl, "Qwen2_5_VL", qwen_processor("Qwen2_5_VLProcessor", 14)),
    "qwen3_vl": _spec("qwen3_vl", "qwen3_vl", _qwen3_vl, "Qwen3VL", qwen_processor("Qwen3VLProcessor", 16)),
    "paper_vl": _spec(
        "qwen2_5_vl_qwen3", "qwen3", _paper_vl, "Qwen2_5_VLQwen3", qwen_processor("Qwen2_5_VLProcessor", 14)
    ),
    "idefics3": _spec("idefics3", "idefics3", _idefics3, "Idefics3", idefics3_processor),
    "smolvlm": _spec("smolvlm", "smolvlm", lambda tok: _idefics3(tok, tie=True), "SmolVLM", smolvlm_processor),
    "causal_lm_qwen3": _spec("causal_lm", "qwen3", _causal_lm("qwen3", tie=True), "Qwen3", model="ForCausalLM"),
    "causal_lm_llama": _spec("causal_lm", "llama3", _causal_lm("llama", tie=False), "Llama", model="ForCausalLM"),
    "llava_original_llama": _hand(
        "llava_original",
        "vicuna",
        _original("LlavaLlamaForCausalLM", "llava_llama", "llama", _CLIP_ID, anyres=True),
        _write_original,
    ),
    "llava_original_qwen": _hand(
        "llava_original",
        "qwen2_llava",
        _original("LlavaQwenForCausalLM", "llava_qwen", "qwen2", _SIGLIP_ID, anyres=True),
        _write_original,
    ),
    # LLaVA-1.5 repos: model_type "llava", no ViT weights (they load from mm_vision_tower at run time).
    "llava_v15": _hand(
        "llava_original",
        "vicuna",
        _original("LlavaLlamaForCausalLM", "llava", "llama", _CLIP_ID, anyres=False),
        _write_original,
        vision_weights=False,
    ),
    "dpa": _hand("dpa", "qwen3_llava", _dpa, _write_dpa),
}

LAYOUTS = ("hub", "save_pretrained", "v5")


def build(
    name: str, folder: Path, *, layout: str = "hub", max_shard_size: int | str = "5GB", seed: int = 0, **overrides: Any
) -> Path:
    """Write the tiny checkpoint `name` (see SPECS) into `folder`: weights, config, tokenizer, processor."""
    if layout not in LAYOUTS:
        raise ValueError(f"layout {layout!r} is not one of {LAYOUTS}")
    spec, folder = SPECS[name], Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tok = tiny_tokenizer(spec.tokenizer)
    kwargs = _deep_merge(spec.config(tok), overrides)
    opts = dict(layout=layout, max_shard_size=max_shard_size, seed=seed, config=kwargs)
    (spec.writer or _save_hf)(spec, folder, opts)
    spec.save_processor(folder, tok, spec.config_class(**kwargs) if spec.config_class else kwargs)
    return folder


def build_sharded(name: str, folder: Path, max_shard_size: int | str = "20KB", **kwargs: Any) -> Path:
    """Like `build`, split into several shards with a `model.safetensors.index.json`."""
    return build(name, folder, max_shard_size=max_shard_size, **kwargs)


def copy_checkpoint(source: Path, folder: Path) -> Path:
    """A private copy of a built checkpoint, for tests that damage it."""
    shutil.copytree(source, folder)
    return Path(folder)


def example_inputs(name: str, folder: Path, model: Any) -> dict[str, torch.Tensor]:
    """Model inputs for one image + one question, built from the files saved in `folder`."""
    return tiny_processors.example_inputs(SPECS[name].family, folder, model)


# --- a Hugging Face cache holding tiny repos under real hub ids ------------------------------------------------
def add_to_hub_cache(cache: Path, repo_id: str, folder: Path, commit: str = "c0ffee" * 6 + "abcd") -> Path:
    """Lay `folder`'s files out as huggingface_hub caches `repo_id`: blobs, refs/main, a snapshot of links."""
    import hashlib

    repo = Path(cache) / ("models--" + repo_id.replace("/", "--"))
    snapshot = repo / "snapshots" / commit
    for path in sorted(p for p in Path(folder).rglob("*") if p.is_file()):
        data = path.read_bytes()
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        link = snapshot / path.relative_to(folder)
        link.parent.mkdir(parents=True, exist_ok=True)
        depth = len(path.relative_to(folder).parts) - 1  # snapshots/<commit>/a/b -> ../../../blobs
        link.symlink_to(Path(*[".."] * (depth + 2), "blobs", blob.name))
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / "main").write_text(commit)
    return snapshot


# The hub ids the DPA paper's checkpoints name, as tiny stand-ins: Qwen2.5-VL-3B's text is 64 wide with head_dim
# 16 so its M-RoPE sections fit the tiny Qwen3s (head_dim 16 x 4 heads, wider than their width as the real ones).
PAPER_REPOS: dict[str, tuple[str, dict[str, Any]]] = {
    "Qwen/Qwen2.5-VL-3B-Instruct": (
        "qwen2_5_vl",
        dict(
            text_config=dict(
                hidden_size=64,
                intermediate_size=128,
                head_dim=16,
                rope_parameters={**_ROPE, "mrope_section": [2, 3, 3]},
            ),
            vision_config=dict(out_hidden_size=64),
        ),
    ),
    "Qwen/Qwen3-0.6B": ("causal_lm_qwen3", dict(hidden_size=32, intermediate_size=64, head_dim=16)),
    "Qwen/Qwen3-4B": ("causal_lm_qwen3", {}),
}


def paper_hub_cache(root: Path) -> Path:
    """A hub cache (for HF_HUB_CACHE) with PAPER_REPOS built as tiny checkpoints; returns the cache folder."""
    cache = Path(root) / "hub"
    for repo_id, (spec, overrides) in PAPER_REPOS.items():
        folder = build(spec, Path(root) / "repos" / repo_id.replace("/", "--"), seed=len(repo_id), **overrides)
        add_to_hub_cache(cache, repo_id, folder)
    return cache
