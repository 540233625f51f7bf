""" "Will it fit": per-GPU memory and step time of a planned run, from the model built on the meta device.

Model states (weights, gradients, optimizer states) come from DeepSpeed's own estimators, fed the *trainable*
parameter count: a frozen parameter has no gradient and no optimizer state, only its 16-bit (or fp32) weight,
which ZeRO-3 partitions over the GPUs and every other setting keeps whole on each GPU. Activations follow a
stated per-layer formula (`layer_activation_bytes`), with and without gradient checkpointing, at the recipe's
`max_length` and micro batch. The step time is the counted FLOPs (`dpa_cli.flops`) at a stated MFU.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from dpa_cli.bench.analytic import Stack
from dpa_cli.errors import BadInputError

GIB = 2**30
MFU = 0.40  # a stated, typical model-FLOPs utilisation for bf16 training of billion-parameter models
DEFAULT_GPU = "A100-80GB"
DEFAULT_MEMORY = "80GB"
DEFAULT_TFLOPS = 312.0  # A100 dense bf16 peak (dpa_cli.flops.PEAK_BF16)
UNITS = {
    "": GIB,
    "g": GIB,
    "gb": GIB,
    "gib": GIB,
    "m": 2**20,
    "mb": 2**20,
    "mib": 2**20,
    "t": 2**40,
    "tb": 2**40,
    "tib": 2**40,
}


def parse_memory(text: str) -> int:
    """`80GB`, `80GiB`, `24G`, `40960MB`, `80` (GiB) -> bytes. GB is read as GiB, as nvidia-smi's 81920MiB of
    an "80GB" card shows."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*", str(text))
    unit = match.group(2).lower() if match else None
    if match is None or unit not in UNITS or float(match.group(1)) <= 0:
        raise BadInputError(f"--gpu-memory {text!r} is not a memory size", hint="write it like 80GB, 24GiB or 40960MB")
    return int(float(match.group(1)) * UNITS[unit])


def check_tflops(tflops: float) -> float:
    if not tflops > 0 or tflops == float("inf"):
        raise BadInputError(
            f"--gpu-tflops {tflops}: must be a positive number (dense bf16 TFLOP/s of one GPU)",
            hint="e.g. 312 for an A100, 989 for an H100",
        )
    return tflops


@dataclass(frozen=True)
class Gpu:
    memory: int  # bytes
    tflops: float  # dense bf16 peak, TFLOP/s
    name: str = DEFAULT_GPU


def counts(model: Any) -> dict[str, int]:
    """Trainable and frozen parameters, and the largest module's own parameters (what ZeRO-3 gathers at once)."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    largest = max((sum(p.numel() for p in m.parameters(recurse=False)) for m in model.modules()), default=0)
    return {"trainable": trainable, "frozen": total - trainable, "largest_layer": largest}


def zero_settings(ds_config: dict[str, Any] | None) -> tuple[int, bool, bool]:
    """(ZeRO stage, optimizer offloaded to CPU, parameters offloaded to CPU) of a DeepSpeed config (0: none)."""
    if not ds_config:
        return 0, False, False
    zero = ds_config.get("zero_optimization") or {}
    offloaded = {
        key: (zero.get(key) or {}).get("device") in ("cpu", "nvme") for key in ("offload_optimizer", "offload_param")
    }
    return int(zero.get("stage", 0)), offloaded["offload_optimizer"], offloaded["offload_param"]


def model_states(
    params: dict[str, int], stage: int, gpus: int, weight_bytes: int, offload: tuple[bool, bool] = (False, False)
) -> dict[str, Any]:
    """Per-GPU bytes of weights, gradients and optimizer states, and how they were counted.

    ZeRO-2 (and ZeRO-1, counted the same): `estimate_zero2_model_states_mem_needs(trainable)` plus the frozen
    16-bit weights, whole on every GPU. ZeRO-3: `estimate_zero3_model_states_mem_needs(trainable, largest layer)`
    plus the frozen weights divided over the GPUs. Without DeepSpeed each GPU holds the model in its training dtype
    with AdamW's two states in that dtype: 4 x `weight_bytes` per trainable parameter, `weight_bytes` per frozen.
    """
    trainable, frozen = params["trainable"], params["frozen"]
    optimizer_off, params_off = offload
    if stage >= 3:
        from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs

        _, states, _ = estimate_zero3_model_states_mem_needs(
            trainable,
            params["largest_layer"],
            num_gpus_per_node=gpus,
            cpu_offload=optimizer_off,
            cpu_offload_params=params_off,
        )
        frozen_bytes = 0 if params_off else 2 * frozen // gpus
        how = "DeepSpeed estimate_zero3_model_states_mem_needs(trainable) + 2 B x frozen / GPUs"
    elif stage >= 1:
        from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

        _, states = estimate_zero2_model_states_mem_needs(trainable, num_gpus_per_node=gpus, cpu_offload=optimizer_off)
        frozen_bytes = 2 * frozen
        how = "DeepSpeed estimate_zero2_model_states_mem_needs(trainable) + 2 B x frozen"
    else:
        states, frozen_bytes = 4 * weight_bytes * trainable, weight_bytes * frozen
        how = (
            f"no DeepSpeed: {4 * weight_bytes} B x trainable (weight, gradient, 2 AdamW states) "
            f"+ {weight_bytes} B x frozen"
        )
    return {
        "bytes": int(states + frozen_bytes),
        "trainable_states": int(states),
        "frozen_weights": int(frozen_bytes),
        "how": how,
    }


def layer_activation_bytes(stack: Stack, tokens: int, dtype_bytes: int) -> int:
    """What one decoder layer keeps for backward over `tokens` positions, per token (b = `dtype_bytes`):

    - two RMSNorms, each its fp32 input, the normalised value and its product with the weight: 2 (4 + 2b) h
    - q (q = heads x head_dim) and k (kv = kv_heads x head_dim): the fp32 input of their per-head norm (Qwen3;
      LLaMA-style blocks have none, so this over-counts them by (4 + b)(q + kv)), the normalised and the rotated
      copy; v; the attention output: (4 + 3b) (q + kv)
    - the SwiGLU MLP: gate, up, the gate's activation and the product, each `i` wide: 4 b i
    SDPA / flash attention keep no `[heads, seq, seq]` scores (only a per-head log-sum-exp, left out), so the
    heads enter through q and kv only. Checked against the tensors autograd saves, in tests/test_fit.py."""
    q, kv = stack.heads * stack.head_dim, stack.kv_heads * stack.head_dim
    b = dtype_bytes
    return tokens * (2 * (4 + 2 * b) * stack.hidden + (4 + 3 * b) * (q + kv) + 4 * b * stack.intermediate)


def stack_activations(stack: Stack, tokens: int, dtype_bytes: int) -> dict[str, int]:
    """All layers' activations; with gradient checkpointing, each layer's input plus one layer recomputed."""
    layer = layer_activation_bytes(stack, tokens, dtype_bytes)
    return {
        "without_checkpointing": stack.layers * layer,
        "with_checkpointing": stack.layers * dtype_bytes * tokens * stack.hidden + layer,
    }


def activations(config: Any, tokens: int, dtype_bytes: int, perceiver_trains: bool) -> dict[str, int]:
    """The target LLM's layers (gradients always flow through it, to phi at least), its logits (`dtype_bytes` +
    an fp32 copy for the loss + its fp32 gradient: (`dtype_bytes` + 8) x vocab per token), and, when a perceiver part
    trains, the perceiver LM's layers over at most as many tokens. The ViT's activations are not counted."""
    text = config.text_config.to_dict()
    target = stack_activations(_stack(text), tokens, dtype_bytes)
    logits = (dtype_bytes + 8) * tokens * (text.get("vocab_size") or getattr(config, "vocab_size", 0))
    perceiver = getattr(config.perceiver_config, "text_config", config.perceiver_config).to_dict()
    extra = stack_activations(_stack(perceiver), tokens, dtype_bytes) if perceiver_trains else {}
    return {key: value + logits + extra.get(key, 0) for key, value in target.items()}


def _stack(text: dict[str, Any]) -> Stack:
    """The layer shapes of a text config (an MLP width it does not name is taken as 4 h, the classic ratio)."""
    return Stack.from_text_config(
        {**text, "intermediate_size": text.get("intermediate_size") or 4 * text["hidden_size"]}
    )


def perceiver_trains(trainable: dict[str, dict[str, Any]]) -> bool:
    """Whether gradients reach the perceiver (its ViT, LM or phi_p train), so its activations are kept."""
    return any(row["trainable"] for part, row in trainable.items() if part in ("vit", "phi_p", "perceiver_lm"))


def estimate(plan: Any, model: Any, trainable: dict[str, dict[str, Any]], gpu: Gpu) -> dict[str, Any]:
    """The `fit` section of `dpa train --dry-run`: per-GPU memory, the step time, and whether it fits."""
    from dpa_cli.flops import flops_per_token_estimate

    recipe, args = plan.recipe, plan.args
    bf16 = bool(recipe.training_args.get("bf16", False))  # the recipe's: on a GPU it is what training uses
    dtype_bytes, gpus = 2 if bf16 else 4, plan.processes
    stage, *offload = zero_settings(args.deepspeed if isinstance(args.deepspeed, dict) else None)
    params = counts(model)
    states = model_states(params, stage, gpus, dtype_bytes, tuple(offload))
    micro = args.per_device_train_batch_size
    acts = activations(model.config, micro * recipe.max_length, dtype_bytes, perceiver_trains(trainable))
    checkpointing = bool(args.activation_checkpointing)
    chosen = acts["with_checkpointing" if checkpointing else "without_checkpointing"]
    tokens = micro * recipe.max_length * args.gradient_accumulation_steps  # per GPU per optimizer step
    per_token = flops_per_token_estimate(model) * (8 / 6 if checkpointing else 1)  # a recomputed forward: +2N
    seconds = tokens * per_token / (gpu.tflops * 1e12 * MFU)
    total = states["bytes"] + chosen
    return {
        "gpu": gpu.name,
        "gpu_memory_gib": round(gpu.memory / GIB, 2),
        "gpu_tflops": gpu.tflops,
        "mfu": MFU,
        "gpus": gpus,
        "zero_stage": stage,
        "dtype": "bf16" if bf16 else "fp32",
        **params,
        "model_states_gib": _gib(states["bytes"]),
        "model_states_how": states["how"],
        "activations_gib": {key: _gib(value) for key, value in acts.items()},
        "gradient_checkpointing": checkpointing,
        "micro_batch": micro,
        "max_length": recipe.max_length,
        "total_gib": _gib(total),
        "fits": total <= gpu.memory,
        "flops_per_token": per_token,
        "tokens_per_gpu_step": tokens,
        "step_seconds": round(seconds, 3),
    }


def _gib(value: int) -> float:
    return round(value / GIB, 2)


def refuse_unless_fits(fit: dict[str, Any]) -> None:
    """Exit 2 with the estimate, the budget and what would bring it down, when the plan cannot fit."""
    if fit["fits"]:
        return
    changes = []
    if fit["zero_stage"] < 3:
        changes.append("--deepspeed zero3")
    if not fit["gradient_checkpointing"]:
        changes.append("--set gradient_checkpointing=true")
    if fit["micro_batch"] > 1:
        changes.append(f"a smaller --set per_device_train_batch_size (now {fit['micro_batch']})")
    changes.append(f"more GPUs (--nproc, now {fit['gpus']})" if fit["zero_stage"] else "more GPUs with ZeRO")
    raise BadInputError(
        f"the run does not fit: about {fit['total_gib']} GiB per GPU (model states {fit['model_states_gib']} + "
        f"activations {_chosen(fit)}) over the {fit['gpu_memory_gib']} GiB of --gpu-memory",
        hint="try " + ", ".join(changes),
    )


def _chosen(fit: dict[str, Any]) -> float:
    key = "with_checkpointing" if fit["gradient_checkpointing"] else "without_checkpointing"
    return fit["activations_gib"][key]
