"""Synthetic (original, DPA) model pairs for `dpa bench infer` without a MODEL, and for `dpa bench all`.

A LLaVA-NeXT target (CLIP-style ViT, Qwen3 text) with random weights, upgraded by the real `dpa upgrade`
code with a composed perceiver: the target's own ViT + a small Qwen3 + a fresh phi_p, as the paper's.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from dpa_cli.synthetic.checkpoints import build_llava_next_target, build_text_lm, text_config

VOCAB = 4096


@dataclass(frozen=True)
class PairSize:
    """Widths and depths of a synthetic pair: the target LLM, its ViT (tile size), the perceiver's LM."""

    target_hidden: int
    target_layers: int
    vit_hidden: int
    vit_layers: int
    image_size: int
    perceiver_hidden: int
    perceiver_layers: int


PAIRS = {
    # Seconds on 2 CPU cores; every part still a real multi-layer transformer.
    "quick": PairSize(256, 4, 128, 2, 56, 128, 2),
    # The target LLM dominates (200M parameters against a 3M perceiver LM, like 32B against 0.6B).
    "default": PairSize(1024, 16, 384, 6, 112, 256, 4),
}


def build_pair(workdir: Path, size: str = "default") -> Path:
    """Write the target and its upgraded workspace under `workdir`; returns the workspace (dpa.yaml names
    the target, so `dpa bench infer WORKSPACE` finds its baseline)."""
    from dpa_cli.upgrade.plan import Options
    from dpa_cli.upgrade.run import plan_upgrade, run_upgrade

    s, workdir = PAIRS[size], Path(workdir)
    target = build_llava_next_target(
        workdir / "target",
        text_config(s.target_hidden, s.target_layers, VOCAB),
        vit_hidden=s.vit_hidden,
        vit_layers=s.vit_layers,
        image_size=s.image_size,
    )
    lm = build_text_lm(workdir / "small-lm", text_config(s.perceiver_hidden, s.perceiver_layers, VOCAB))
    run_upgrade(plan_upgrade(str(target), f"vit=target,lm={lm}", Options()), workdir / "ws", verify_load=False)
    return workdir / "ws"
