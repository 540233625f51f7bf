"""`dpa bench train`: a stage-2 training step of the DPA model against the original LLaVA model it came from.

Both models share the target LLM and see the same images and text; the DPA model's perceiver is the
original ViT plus a small Qwen3 (composed, as the paper's). Step times are compared with the FLOP ratio
counted from the operand shapes of one real step (forward and backward) of each model.
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path
from typing import Any

import torch

from dpa_cli.flops import count_flops
from dpa_cli.synthetic.checkpoints import build_llava_next_target, build_text_lm, text_config

VOCAB = 4096
PROMPT = "Describe the picture in detail: the shapes, their colours and where they are."
ANSWER = " A red circle sits above a blue square on a grey background; a green triangle is on the right."


def build_models(workdir: Path) -> tuple[Path, Path]:
    """A LLaVA-NeXT target (ViT 384 x 6, Qwen3 512 x 6) and its DPA upgrade with a composed perceiver."""
    from dpa_cli.upgrade.plan import Options
    from dpa_cli.upgrade.run import plan_upgrade, run_upgrade

    target = build_llava_next_target(
        workdir / "target", text_config(512, 6, VOCAB), vit_hidden=384, vit_layers=6, image_size=112, patch=14
    )
    lm = build_text_lm(workdir / "small-lm", text_config(256, 4, VOCAB))
    plan = plan_upgrade(str(target), f"vit=target,lm={lm}", Options(dtype="fp32"))
    run_upgrade(plan, workdir / "ws", verify_load=False)
    return target, workdir / "ws" / "model"


def _batch(processor: Any, image_token: str, batch: int) -> dict[str, torch.Tensor]:
    from PIL import Image

    images = [Image.new("RGB", (160 + 8 * i, 120), (40 * i % 255, 120, 200)) for i in range(batch)]
    text = [f"{image_token}\n{PROMPT}{ANSWER}"] * batch
    inputs = dict(processor(images=images, text=text, return_tensors="pt", padding=True))
    labels = inputs["input_ids"].masked_fill(
        inputs["input_ids"] == processor.tokenizer.convert_tokens_to_ids(image_token), -100
    )
    return {**inputs, "labels": labels.masked_fill(inputs["attention_mask"] == 0, -100)}


def load_pair(target: Path, dpa: Path, batch: int) -> dict[str, tuple[torch.nn.Module, dict[str, torch.Tensor]]]:
    from transformers import LlavaNextProcessor

    from dpa_cli import loading

    llava_processor = LlavaNextProcessor(
        loading.load_image_processor(target),
        loading.load_tokenizer(target),
        patch_size=14,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
    )
    dpa_processor = loading.load_processor(dpa)  # dpa's own code, which it has just written
    llava = loading.load_model(target, dtype=torch.float32).train()
    model = loading.load_model(dpa, dtype=torch.float32).train()
    return {
        "original": (llava, _batch(llava_processor, "<image>", batch)),
        "dpa": (model, _batch(dpa_processor, dpa_processor.image_token, batch)),
    }


def _step(model: torch.nn.Module, inputs: dict[str, torch.Tensor], optimizer: torch.optim.Optimizer | None) -> None:
    model(**inputs).loss.backward()
    if optimizer is not None:
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)


def measure(model: torch.nn.Module, inputs: dict[str, torch.Tensor], repeats: int) -> dict[str, Any]:
    """Stage-2 (everything trainable) step time after two warm-up steps, and the step's FLOPs."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
    flops = count_flops(lambda: _step(model, inputs, None))
    model.zero_grad(set_to_none=True)
    for _ in range(2):
        _step(model, inputs, optimizer)
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        _step(model, inputs, optimizer)
        times.append(time.perf_counter() - started)
    return {
        "flops": flops,
        "step_s": {"min": min(times), "median": statistics.median(times)},
        "params": sum(p.numel() for p in model.parameters()),
        "tokens": int(inputs["attention_mask"].sum()),
    }


def bench_train(workdir: Path, repeats: int = 5, batch: int = 2) -> dict[str, Any]:
    target, dpa = build_models(Path(workdir))
    results = {name: measure(model, inputs, repeats) for name, (model, inputs) in load_pair(target, dpa, batch).items()}
    flop_ratio = results["dpa"]["flops"] / results["original"]["flops"]
    time_ratio = {k: results["dpa"]["step_s"][k] / results["original"]["step_s"][k] for k in ("min", "median")}
    return {
        "models": results,
        "flop_ratio": flop_ratio,
        "time_ratio": time_ratio,
        "time_over_flop_ratio": {k: v / flop_ratio for k, v in time_ratio.items()},
        "target": {"time_over_flop_ratio": 1.1},
        "batch": batch,
        "repeats": repeats,
    }
