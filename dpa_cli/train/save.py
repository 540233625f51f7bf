"""A stage's result: `stageN/model/` (a loadable HF folder) and, with LoRA, `stageN/adapter/` (PEFT).

With LoRA the base weights do not change except the parts trained in full (phi): `model/` is the source
checkpoint streamed shard by shard with those tensors replaced, so no full copy of the model is gathered.
Both folders are written under temporary names and renamed into place when complete.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import torch

from dpa_cli.checkpoint import LazyTensorReader, read_checkpoint_index
from dpa_cli.checkpoint.atomic import replace_folder
from dpa_cli.checkpoint.reader import torch_dtype
from dpa_cli.checkpoint.writer import TensorSpec, write_sharded
from dpa_cli.upgrade.files import copy_model_code
from dpa_cli.workspace import MODEL_DIR

ADAPTER_DIR = "adapter"
SHARD_SIZE = 5_000_000_000


def _tmp(trainer: Any, folder: Path, name: str) -> Path:
    """A clean temporary folder name beside the final one (cleared by the main process, then everyone waits)."""
    tmp = folder / f".{name}.tmp"
    if trainer.is_world_process_zero():
        shutil.rmtree(tmp, ignore_errors=True)
    trainer.accelerator.wait_for_everyone()
    return tmp


def _commit(tmp: Path, final: Path) -> None:
    replace_folder(tmp, final)  # an existing result is swapped out in one step, never deleted first


def _copy_side_files(source: Path, dest: Path) -> None:
    """Config, tokenizers, processor and remote code of the source, for a folder that loads on its own."""
    for item in source.iterdir():
        if item.is_file() and not item.name.endswith(".safetensors") and item.name != "model.safetensors.index.json":
            shutil.copy2(item, dest / item.name)
        elif item.is_dir() and not item.name.startswith("."):
            shutil.copytree(item, dest / item.name, dirs_exist_ok=True)


def _gathered(param: torch.nn.Parameter) -> torch.Tensor:
    """A parameter's full value on CPU, gathering it first when ZeRO-3 has partitioned it."""
    if hasattr(param, "ds_id"):
        import deepspeed

        with deepspeed.zero.GatheredParameters([param]):
            return param.data.detach().clone().cpu()
    return param.data.detach().cpu()


def trained_full_tensors(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """In-memory name -> value of every parameter trained in full (LoRA adapters excluded)."""
    trained = {}
    for name, param in model.named_parameters():
        if param.requires_grad and "lora_" not in name:
            trained[name.removeprefix("base_model.model.").replace(".base_layer.", ".")] = _gathered(param)
    return trained


def write_base_with(source: Path, dest: Path, trained: dict[str, torch.Tensor], meta_model: torch.nn.Module) -> None:
    """Stream `source`'s shards into `dest`, replacing the tensors in `trained` (keys renamed as transformers loads)."""
    from dpa_cli.upgrade.naming import rename_to_memory

    index = read_checkpoint_index(source)
    names = rename_to_memory(meta_model, index.tensors, source)
    specs = [TensorSpec(key, torch_dtype(info.dtype), info.shape) for key, info in index.tensors.items()]
    with LazyTensorReader(index) as reader:

        def produce(spec: TensorSpec):
            value = trained.get(names[spec.name])
            return reader.slice(spec.name) if value is None else value.to(spec.dtype).reshape(spec.shape)

        write_sharded(dest, specs, produce, SHARD_SIZE)
    _copy_side_files(source, dest)


def save_stage_result(trainer: Any, processor: Any, source: Path, folder: Path, lora: bool) -> None:
    """Write `folder/model` (and `folder/adapter` with LoRA); every rank must call it (ZeRO-3 gathers)."""
    if lora:
        adapter = _tmp(trainer, folder, ADAPTER_DIR)
        trainer.save_model(str(adapter))
        trained = trained_full_tensors(trainer.model)
        if trainer.is_world_process_zero():
            model = folder / f".{MODEL_DIR}.tmp"
            shutil.rmtree(model, ignore_errors=True)
            model.mkdir()
            write_base_with(source, model, trained, _meta_like(trainer.model))
            (adapter / "training_args.bin").unlink(missing_ok=True)
            _commit(adapter, folder / ADAPTER_DIR)
            _commit(model, folder / MODEL_DIR)
    else:
        model = _tmp(trainer, folder, MODEL_DIR)
        trainer.save_model(str(model))
        if trainer.is_world_process_zero():
            (model / "training_args.bin").unlink(missing_ok=True)  # a pickle; the recipe is in dpa.yaml
            processor.save_pretrained(model)
            if (source / "generation_config.json").is_file():
                shutil.copy2(source / "generation_config.json", model / "generation_config.json")
            copy_model_code(model)
            _commit(model, folder / MODEL_DIR)
    trainer.accelerator.wait_for_everyone()


def _meta_like(model: torch.nn.Module) -> torch.nn.Module:
    """A DPA model like `model` on the meta device (for the key names transformers loads with)."""
    from dpa_cli.upgrade.naming import meta_model

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return meta_model("AutoModelForImageTextToText", base.config)
