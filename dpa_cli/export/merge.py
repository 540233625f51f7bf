"""The export's weights: a checkpoint streamed into new shards, LoRA merged in tensor by tensor, cast on the way.

Each tensor is produced, written and freed on its own, so peak memory is the largest merged tensor (in float32
unless the bf16 fast path of `products.py` applies) whatever the model size. A tensor whose bytes do not change
is copied by the kernel and never loaded; a cast is converted a chunk at a time while it is written. A tied LM
head is not on disk, so it stays tied and is written once.
`export_weights` takes folders only, so `dpa bench` can time it on its own.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from dpa_cli import loading
from dpa_cli.checkpoint import CheckpointIndex, LazyTensorReader, read_checkpoint_index
from dpa_cli.checkpoint.reader import FileSlice, torch_dtype
from dpa_cli.checkpoint.writer import CastSlice, TensorSpec, write_sharded
from dpa_cli.defaults import SHARD_SIZE
from dpa_cli.errors import CheckpointError
from dpa_cli.export.adapter import KEEP, LoraPair, lora_pairs
from dpa_cli.export.products import merged


def _meta_model(folder: Path) -> torch.nn.Module:
    """The checkpoint's model on the meta device: its in-memory names, which the adapter's keys use."""
    from dpa_cli.checkpoint.naming import meta_model

    return meta_model("AutoModelForImageTextToText", loading.load_config(folder))


def merge_targets(index: CheckpointIndex, adapter: Path, pairs: list[LoraPair]) -> dict[str, LoraPair]:
    """{base key on disk: the LoRA pair merged into it}, names matched the way transformers loads the base."""
    from dpa_cli.checkpoint.naming import rename_to_memory

    meta = _meta_model(index.folder)
    on_disk = {memory: key for key, memory in rename_to_memory(meta, index.tensors, index.folder).items()}
    tied = getattr(meta, "all_tied_weights_keys", None) or {}
    targets = {}
    for pair in pairs:
        weight = f"{pair.module}.weight"
        if weight in tied:
            raise CheckpointError(
                f"{adapter}: LoRA adapts {pair.module}, whose weight is tied to {tied[weight]}; "
                "merging would untie them",
                hint=KEEP,
            )
        key = on_disk.get(weight)
        if key is None:
            raise CheckpointError(
                f"{adapter}: LoRA adapts {pair.module}, but {index.folder} holds no {weight}",
                hint="the adapter belongs to another model: export the stage it was trained in",
            )
        shape = index.tensors[key].shape
        if shape != pair.shape:
            raise CheckpointError(
                f"{adapter}: LoRA of {pair.module} makes {list(pair.shape)}, but {key} is {list(shape)}",
                hint="the adapter belongs to another model: export the stage it was trained in",
            )
        targets[key] = pair
    return targets


def _out_dtype(stored: str, dtype: torch.dtype | None) -> torch.dtype:
    """The requested dtype for floating tensors; integer buffers and `None` (auto) keep their own."""
    source = torch_dtype(stored)
    return dtype if dtype is not None and source.is_floating_point else source


class _Producer:
    """Gives each output tensor: a kernel copy when unchanged, else read, merged and cast."""

    def __init__(self, base: LazyTensorReader, lora: LazyTensorReader | None, targets: dict[str, LoraPair]):
        self.base, self.lora, self.targets = base, lora, targets

    def __call__(self, spec: TensorSpec) -> torch.Tensor | FileSlice | CastSlice:
        pair = self.targets.get(spec.name)
        if pair is not None:  # targets are only ever given with their adapter's reader
            return merged(
                self.base.get(spec.name), self.lora.get(pair.a_key), self.lora.get(pair.b_key), pair.scale, spec.dtype
            )
        stored = torch_dtype(self.base.index.tensors[spec.name].dtype)
        piece = self.base.slice(spec.name)
        return piece if stored == spec.dtype else CastSlice(piece, stored)


def export_weights(
    base: Path,
    out: Path,
    adapter: Path | None = None,
    dtype: torch.dtype | None = None,
    shard_size: int = SHARD_SIZE,
    on_bytes: Callable[[int], None] | None = None,
    digests: dict[str, str] | None = None,
) -> dict[str, Any]:
    """Write `base`'s tensors into shards under `out`, with `adapter`'s LoRA merged in, cast to `dtype`;
    `digests` receives each written file's digest.

    Returns what was written: tensors, merged modules, shards, bytes, the floating dtype(s), seconds.
    """
    started = time.perf_counter()
    index = read_checkpoint_index(base)
    specs = [TensorSpec(key, _out_dtype(info.dtype, dtype), info.shape) for key, info in index.tensors.items()]
    targets: dict[str, LoraPair] = {}
    with contextlib.ExitStack() as stack:
        reader = stack.enter_context(LazyTensorReader(index))
        lora = None
        if adapter is not None:
            adapter_index, pairs = lora_pairs(adapter)
            targets = merge_targets(index, adapter, pairs)
            lora = stack.enter_context(LazyTensorReader(adapter_index))
        files = write_sharded(out, specs, _Producer(reader, lora, targets), shard_size, on_bytes, digests)
    return {
        "tensors": len(specs),
        "merged_modules": len(targets),
        "shards": len(files),
        "bytes": sum(spec.nbytes for spec in specs),
        "dtype": ", ".join(sorted({str(s.dtype).removeprefix("torch.") for s in specs if s.dtype.is_floating_point})),
        "seconds": round(time.perf_counter() - started, 3),
    }


def output_bytes(base: Path, dtype: torch.dtype | None) -> int:
    """How many tensor bytes `export_weights` will write (for a progress bar), from the headers alone."""
    index = read_checkpoint_index(base)
    return sum(TensorSpec(k, _out_dtype(i.dtype, dtype), i.shape).nbytes for k, i in index.tensors.items())
