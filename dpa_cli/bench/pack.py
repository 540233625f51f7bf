"""`dpa bench train --pack`: packed rows against padded batches, on the same samples and the same weights.

The data is a synthetic length-skewed LLaVA-style mix (`MIX`): short captions, short questions with short
answers, and long multi-turn conversations over one or two images. Padded: batches of `batch` samples in a
random order, padded to the longest, as `dpa train` runs without `--pack`. Packed: first-fit-decreasing rows of
up to `max_length` tokens, as many rows per step as hold about the same real tokens as a padded step. Each pass
runs forward and backward over every sample (no optimizer step, so the weights stay the same); passes of the
two modes alternate. Reported: effective (non-padding) tokens per second of each and their ratio, and the loss
per supervised token of each (the same samples and weights: the two must agree). Tokens per CPU second (the
process's CPU time) are reported beside tokens per second: on a shared machine they vary less with the load.
"""

from __future__ import annotations

import random
import statistics
import time
from pathlib import Path
from typing import Any

import torch

# The mix, by share of samples: (kind, share, what it is).
MIX = (
    ("caption", 0.55, "one image, 'Describe the image briefly.', a one-sentence caption"),
    ("short_qa", 0.30, "one image, a short question, a one- or two-sentence answer"),
    ("multi_turn", 0.15, "one or two images, 3 to 5 turns, each answer 3 to 8 sentences"),
)
COLOURS = ["red", "green", "blue", "yellow", "purple", "orange"]
SHAPES = ["circle", "square", "triangle", "star"]


def _sentence(rng: random.Random) -> str:
    colour, shape, other = rng.choice(COLOURS), rng.choice(SHAPES), rng.choice(SHAPES)
    return f"A {colour} {shape} sits {rng.choice(['above', 'below', 'left of', 'right of'])} a {other}."


def _turn(role: str, text: str) -> dict[str, str]:
    return {"from": role, "value": text}


def build_model(workdir: Path) -> Path:
    """A DPA model whose target LLM dominates a step, as at the paper's scale (a Qwen3-4B target, a 0.6B
    perceiver): a LLaVA-NeXT target (Qwen3 256 x 4, CLIP ViT 128 x 2 on 56 px tiles) upgraded with a composed
    perceiver (that ViT + a Qwen3 128 x 2). Packing only removes the target LLM's padding; the perceiver's work
    is the same in both modes, so a bench whose perceiver dominates would hide the difference."""
    from dpa_cli.bench.train import VOCAB
    from dpa_cli.synthetic.checkpoints import build_llava_next_target, build_text_lm, text_config
    from dpa_cli.upgrade.plan import Options
    from dpa_cli.upgrade.run import plan_upgrade, run_upgrade

    target = build_llava_next_target(
        workdir / "target", text_config(256, 4, VOCAB), vit_hidden=128, vit_layers=2, image_size=56, patch=14
    )
    lm = build_text_lm(workdir / "small-lm", text_config(128, 2, VOCAB))
    run_upgrade(
        plan_upgrade(str(target), f"vit=target,lm={lm}", Options(dtype="fp32")), workdir / "ws", verify_load=False
    )
    return workdir / "ws" / "model"


def mix_sample(rng: random.Random, index: int) -> dict[str, Any]:
    """One sample of the mix, its kind drawn by the shares of MIX."""
    kind = rng.choices([k for k, _, _ in MIX], weights=[w for _, w, _ in MIX])[0]
    image = f"{rng.randrange(len(COLOURS))}.png"
    if kind == "caption":
        turns = [_turn("human", "<image>\nDescribe the image briefly."), _turn("gpt", _sentence(rng))]
    elif kind == "short_qa":
        answer = " ".join(_sentence(rng) for _ in range(rng.randint(1, 2)))
        turns = [_turn("human", f"<image>\nWhere is the {rng.choice(SHAPES)}?"), _turn("gpt", answer)]
    else:
        images = [image] + [f"{rng.randrange(len(COLOURS))}.png"] * rng.randint(0, 1)
        turns = [_turn("human", "<image>\n" * len(images) + "Tell me everything you see.")]
        for number in range(rng.randint(3, 5)):
            if number:
                turns.append(_turn("human", f"And what about the {rng.choice(COLOURS)} shapes?"))
            turns.append(_turn("gpt", " ".join(_sentence(rng) for _ in range(rng.randint(3, 8)))))
        return {"id": f"{kind}-{index}", "image": images, "conversations": turns, "kind": kind}
    return {"id": f"{kind}-{index}", "image": image, "conversations": turns, "kind": kind}


def write_mix(folder: Path, samples: int, seed: int) -> Path:
    """Images of several sizes and a LLaVA JSON file of `samples` samples of the mix."""
    import json

    from PIL import Image

    (folder / "images").mkdir(parents=True, exist_ok=True)
    for i in range(len(COLOURS)):
        Image.new("RGB", (96 + 24 * i, 80 + 16 * (i % 3)), (40 * i % 255, 120, 200)).save(
            folder / "images" / f"{i}.png"
        )
    rng = random.Random(seed)
    path = folder / "mix.json"
    path.write_text(json.dumps([mix_sample(rng, i) for i in range(samples)]))
    return path


def encode(model_folder: Path, data: Path, max_length: int) -> tuple[Any, list[dict[str, Any]]]:
    """The DPA processor and every sample encoded as `dpa train` encodes it (stage 2)."""
    from dpa_cli import loading
    from dpa_cli.data import EncodedDataset, SampleEncoder, open_samples

    processor = loading.load_processor(model_folder)
    dataset = EncodedDataset(open_samples(data, data.parent / "images"), SampleEncoder(processor, 2, max_length))
    return processor, [dataset[i] for i in range(len(dataset))]


def padded_batches(count: int, batch: int, seed: int) -> list[list[int]]:
    order = list(range(count))
    random.Random(seed).shuffle(order)
    return [order[i : i + batch] for i in range(0, count, batch)]


def packed_batches(lengths: list[int], max_length: int, rows_per_step: int, seed: int) -> list[list[list[int]]]:
    from dpa_cli.data.packing import pack_lengths

    rows = pack_lengths(lengths, max_length)
    random.Random(seed).shuffle(rows)
    return [rows[i : i + rows_per_step] for i in range(0, len(rows), rows_per_step)]


def run_pass(model: torch.nn.Module, batches: list[dict[str, Any]]) -> dict[str, float]:
    """Forward and backward over every batch: seconds, real tokens, and the summed loss over supervised tokens."""
    from dpa_cli.data.packing import model_inputs

    tokens, loss_sum, supervised = 0, 0.0, 0
    started, cpu_started = time.perf_counter(), time.process_time()
    for batch in batches:
        tokens += int(batch["attention_mask"].sum())
        count = int((batch["labels"][:, 1:] != -100).sum())
        loss = model(**model_inputs(dict(batch))).loss  # the mean over the batch's supervised tokens
        loss.backward()
        model.zero_grad(set_to_none=True)
        loss_sum, supervised = loss_sum + float(loss.detach()) * count, supervised + count
    return {
        "seconds": time.perf_counter() - started,
        "cpu_seconds": time.process_time() - cpu_started,
        "tokens": tokens,
        "loss_sum": loss_sum,
        "supervised": supervised,
    }


def _summary(passes: list[dict[str, float]], steps: int, padded_tokens: int) -> dict[str, Any]:
    seconds, cpu = [p["seconds"] for p in passes], [p["cpu_seconds"] for p in passes]
    first = passes[0]
    return {
        "steps": steps,
        "tokens": first["tokens"],
        "tokens_with_padding": padded_tokens,
        "padding_share": 1 - first["tokens"] / padded_tokens,
        "seconds": {"min": min(seconds), "median": statistics.median(seconds)},
        "tokens_per_s": {
            "best": first["tokens"] / min(seconds),
            "median": first["tokens"] / statistics.median(seconds),
        },
        "tokens_per_cpu_s": {"best": first["tokens"] / min(cpu), "median": first["tokens"] / statistics.median(cpu)},
        "loss_per_token": first["loss_sum"] / first["supervised"],
        "supervised_tokens": first["supervised"],
    }


def _ratio(result: dict[str, Any], key: str) -> dict[str, float]:
    return {k: result["packed"][key][k] / result["padded"][key][k] for k in ("best", "median")}


def bench_pack(
    model_folder: Path,
    workdir: Path,
    samples: int = 96,
    batch: int = 8,
    max_length: int = 1024,
    repeats: int = 2,
    seed: int = 0,
) -> dict[str, Any]:
    """Packed against padded on the mix; `model_folder` is a DPA model (trained or not: the ratio is about shapes)."""
    from dpa_cli import loading
    from dpa_cli.data import DPACollator
    from dpa_cli.data.packing import PackingCollator, uses_mrope

    processor, features = encode(model_folder, write_mix(Path(workdir), samples, seed), max_length)
    torch.manual_seed(seed)
    model = loading.load_model(model_folder, dtype=torch.float32).train()
    lengths = [len(f["input_ids"]) for f in features]
    collator = DPACollator(processor)
    packer = PackingCollator(collator, mrope=uses_mrope(model.config.text_config))
    rows_per_step = max(1, round(batch * statistics.mean(lengths) / max_length))
    plans = {
        "padded": [collator([features[i] for i in b]) for b in padded_batches(len(features), batch, seed)],
        "packed": [
            packer([[features[i] for i in row] for row in rows])
            for rows in packed_batches(lengths, max_length, rows_per_step, seed)
        ],
    }
    run_pass(model, plans["padded"][:1])  # warm-up
    passes: dict[str, list[dict[str, float]]] = {"padded": [], "packed": []}
    for _ in range(repeats):
        for mode, done in passes.items():
            done.append(run_pass(model, plans[mode]))
    result = {
        mode: _summary(passes[mode], len(plans[mode]), sum(b["input_ids"].numel() for b in plans[mode]))
        for mode in passes
    }
    counts = {kind: sum(1 for f in features if str(f["sample_id"]).startswith(kind)) for kind, _, _ in MIX}
    return {
        **result,
        "ratio": _ratio(result, "tokens_per_s"),
        "ratio_cpu_time": _ratio(result, "tokens_per_cpu_s"),
        "loss_per_token_difference": abs(result["packed"]["loss_per_token"] - result["padded"]["loss_per_token"]),
        "mix": {
            "samples": len(features),
            "by_kind": counts,
            "kinds": {k: said for k, _, said in MIX},
            "lengths": {"min": min(lengths), "median": statistics.median(lengths), "max": max(lengths)},
        },
        "batch": batch,
        "rows_per_step": rows_per_step,
        "max_length": max_length,
        "repeats": repeats,
        "target": {"ratio": 1.5},
    }
