"""Analytic FLOPs of a prompt with one image, original LLaVA-style VLM vs its DPA upgrade, from configs alone.

Counted the way torch's FlopCounterMode counts (`dpa_cli.flops`): 2*m*n*k per matmul, convolutions, and
attention as two full `[s_q, d] x [d, s_k]` products per head (causal masking does not halve it there).
Norms, activations and RoPE are left out, as the counter leaves them out. The paper's 4B and 32B setups are
written below as the configs of the real checkpoints: no download, no weights.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

# Text configs of the real checkpoints (config.json of Qwen/Qwen3-0.6B, Qwen/Qwen3-4B, Qwen/Qwen3-32B).
QWEN3_0_6B = {
    "hidden_size": 1024,
    "num_hidden_layers": 28,
    "intermediate_size": 3072,
    "num_attention_heads": 16,
    "num_key_value_heads": 8,
    "head_dim": 128,
    "vocab_size": 151936,
}
QWEN3_4B = {
    "hidden_size": 2560,
    "num_hidden_layers": 36,
    "intermediate_size": 9728,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "head_dim": 128,
    "vocab_size": 151936,
}
QWEN3_32B = {
    "hidden_size": 5120,
    "num_hidden_layers": 64,
    "intermediate_size": 25600,
    "num_attention_heads": 64,
    "num_key_value_heads": 8,
    "head_dim": 128,
    "vocab_size": 151936,
}
# The ViT of the official DPA code (and of its baseline): Qwen2.5-VL-3B's vision_config.
QWEN2_5_VL_3B_VIT = {
    "depth": 32,
    "hidden_size": 1280,
    "intermediate_size": 3420,
    "num_heads": 16,
    "patch_size": 14,
    "temporal_patch_size": 2,
    "spatial_merge_size": 2,
    "window_size": 112,
    "fullatt_block_indexes": [7, 15, 23, 31],
}
PAPER_TARGETS = {"qwen3-4b": QWEN3_4B, "qwen3-32b": QWEN3_32B}
# Images are capped at 262,144 pixels: a 512 x 512 image is resized to 504 x 504 (multiples of 28), a
# 36 x 36 patch grid, 324 features after the 2x2 merge, plus <vision_start>/<vision_end>.
PAPER_GRID = (36, 36)
MARKERS = 2
# The instruction-agnostic perceiver reads its chat template around the image and nothing else.
PERCEIVER_TEMPLATE_TOKENS = 8


@dataclass(frozen=True)
class Stack:
    """A stack of transformer blocks: depth, widths, heads and MLP kind are all the arithmetic needs."""

    layers: int
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    gated_mlp: bool = True  # SwiGLU (gate, up, down) vs two-matrix GELU MLP

    @classmethod
    def from_text_config(cls, config: dict[str, Any]) -> Stack:
        """Qwen3 / LLaMA / Qwen2 text configs."""
        heads = config["num_attention_heads"]
        head_dim = config.get("head_dim") or config["hidden_size"] // heads
        return cls(
            config["num_hidden_layers"],
            config["hidden_size"],
            heads,
            config.get("num_key_value_heads") or heads,
            head_dim,
            config["intermediate_size"],
        )

    def linear_flops(self, tokens: int) -> int:
        """q, k, v, o and the MLP over `tokens` positions, all layers."""
        q, kv = self.heads * self.head_dim, self.kv_heads * self.head_dim
        attention = self.hidden * (q + 2 * kv) + q * self.hidden
        mlp = (3 if self.gated_mlp else 2) * self.hidden * self.intermediate
        return 2 * tokens * (attention + mlp) * self.layers

    def attention_flops(self, query: int, keys: int, layers: int | None = None) -> int:
        """Scores and weighted sum over `keys` for `query` positions, in `layers` (default all) layers."""
        return 4 * self.heads * self.head_dim * query * keys * (self.layers if layers is None else layers)

    def prefill_flops(self, tokens: int) -> int:
        return self.linear_flops(tokens) + self.attention_flops(tokens, tokens)


def mlp_flops(tokens: int, *widths: int) -> int:
    """A chain of linear layers `widths[0] -> widths[1] -> ...` over `tokens` positions (a projector)."""
    return 2 * tokens * sum(a * b for a, b in zip(widths, widths[1:]))


def lm_prefill_flops(text_config: dict[str, Any], tokens: int) -> int:
    """The target LLM over a prompt of `tokens`, logits for the last position only (as generate does)."""
    return (
        Stack.from_text_config(text_config).prefill_flops(tokens)
        + 2 * text_config["hidden_size"] * text_config["vocab_size"]
    )


def lm_decode_flops(text_config: dict[str, Any], context: int, new_tokens: int) -> int:
    """`new_tokens` decode steps after a prompt of `context` tokens: one position each, over the KV cache."""
    stack = Stack.from_text_config(text_config)
    per_token = stack.linear_flops(1) + 2 * text_config["hidden_size"] * text_config["vocab_size"]
    # Step i attends over context + i keys (the token it feeds plus the cache).
    attention = sum(stack.attention_flops(1, context + i) for i in range(1, new_tokens))
    return per_token * (new_tokens - 1) + attention


def clip_vit_flops(vision_config: dict[str, Any], tiles: int) -> int:
    """A CLIP / SigLIP-style ViT (patch conv, class token for CLIP, GELU MLP) over `tiles` square crops."""
    patches = (vision_config["image_size"] // vision_config["patch_size"]) ** 2
    hidden, heads = vision_config["hidden_size"], vision_config["num_attention_heads"]
    stack = Stack(
        vision_config["num_hidden_layers"],
        hidden,
        heads,
        heads,
        hidden // heads,
        vision_config["intermediate_size"],
        gated_mlp=False,
    )
    tokens = patches + (1 if vision_config.get("model_type", "clip_vision_model").startswith("clip") else 0)
    conv = 2 * patches * hidden * 3 * vision_config["patch_size"] ** 2
    # transformers runs every layer even when a middle layer's output is the feature (vision_feature_layer=-2).
    return tiles * (conv + stack.prefill_flops(tokens))


def _windows(grid: tuple[int, int], unit: int, window: int) -> list[int]:
    """Patch counts of Qwen2.5-VL's attention windows: `window` merge units a side, cut at the grid's edge."""

    def sides(n: int) -> list[int]:
        merged = n // unit
        return [min(window, merged - start) * unit for start in range(0, merged, window)]

    return [a * b for a in sides(grid[0]) for b in sides(grid[1])]


def qwen2_5_vit_flops(vision_config: dict[str, Any], grid: tuple[int, int], out_width: int) -> int:
    """Qwen2.5-VL's ViT on one image of `grid` patches, windowed attention, and its merger to `out_width`."""
    hidden, heads = vision_config["hidden_size"], vision_config["num_heads"]
    stack = Stack(vision_config["depth"], hidden, heads, heads, hidden // heads, vision_config["intermediate_size"])
    patches, patch = grid[0] * grid[1], vision_config["patch_size"]
    unit = vision_config.get("spatial_merge_size", 2)
    window = vision_config.get("window_size", 112) // unit // patch
    full_layers = len(vision_config.get("fullatt_block_indexes", []))
    attention = stack.attention_flops(patches, patches, full_layers)
    attention += sum(stack.attention_flops(w, w, stack.layers - full_layers) for w in _windows(grid, unit, window))
    conv = 2 * patches * hidden * 3 * vision_config.get("temporal_patch_size", 2) * patch**2
    merged = hidden * unit**2
    return conv + stack.linear_flops(patches) + attention + mlp_flops(patches // unit**2, merged, merged, out_width)


def paper_prefill(
    target: dict[str, Any],
    prompt_tokens: int,
    perceiver_text: int = PERCEIVER_TEMPLATE_TOKENS,
    perceiver: dict[str, Any] = QWEN3_0_6B,
    vit: dict[str, Any] = QWEN2_5_VL_3B_VIT,
    grid: tuple[int, int] = PAPER_GRID,
) -> dict[str, dict[str, int]]:
    """Per-part FLOPs of a prompt with one image: `prompt_tokens` of text around the image's N+2 positions.

    Original: ViT + merger (to the target width) + target LLM. DPA: the same ViT + merger to the perceiver
    width (phi_p) + every perceiver block over its template, the image and `perceiver_text` + phi + target LLM.
    """
    features = grid[0] * grid[1] // vit.get("spatial_merge_size", 2) ** 2 + MARKERS
    d_p, d_t = perceiver["hidden_size"], target["hidden_size"]
    llm = lm_prefill_flops(target, prompt_tokens + features)
    original = {"vit": qwen2_5_vit_flops(vit, grid, d_t), "llm": llm}
    dpa = {
        "vit": qwen2_5_vit_flops(vit, grid, d_p),
        "perceiver_lm": Stack.from_text_config(perceiver).prefill_flops(features + perceiver_text),
        "phi": mlp_flops(features, d_p, d_p, d_t),
        "llm": llm,
    }
    return {"original": original, "dpa": dpa}


def paper_ratios(
    name: str, prompt_tokens: int = 64, new_tokens: int = 256, perceiver_text: int = PERCEIVER_TEMPLATE_TOKENS
) -> dict[str, Any]:
    """FLOPs per image of the paper's setup for target `name`, and DPA / original for prefill and generation."""
    target = PAPER_TARGETS[name]
    parts = paper_prefill(target, prompt_tokens, perceiver_text)
    features = PAPER_GRID[0] * PAPER_GRID[1] // 4 + MARKERS
    decode = lm_decode_flops(target, prompt_tokens + features, new_tokens)
    prefill = {side: sum(p.values()) for side, p in parts.items()}
    return {
        "target": name,
        "prompt_tokens": prompt_tokens,
        "image_features": features,
        "new_tokens": new_tokens,
        "perceiver_text_tokens": perceiver_text,
        "parts": parts,
        "prefill_flops": prefill,
        "decode_flops": decode,
        "prefill_ratio": prefill["dpa"] / prefill["original"],
        "generate_ratio": (prefill["dpa"] + decode) / (prefill["original"] + decode),
        "decode_ratio": 1.0,  # decoding runs the target LLM over its KV cache only, the same on both sides
    }


def paper_table(prompt_tokens: int = 64, new_tokens: int = 256) -> dict[str, Any]:
    """Both paper targets, instruction-agnostic (the default) and with the whole prompt shown to the perceiver."""
    return {
        name: {
            **paper_ratios(name, prompt_tokens, new_tokens),
            "prefill_ratio_perceiver_sees_prompt": paper_ratios(
                name, prompt_tokens, new_tokens, PERCEIVER_TEMPLATE_TOKENS + prompt_tokens
            )["prefill_ratio"],
        }
        for name in PAPER_TARGETS
    }


def params_billions(config: dict[str, Any]) -> float:
    """Non-embedding parameters of a text config, for the record next to the FLOPs."""
    return Stack.from_text_config(config).linear_flops(1) / 2 / 1e9
