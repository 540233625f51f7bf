"""The DPA paper's skeleton from transformers' own classes: Qwen2.5-VL's ViT, merger and `get_rope_index`, with
Qwen3 decoder layers (q/k norm, no bias, explicit head_dim) driven by Qwen2.5-VL's M-RoPE.

Official: `modeling_llava_baseline.py` (LB) swaps `Qwen2_5_VLModel.language_model` for a Qwen3 model whose
rotary is `Qwen2_5_VLRotaryEmbedding` (LB:548-557). In transformers 5 that rotary already folds the t/h/w
sections into cos/sin `[batch, seq, head_dim]`, so Qwen3's attention applies them unchanged, and
`Qwen2_5_VLTextModel.forward` routes the `[3, batch, seq]` ids to the rotary only (the mask and the attention
kernels get the 1-D text positions, or None). So the text model below is `Qwen2_5_VLTextModel` with Qwen3
layers; nothing of the forward is rewritten. Shipped as remote code, so it imports only torch and transformers.
"""

from torch import nn
from transformers import AutoModel, AutoModelForImageTextToText
from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import (
    Qwen2_5_VisionTransformerPretrainedModel,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2_5_VLModel,
    Qwen2_5_VLPreTrainedModel,
    Qwen2_5_VLRotaryEmbedding,
    Qwen2_5_VLTextModel,
)
from transformers.models.qwen3.modeling_qwen3 import Qwen3Attention, Qwen3DecoderLayer, Qwen3RMSNorm

from .configuration_paper_dpa import Qwen2_5_VLQwen3Config, Qwen2_5_VLQwen3TextConfig

_NO_SPLIT = ["Qwen3DecoderLayer", "Qwen2_5_VLVisionBlock"]


class Qwen2_5_VLQwen3TextModel(Qwen2_5_VLTextModel):
    """Qwen3 blocks under Qwen2.5-VL's M-RoPE: `inputs_embeds` `[batch, seq, d]` and `position_ids`
    `[3, batch, seq]` (or `[4, ...]` with the text row first, as Qwen2.5-VL packs them) -> `[batch, seq, d]`."""

    config: Qwen2_5_VLQwen3TextConfig
    config_class = Qwen2_5_VLQwen3TextConfig
    _no_split_modules = ["Qwen3DecoderLayer"]
    _can_record_outputs = {"hidden_states": Qwen3DecoderLayer, "attentions": Qwen3Attention}

    def __init__(self, config: Qwen2_5_VLQwen3TextConfig):
        # The parent's __init__ would build Qwen2.5 layers first: build the same attributes with Qwen3 parts.
        Qwen2_5_VLPreTrainedModel.__init__(self, config)
        self.padding_idx = config.pad_token_id
        self.vocab_size = config.vocab_size
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, self.padding_idx)
        self.layers = nn.ModuleList([Qwen3DecoderLayer(config, i) for i in range(config.num_hidden_layers)])
        self._attn_implementation = config._attn_implementation
        self.norm = Qwen3RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.has_sliding_layers = "sliding_attention" in config.layer_types
        # theta and head_dim from this config, the sections from `rope_parameters["mrope_section"]` (LB:552-557).
        self.rotary_emb = Qwen2_5_VLRotaryEmbedding(config=config)
        self.gradient_checkpointing = False
        self.post_init()


class Qwen2_5_VLQwen3Model(Qwen2_5_VLModel):
    """Qwen2.5-VL's base model (ViT, merger, image scatter, `get_rope_index`) around the Qwen3 text model."""

    config: Qwen2_5_VLQwen3Config
    config_class = Qwen2_5_VLQwen3Config
    _no_split_modules = _NO_SPLIT

    def __init__(self, config: Qwen2_5_VLQwen3Config):
        Qwen2_5_VLPreTrainedModel.__init__(self, config)
        self.visual = Qwen2_5_VisionTransformerPretrainedModel._from_config(config.vision_config)
        self.language_model = Qwen2_5_VLQwen3TextModel._from_config(config.text_config)
        self.rope_deltas = None
        self.post_init()


class Qwen2_5_VLQwen3ForConditionalGeneration(Qwen2_5_VLForConditionalGeneration):
    """The skeleton with its LM head: the paper's baseline target (`qwen_custom_vl_hw_new`) as a VLM of its own."""

    config: Qwen2_5_VLQwen3Config
    config_class = Qwen2_5_VLQwen3Config
    _no_split_modules = _NO_SPLIT

    def __init__(self, config: Qwen2_5_VLQwen3Config):
        Qwen2_5_VLPreTrainedModel.__init__(self, config)
        self.model = Qwen2_5_VLQwen3Model(config)
        self.lm_head = nn.Linear(config.text_config.hidden_size, config.text_config.vocab_size, bias=False)
        self.post_init()


# Registered on import, so the DPA model's `AutoModel.from_config(perceiver_config)` builds this class, also when
# this file runs as an exported checkpoint's remote code.
AutoModel.register(Qwen2_5_VLQwen3Config, Qwen2_5_VLQwen3Model, exist_ok=True)
AutoModel.register(Qwen2_5_VLQwen3TextConfig, Qwen2_5_VLQwen3TextModel, exist_ok=True)
AutoModelForImageTextToText.register(Qwen2_5_VLQwen3Config, Qwen2_5_VLQwen3ForConditionalGeneration, exist_ok=True)

__all__ = ["Qwen2_5_VLQwen3ForConditionalGeneration", "Qwen2_5_VLQwen3Model", "Qwen2_5_VLQwen3TextModel"]
