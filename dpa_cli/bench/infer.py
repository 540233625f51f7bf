"""`dpa bench infer`: a DPA model against the original LLaVA model it was upgraded from, at inference.

Both answer the same prompts (one image each) greedily for exactly `max_new_tokens`. A logits processor
stamps the clock at every decoding step: its first call ends the prefill (perceiver or ViT, projector, the
target's pass over the prompt), the rest is decoding over the KV cache. Both models are loaded and their
timed passes alternate, so load drift hits both alike (`sequential` holds one at a time instead, for pairs
that do not fit together). Each is warmed up, then its memory is measured over one pass. FLOPs per image
are counted from real prefills of each.
"""

from __future__ import annotations

import gc
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from dpa_cli.bench.memory import PeakMemory
from dpa_cli.errors import BadInputError, DpaError
from dpa_cli.flops import flop_counter
from dpa_cli.generate import Runnable, build_inputs, check_runnable, open_runnable, user_turn
from dpa_cli.loading import load_config
from dpa_cli.workspace.manifest import read_manifest

# The fixed prompt set: one image each, of different shapes so AnyRes-style processors tile them differently.
PROMPTS = (
    ("Describe the picture in detail: the shapes, their colours and where they are.", (160, 120)),
    ("What colour is the largest shape?", (96, 128)),
    ("How many shapes are there, and which one is on the left?", (200, 100)),
)
FIGURES = ("prefill_s_per_image", "decode_tokens_per_s", "e2e_tokens_per_s")
TARGET_DECODE_RATIO = 0.98  # the paper's 32B throughput ratio, where the target LLM dominates


class PerceiverCallError(DpaError):
    """The perceiver ran more than once per prompt: it would be paying its cost on every decoded token."""


def prompt_images() -> list[Any]:
    """The prompt set's images: coloured shapes on grey, drawn the same way every run."""
    from PIL import Image, ImageDraw

    images = []
    for i, (_, size) in enumerate(PROMPTS):
        image = Image.new("RGB", size, (128, 128, 128))
        draw = ImageDraw.Draw(image)
        w, h = size
        draw.ellipse((w // 8, h // 8, w // 2, h // 2), fill=(200, 40 * i, 40))
        draw.rectangle((w // 2, h // 2, w - 4, h - 4), fill=(30, 60, 200))
        images.append(image)
    return images


def resolve_baseline(spec: str, baseline: str | None) -> str:
    """--baseline, else the target recorded in the workspace's dpa.yaml, else a clear error."""
    if baseline:
        return baseline
    from dpa_cli.workspace.results import find_runnable

    workspace = find_runnable(spec).workspace
    if workspace is None:
        raise BadInputError(
            f"{spec} is not a workspace, so the original model it came from is not recorded",
            hint="pass --baseline ORIGINAL (the LLaVA model that was upgraded)",
        )
    target = (read_manifest(workspace).get("plan") or {}).get("target") or {}
    for candidate in (target.get("path"), target.get("spec")):
        if candidate and (Path(candidate) / "config.json").is_file():
            return str(candidate)
    raise BadInputError(
        f"{workspace}/dpa.yaml names the original model as {target.get('spec')!r}, which is not "
        "on this machine any more",
        hint="pass --baseline ORIGINAL",
    )


def _text_shape(config: Any) -> tuple[int, int, int]:
    text = config.get_text_config()
    return text.hidden_size, text.num_hidden_layers, text.vocab_size


def check_pair(model: str, baseline: str, allow_code: bool = False) -> None:
    """MODEL must be a DPA model and ORIGINAL not, with the same target LLM: checked on configs, before loading."""
    from dpa_cli.workspace.results import find_runnable

    dpa, original = (load_config(find_runnable(spec).model_dir, allow_code) for spec in (model, baseline))
    if dpa.model_type != "dpa":
        raise BadInputError(
            f"{model} is not a DPA model (model_type {dpa.model_type!r})",
            hint="MODEL is the upgraded model: a workspace or an export",
        )
    if original.model_type == "dpa":
        raise BadInputError(f"--baseline {baseline} is a DPA model", hint="the baseline is the original LLaVA model")
    if _text_shape(dpa) != _text_shape(original):
        raise BadInputError(
            f"--baseline {baseline} has another language model (hidden, layers, vocab "
            f"{_text_shape(original)}) than {model} {_text_shape(dpa)}",
            hint="pass the model that was upgraded",
        )


def encoder_module(model: torch.nn.Module, names: tuple[str, ...]) -> torch.nn.Module:
    """The outermost submodule called one of `names` (the perceiver, or the original's vision tower)."""
    for name, module in model.named_modules():
        if name.rsplit(".", 1)[-1] in names:
            return module
    raise BadInputError(f"{type(model).__name__} has no module named {' or '.join(names)}")


def count_prefill_flops(model: torch.nn.Module, inputs: Any) -> int:
    """FLOPs of one prefill, with logits for the last position only (as generate computes them)."""
    with torch.no_grad(), flop_counter() as counter:
        model(**inputs, logits_to_keep=1)
    return int(counter.get_total_flops())


@dataclass
class Run:
    """One greedy generation: seconds to the first token's logits, to the end, and tokens made."""

    prefill_s: float
    total_s: float
    new_tokens: int


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def generate_timed(runnable: Runnable, inputs: Any, max_new_tokens: int) -> Run:
    """Greedy generation of exactly `max_new_tokens`, with the clock read at every decoding step."""
    from transformers import LogitsProcessor, LogitsProcessorList

    stamps: list[float] = []

    class Clock(LogitsProcessor):
        def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
            _sync(runnable.device)
            stamps.append(time.perf_counter())
            return scores

    _sync(runnable.device)
    started = time.perf_counter()
    with torch.no_grad():
        output = runnable.model.generate(
            **inputs,
            max_new_tokens=max_new_tokens,
            min_new_tokens=max_new_tokens,
            do_sample=False,
            logits_processor=LogitsProcessorList([Clock()]),
        )
    _sync(runnable.device)
    return Run(stamps[0] - started, time.perf_counter() - started, output.shape[1] - inputs["input_ids"].shape[1])


def _figures(runs: list[Run]) -> dict[str, float]:
    """One pass over the prompt set: mean prefill per image, decode and end-to-end tokens per second."""
    decoded = sum(r.new_tokens - 1 for r in runs)
    return {
        "prefill_s_per_image": statistics.fmean(r.prefill_s for r in runs),
        "decode_tokens_per_s": decoded / sum(r.total_s - r.prefill_s for r in runs) if decoded else float("nan"),
        "e2e_tokens_per_s": sum(r.new_tokens for r in runs) / sum(r.total_s for r in runs),
    }


def _stats(key: str, values: list[float]) -> dict[str, float]:
    """The best pass (the least disturbed: shortest time, most tokens/s) and the median one."""
    best = max(values) if key.endswith("_per_s") else min(values)
    return {"best": best, "median": statistics.median(values)}


def weights_bytes(model: torch.nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])


class Side:
    """One model under measurement: its prompts as inputs, its encoder's call count, its timed passes."""

    def __init__(self, runnable: Runnable, encoder: tuple[str, ...], max_new_tokens: int, prompts: int):
        self.runnable, self.max_new_tokens, self.passes, self.generations = runnable, max_new_tokens, [], 0
        dtype = next(runnable.model.parameters()).dtype
        self.prompts = [
            build_inputs(runnable.processor, [user_turn(text, [image])]).to(device=runnable.device, dtype=dtype)
            for (text, _), image in zip(PROMPTS[:prompts], prompt_images())
        ]
        self.calls = [0]
        hook = lambda *_: self.calls.__setitem__(0, self.calls[0] + 1)  # noqa: E731
        self._hook = encoder_module(runnable.model, encoder).register_forward_hook(hook)

    def generate(self, inputs: Any) -> Run:
        self.generations += 1
        return generate_timed(self.runnable, inputs, self.max_new_tokens)

    def warm_up(self) -> None:
        """One generation, then one per prompt with memory measured: the process's first generate allocates
        one-time buffers that are not this model's."""
        self.generate(self.prompts[0])
        self.growth = []
        for inputs in self.prompts:
            with PeakMemory(self.runnable.device) as memory:
                self.generate(inputs)
            self.growth.append(memory.growth)

    def timed_pass(self) -> None:
        self.passes.append(_figures([self.generate(inputs) for inputs in self.prompts]))

    def summary(self) -> dict[str, Any]:
        """The model's figures; FLOPs counted now, after the timed passes."""
        self._hook.remove()
        model, weights = self.runnable.model, weights_bytes(self.runnable.model)
        growth = max(self.growth) if None not in self.growth else None
        return {
            "path": str(self.runnable.source.model_dir),
            "params": sum(p.numel() for p in model.parameters()),
            "weights_bytes": weights,
            "memory_growth_bytes": growth,
            "peak_memory_bytes": weights + growth if growth is not None else None,
            "flops_per_image": round(statistics.fmean(count_prefill_flops(model, p) for p in self.prompts)),
            "prompt_tokens": statistics.fmean(p["input_ids"].shape[1] for p in self.prompts),
            "encoder_calls_per_prompt": self.calls[0] / self.generations,
            **{key: _stats(key, [p[key] for p in self.passes]) for key in FIGURES},
        }

    def release(self) -> None:
        self.runnable.model.to("meta")  # drop the weights now, not whenever the last reference goes
        gc.collect()
        if self.runnable.device == "cuda":
            torch.cuda.empty_cache()


ENCODERS = {"original": ("vision_tower", "visual", "vision_model"), "dpa": ("perceiver",)}


def _measure(
    paths: dict[str, str],
    device: str | None,
    max_new_tokens: int,
    repeats: int,
    prompts: int,
    sequential: bool,
    allow_code: bool = False,
) -> dict[str, Any]:
    """Both sides' summaries. Interleaved by default (pass i of the original, then of DPA: load drift hits
    both alike); `sequential` holds one model in memory at a time."""

    def open_side(name: str) -> Side:
        runnable = open_runnable(paths[name], device=device, allow_code=allow_code)
        return Side(runnable, ENCODERS[name], max_new_tokens, prompts)

    results = {}
    if sequential:
        for name in ENCODERS:
            side = open_side(name)
            side.warm_up()
            for _ in range(repeats):
                side.timed_pass()
            results[name], results["device"] = side.summary(), side.runnable.device
            side.release()
        return results
    sides = {name: open_side(name) for name in ENCODERS}
    for side in sides.values():
        side.warm_up()
    for _ in range(repeats):
        for side in sides.values():
            side.timed_pass()
    return {**{name: side.summary() for name, side in sides.items()}, "device": sides["dpa"].runnable.device}


def _ratios(dpa: dict[str, Any], original: dict[str, Any]) -> dict[str, Any]:
    """DPA / original of the best passes and of the median passes; single figures as one ratio."""
    ratios: dict[str, Any] = {key: {k: dpa[key][k] / original[key][k] for k in ("best", "median")} for key in FIGURES}
    for key in ("flops_per_image", "peak_memory_bytes"):
        ratios[key] = dpa[key] / original[key] if dpa[key] and original[key] else None
    return ratios


def bench_infer(
    model: str,
    baseline: str | None = None,
    device: str | None = None,
    max_new_tokens: int = 32,
    repeats: int = 3,
    prompts: int = len(PROMPTS),
    sequential: bool = False,
    allow_code: bool = False,
) -> dict[str, Any]:
    """Measure the DPA model and the original it came from on the same prompts; ratios are DPA / original.
    `allow_code` (--trust-remote-code) lets both folders run their own model code."""
    from dpa_cli.bench.analytic import paper_table

    if max_new_tokens < 2:
        raise BadInputError("--max-new-tokens must be at least 2: decoding speed needs a token after the first")
    if not 1 <= prompts <= len(PROMPTS):
        raise BadInputError(f"--prompts {prompts}: the prompt set has 1 to {len(PROMPTS)} prompts")
    baseline = resolve_baseline(model, baseline)
    check_pair(model, baseline, allow_code)
    for spec in (baseline, model):  # a model the trust gate refuses is named before the first one is measured
        check_runnable(spec, allow_code)
    results = _measure(
        {"original": baseline, "dpa": model}, device, max_new_tokens, repeats, prompts, sequential, allow_code
    )
    calls = results["dpa"]["encoder_calls_per_prompt"]
    if calls != 1:
        raise PerceiverCallError(
            f"the perceiver ran {calls:g} times per prompt during generate; it must run once "
            "(at prefill), never per decoded token"
        )
    return {
        "device": results.pop("device"),
        "max_new_tokens": max_new_tokens,
        "repeats": repeats,
        "sequential": sequential,
        "prompts": [text for text, _ in PROMPTS[:prompts]],
        "models": results,
        "ratios": _ratios(results["dpa"], results["original"]),
        "perceiver_calls_per_prompt": calls,
        "paper": paper_table(),
        "targets": {"decode_tokens_per_s": TARGET_DECODE_RATIO},
    }
