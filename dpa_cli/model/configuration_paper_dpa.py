"""Configuration of the DPA paper's skeleton: a Qwen2.5-VL vision tower + a Qwen3 language model with M-RoPE.

All three checkpoints of the paper share it (the baseline target, the perceiver and the DPA model's perceiver;
official `modeling_llava_baseline.py` `LLaVABaselineModel`). transformers has no such class: a `qwen2_5_vl`
config builds Qwen2.5 blocks (q/k/v bias, no q/k norm), a `qwen3` one 1-D RoPE. Shipped as remote code next to
upgraded checkpoints, so it imports only transformers.
"""

from transformers import AutoConfig, Qwen2_5_VLConfig, Qwen3Config
from transformers.models.qwen2_5_vl.configuration_qwen2_5_vl import Qwen2_5_VLVisionConfig

MODEL_TYPE = "qwen2_5_vl_qwen3"
TEXT_MODEL_TYPE = "qwen2_5_vl_qwen3_text"


class Qwen2_5_VLQwen3TextConfig(Qwen3Config):
    r"""
    A Qwen3 language model (q/k RMSNorm, no attention bias, explicit `head_dim`) whose rotary embedding is
    Qwen2.5-VL's multimodal one: `rope_parameters["mrope_section"]` splits the `head_dim / 2` frequencies into
    temporal, height and width sections, each driven by one row of the `[3, batch, seq]` position ids.
    """

    model_type = TEXT_MODEL_TYPE
    base_config_key = "text_config"
    # `mrope_section` is not a standard RoPE key; Qwen2.5-VL's text config declares it the same way.
    ignore_keys_at_rope_validation = {"mrope_section"}

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        section = self.rope_parameters["mrope_section"]
        if 2 * sum(section) != self.head_dim:
            raise ValueError(
                f"{type(self).__name__}: mrope_section {list(section)} covers {2 * sum(section)} rotary dims, "
                f"but head_dim is {self.head_dim}."
            )

    def convert_rope_params_to_dict(self, **kwargs):
        # Qwen2.5-VL configs say `rope_scaling: {type: "mrope" | "default", mrope_section: [...]}`: "mrope" is plain
        # RoPE frequencies recomposed per section, i.e. rope_type "default" (as Qwen2_5_VLTextConfig reads it).
        # Theta and the rest are then read as Qwen3Config reads them.
        rope = dict(kwargs.pop("rope_scaling", None) or self.rope_parameters or {})
        kind = rope.pop("type", None)
        rope.setdefault("rope_type", kind or "default")
        if rope["rope_type"] == "mrope":
            rope["rope_type"] = "default"
        # Qwen2.5-VL's sections for head_dim 128 (its rotary's default too); any other head_dim must name its own.
        rope.setdefault("mrope_section", [16, 24, 24])
        self.rope_parameters = rope
        return super().convert_rope_params_to_dict(**kwargs)


class Qwen2_5_VLQwen3Config(Qwen2_5_VLConfig):
    r"""
    The paper's skeleton: `vision_config` is a stock Qwen2.5-VL ViT whose merger outputs the LM width
    (`out_hidden_size == text_config.hidden_size`: the "rebuilt merger" Linear(4d, 4d) -> GELU -> Linear(4d, d_lm)
    is the stock merger at that width, so `out_hidden_size` follows the text width), `text_config` a
    `Qwen2_5_VLQwen3TextConfig`. Token ids as Qwen2.5-VL's.
    """

    model_type = MODEL_TYPE
    sub_configs_defaults = {"vision_config": Qwen2_5_VLVisionConfig, "text_config": Qwen2_5_VLQwen3TextConfig}

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        # The merger outputs the LM width, as the official config class forces it (qwen_config_dir/
        # modeling_qwen_custom_vl_hw.py:372-381); weights of another width are refused by their shapes.
        self.vision_config.out_hidden_size = self.text_config.hidden_size


# Registered on import: the DPA config resolves its perceiver_config's model_type through AutoConfig, also when
# this file runs as an exported checkpoint's remote code.
AutoConfig.register(TEXT_MODEL_TYPE, Qwen2_5_VLQwen3TextConfig, exist_ok=True)
AutoConfig.register(MODEL_TYPE, Qwen2_5_VLQwen3Config, exist_ok=True)

__all__ = ["Qwen2_5_VLQwen3Config", "Qwen2_5_VLQwen3TextConfig"]
