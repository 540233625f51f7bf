"""What a LoRA checkpoint keeps beside its adapter: the parameters trained in full (phi, perceiver parts set to
`full`), so that `--resume` continues them instead of restarting them.

PEFT saves only the adapter's own tensors. The Trainer then resumes the adapter and the optimizer state (which
does cover phi) but leaves the parts trained in full at their starting values, silently. Each checkpoint of a
LoRA run therefore also holds `trained_in_full.safetensors` (base-model names, stored dtype), which the
trainer's `_load_from_checkpoint` restores. Under DeepSpeed the engine's own checkpoint holds them as well
(module states and fp32 master weights) and the engine restores them itself.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from dpa_cli.checkpoint import read_shard, verify_data_size
from dpa_cli.errors import BadInputError, CheckpointError
from dpa_cli.parts import part_of, perceiver_family
from dpa_cli.workspace.layout import ADAPTER_CONFIG

TRAINED_IN_FULL = "trained_in_full.safetensors"
SAME_FLAGS = "resume with the recipe and flags of the interrupted run, or start over with --restart"


def is_peft(model: torch.nn.Module) -> bool:
    from peft import PeftModel

    return isinstance(model, PeftModel)


def base_name(name: str) -> str:
    """A PEFT-wrapped parameter's name in the plain model (what transformers loads and saves)."""
    return name.removeprefix("base_model.model.").replace(".base_layer.", ".")


def trained_in_full(model: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    """Base-model name -> parameter, for every parameter trained in full (LoRA adapters excluded)."""
    return {base_name(n): p for n, p in model.named_parameters() if p.requires_grad and "lora_" not in n}


def gathered(param: torch.nn.Parameter) -> torch.Tensor:
    """A parameter's full value on CPU, gathering it first when ZeRO-3 has partitioned it."""
    if hasattr(param, "ds_id"):
        import deepspeed

        with deepspeed.zero.GatheredParameters([param]):
            return param.data.detach().clone().cpu()
    return param.data.detach().cpu()


def save_trained_in_full(model: torch.nn.Module, folder: Path, write: bool) -> None:
    """Write a LoRA run's parts trained in full into checkpoint `folder`; every rank calls it (ZeRO-3 gathers),
    the one with `write` writes."""
    if not is_peft(model):
        return  # a full run's checkpoint holds the whole model already
    from safetensors.torch import save_file

    tensors = {name: gathered(param).contiguous() for name, param in trained_in_full(model).items()}
    if write and tensors:
        save_file(tensors, str(Path(folder) / TRAINED_IN_FULL))


def _parts(model: torch.nn.Module, names: Any) -> str:
    family = perceiver_family(model.config)
    return ", ".join(sorted({part_of(name, family) for name in names}))


def _some(names: list[str]) -> str:
    return f"{len(names)} tensor{'s' if len(names) > 1 else ''}, e.g. {names[0]}"


def _has_deepspeed_states(checkpoint: Path) -> bool:
    return (checkpoint / "latest").is_file() or any(checkpoint.glob("global_step*"))


def check_resume(model: torch.nn.Module, checkpoint: Path) -> bool:
    """Refuse, before anything runs, a checkpoint of the other kind (LoRA / full) or a LoRA checkpoint that cannot
    give back every part this run trains in full; True when `trained_in_full.safetensors` is there to restore."""
    checkpoint = Path(checkpoint)
    lora = is_peft(model)
    if lora != (checkpoint / ADAPTER_CONFIG).is_file():
        what = (
            "holds no LoRA adapter, but this run trains with LoRA"
            if lora
            else "holds a LoRA adapter, but this run trains the LLM in full"
        )
        raise BadInputError(f"{checkpoint} {what}", hint=SAME_FLAGS)
    expected = trained_in_full(model) if lora else {}
    path = checkpoint / TRAINED_IN_FULL
    if not expected or (not path.is_file() and _has_deepspeed_states(checkpoint)):
        return False
    if not path.is_file():
        raise BadInputError(
            f"{checkpoint} holds no {TRAINED_IN_FULL}: resuming would restart {_parts(model, expected)} "
            "from their starting values (the checkpoint was written by an older dpa)",
            hint="start the stage over with --restart",
        )
    try:
        shard, stored = read_shard(path)
        verify_data_size(shard)
    except CheckpointError as err:
        raise CheckpointError(
            err.message, hint=f"delete {checkpoint.name} to resume from an earlier one, or start over with --restart"
        ) from None
    _check_tensors(model, path, expected, stored)
    return True


def _check_tensors(model: torch.nn.Module, path: Path, expected: dict[str, Any], stored: dict[str, Any]) -> None:
    """The file holds exactly the tensors this run trains in full, in the model's shapes."""
    missing, extra = sorted(set(expected) - set(stored)), sorted(set(stored) - set(expected))
    if missing:
        what = f"lacks the {_parts(model, missing)} weights this run trains in full ({_some(missing)})"
        raise BadInputError(f"{path} {what}", hint=SAME_FLAGS)
    if extra:
        what = f"holds {_parts(model, extra)} weights this run does not train ({_some(extra)})"
        raise BadInputError(f"{path} {what}", hint=SAME_FLAGS)
    for name, info in stored.items():
        param = expected[name]
        shape = tuple(getattr(param, "ds_shape", param.shape))  # ZeRO-3 keeps the full shape aside
        if tuple(info.shape) != shape:
            raise BadInputError(f"{path}: {name} is {list(info.shape)}, the model's is {list(shape)}", hint=SAME_FLAGS)


def restore_trained_in_full(model: torch.nn.Module, checkpoint: Path) -> None:
    """Put the checkpoint's parts trained in full back into a LoRA model (not under DeepSpeed: it restores them)."""
    if not check_resume(model, checkpoint):
        return
    from safetensors.torch import load_file

    params = trained_in_full(model)
    with torch.no_grad():
        for name, value in load_file(str(Path(checkpoint) / TRAINED_IN_FULL)).items():
            params[name].copy_(value)
