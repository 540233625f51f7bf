"""One explicit freeze policy: each part is `frozen`, `full` or `lora`, applied by name, logged as a table."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import torch

from dpa_cli.defaults import PartMode
from dpa_cli.errors import BadInputError
from dpa_cli.parts import PARTS, part_of, perceiver_family
from dpa_cli.train.recipe import DEFAULT_LORA_TARGETS

# ms-swift's (and PEFT's) name for "every linear layer": here, of the parts whose mode is `lora`.
ALL_LINEAR = "all-linear"


@dataclass(frozen=True)
class LoraSpec:
    """The adapters of a LoRA run: rank, alpha, dropout, `targets` (a regex over module names, by default the
    target LLM's linears, or `all-linear`: every linear layer of the parts set to `lora`) and the `seed` the A
    matrices are drawn from."""

    r: int
    alpha: float
    dropout: float
    targets: str
    seed: int = 0


def apply_trainable(model: torch.nn.Module, trainable: dict[str, str], lora: LoraSpec | None = None):
    """Set requires_grad per part, wrapping the LoRA parts with PEFT adapters (`lora`); returns (model, table)."""
    family = perceiver_family(model.config)
    if lora is not None:
        model = _add_adapters(model, lora, trainable)
    for name, param in model.named_parameters():
        if "lora_" in name:
            param.requires_grad_(True)
        else:
            param.requires_grad_(trainable[part_of(name, family)] == PartMode.FULL)
    return model, trainable_table(model, trainable)


def _add_adapters(model: torch.nn.Module, lora: LoraSpec, trainable: dict[str, str]) -> torch.nn.Module:
    from peft import LoraConfig, get_peft_model

    targets = lora.targets
    check_lora_targets(model, targets, trainable)
    # PEFT reads a string as a regex over module names: all-linear goes to it as the names it stands for.
    modules = targets if targets != ALL_LINEAR else [name for name, _ in lora_modules(model, targets, trainable)]
    config = LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, target_modules=modules)
    try:
        # LoRA A starts random: drawn from the run's seed, so a run repeats exactly (an interrupted one resumes
        # to the same weights) and every process of a distributed run starts from the same adapter.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(lora.seed)
            return get_peft_model(model, config)
    except ValueError as err:  # the recipe gate has checked r, alpha and dropout: what is left is PEFT's view
        raise BadInputError(f"lora_targets {targets!r}: PEFT refuses them ({' '.join(str(err).split())})") from None


def lora_modules(model: torch.nn.Module, targets: str, trainable: dict[str, str]) -> list[tuple[str, torch.nn.Module]]:
    """The modules `targets` names: the regex's full matches (PEFT's rule), or with `all-linear` every linear
    layer of a part in `lora` mode except the LM head (the vocabulary projection, tied to the embeddings in many
    LLMs), as ms-swift's `all-linear` leaves it out."""
    if targets != ALL_LINEAR:
        return [(name, module) for name, module in model.named_modules() if name and re.fullmatch(targets, name)]
    family, head = perceiver_family(model.config), model.get_output_embeddings()
    return [
        (name, module)
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.Linear)
        and module is not head
        and trainable.get(part_of(f"{name}.weight", family)) == PartMode.LORA
    ]


def check_lora_targets(model: torch.nn.Module, targets: str, trainable: dict[str, str]) -> None:
    """The targets must name (PEFT: the whole module name) linear layers only, at least one of them in the
    target LLM. Checked on the loaded model, before any adapter is added or the stage folder is touched."""
    family = perceiver_family(model.config)
    matched = lora_modules(model, targets, trainable)
    hint = f"set --lora-targets to a regex over the LLM's linear layers, e.g. {DEFAULT_LORA_TARGETS!r}"
    for name, module in matched:
        if not isinstance(module, torch.nn.Linear):
            kind = type(module).__name__
            raise BadInputError(f"lora_targets {targets!r} matches {name}, a {kind}, not a linear layer", hint=hint)
    if not any(part_of(f"{name}.weight", family) == "llm" for name, _ in matched):
        if targets == ALL_LINEAR:
            hint = "all-linear adapts the parts set to lora: set trainable.llm=lora (--lora), or give a regex"
        raise BadInputError(f"lora_targets {targets!r} matches no linear layer of the target LLM", hint=hint)
    adapted = {part_of(f"{name}.weight", family) for name, _ in matched}
    linear = {part_of(f"{name}.weight", family) for name, _ in lora_modules(model, ALL_LINEAR, trainable)}
    for part, mode in trainable.items():  # a part in lora mode without adapters would silently not train
        if mode == PartMode.LORA and part in linear and part not in adapted:
            raise BadInputError(
                f"trainable.{part}=lora, but lora_targets {targets!r} adapts none of its layers",
                hint=f"widen lora_targets (all-linear adapts every part set to lora), or set trainable.{part} to "
                "full or frozen",
            )


def trainable_table(model: torch.nn.Module, trainable: dict[str, str]) -> dict[str, dict[str, Any]]:
    """Per part: its mode, its parameters, and how many of them train (LoRA adapters counted with their part)."""
    family = perceiver_family(model.config)
    table = {part: {"mode": trainable[part], "params": 0, "trainable": 0} for part in PARTS}
    seen: set[int] = set()
    for name, param in model.named_parameters():
        if id(param) in seen:  # tied weights count once
            continue
        seen.add(id(param))
        row = table[part_of(name, family)]
        row["params"] += param.numel()
        row["trainable"] += param.numel() if param.requires_grad else 0
    return table


def parameter_groups(model: torch.nn.Module, base_lr: float, part_lrs: dict[str, float], weight_decay: float):
    """Optimizer groups by part and decay: per-part learning rates, no decay on biases, norms and embeddings."""
    family = perceiver_family(model.config)
    groups: dict[tuple[str, bool], list[torch.nn.Parameter]] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        decays = param.ndim >= 2 and "embed" not in name and "norm" not in name
        groups.setdefault((part_of(name, family), decays), []).append(param)
    return [
        {
            "params": params,
            "lr": part_lrs.get(part, base_lr),
            "weight_decay": weight_decay if decays else 0.0,
            "name": f"{part}{'' if decays else ' (no decay)'}",
        }
        for (part, decays), params in sorted(groups.items())
    ]
