"""A stage's result: `stageN/model/` (a loadable HF folder) and, with LoRA, `stageN/adapter/` (PEFT).

With LoRA the base weights do not change except the parts trained in full (phi): `model/` is the source
checkpoint streamed shard by shard with those tensors replaced, so no full copy of the model is gathered.
The adapter names that folder as its base, so plain peft loads the stage as trained. Both folders are written
under temporary names and renamed into place when complete.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import torch

from dpa_cli.checkpoint import LazyTensorReader, read_checkpoint_index
from dpa_cli.checkpoint.atomic import replace_folder
from dpa_cli.checkpoint.reader import torch_dtype
from dpa_cli.checkpoint.side_files import GENERATION_CONFIG, copy_model_code, copy_side_files, point_adapter_at
from dpa_cli.checkpoint.writer import TensorSpec, write_sharded
from dpa_cli.defaults import SHARD_SIZE
from dpa_cli.train.lora_state import gathered, trained_in_full
from dpa_cli.workspace.layout import ADAPTER_DIR, MODEL_DIR


def _tmp(trainer: Any, folder: Path, name: str) -> Path:
    """A clean temporary folder name beside the final one (cleared by the main process, then everyone waits)."""
    tmp = folder / f".{name}.tmp"
    if trainer.is_world_process_zero():
        shutil.rmtree(tmp, ignore_errors=True)
    trainer.accelerator.wait_for_everyone()
    return tmp


def _commit(tmp: Path, final: Path) -> None:
    replace_folder(tmp, final)  # an existing result is swapped out in one step, never deleted first


def trained_full_tensors(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Base-model name -> value of every parameter trained in full (LoRA adapters excluded)."""
    return {name: gathered(param) for name, param in trained_in_full(model).items()}


def write_base_with(source: Path, dest: Path, trained: dict[str, torch.Tensor], meta_model: torch.nn.Module) -> None:
    """Stream `source`'s shards into `dest`, replacing the tensors in `trained` (keys renamed as transformers loads)."""
    from dpa_cli.checkpoint.naming import rename_to_memory

    index = read_checkpoint_index(source)
    names = rename_to_memory(meta_model, index.tensors, source)
    specs = [TensorSpec(key, torch_dtype(info.dtype), info.shape) for key, info in index.tensors.items()]
    with LazyTensorReader(index) as reader:

        def produce(spec: TensorSpec):
            value = trained.get(names[spec.name])
            return reader.slice(spec.name) if value is None else value.to(spec.dtype).reshape(spec.shape)

        write_sharded(dest, specs, produce, SHARD_SIZE)
    copy_side_files(source, dest)


def save_stage_result(
    trainer: Any, processor: Any, source: Path, folder: Path, lora: bool, final: Path | None = None
) -> None:
    """Write `folder/model` (and `folder/adapter` with LoRA); every rank must call it (ZeRO-3 gathers).

    `final`: where `folder` will live when it is built elsewhere and renamed; the adapter names `final/model`.
    """
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
            point_adapter_at(adapter, (final or folder) / MODEL_DIR)
            _commit(adapter, folder / ADAPTER_DIR)
            _commit(model, folder / MODEL_DIR)
    else:
        model = _tmp(trainer, folder, MODEL_DIR)
        trainer.save_model(str(model))
        if trainer.is_world_process_zero():
            (model / "training_args.bin").unlink(missing_ok=True)  # a pickle; the recipe is in dpa.yaml
            processor.save_pretrained(model)
            if (source / GENERATION_CONFIG).is_file():  # the target's stop tokens, over what save_model derived
                shutil.copy2(source / GENERATION_CONFIG, model / GENERATION_CONFIG)
            copy_model_code(model)
            _commit(model, folder / MODEL_DIR)
    trainer.accelerator.wait_for_everyone()


def _meta_like(model: torch.nn.Module) -> torch.nn.Module:
    """A DPA model like `model` on the meta device (for the key names transformers loads with)."""
    from transformers.modeling_utils import set_zero3_state

    from dpa_cli.checkpoint.naming import meta_model

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    # Under ZeRO-3 transformers builds every model inside deepspeed.zero.Init: a collective, which hangs when only
    # the main process builds (as here), and real memory. Marking zero.Init as already entered keeps it on meta.
    with set_zero3_state():
        return meta_model("AutoModelForImageTextToText", base.config)
