"""The export's weights: a checkpoint streamed into new shards, LoRA merged in tensor by tensor, cast on the way.

A tensor whose bytes do not change is copied by the kernel and never loaded; a cast is converted a chunk at a time
while it is written. Adapted weights are read and merged ahead, two at a time in worker threads, while the writer
writes the tensors before them: each read straight into one of three reused memory-file buffers, merged there in
place, and sent to the file from where it lies (`_Merges`). So peak memory is three adapted weights (plus float32
copies where the bf16 fast path of `products.py` does not apply) whatever the model size. A tied LM head is not on
disk, so it stays tied and is written once.
`export_weights` takes folders only, so `dpa bench` can time it on its own.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from types import TracebackType
from typing import Any

import torch

from dpa_cli import loading
from dpa_cli.checkpoint import CheckpointIndex, LazyTensorReader, read_checkpoint_index
from dpa_cli.checkpoint.outchunk import OutputChunk
from dpa_cli.checkpoint.reader import FileSlice, torch_dtype
from dpa_cli.checkpoint.writer import CastSlice, TensorSpec, write_sharded
from dpa_cli.defaults import SHARD_SIZE
from dpa_cli.errors import CheckpointError
from dpa_cli.export.adapter import KEEP, LoraPair, lora_pairs
from dpa_cli.export.products import merge_in_place, merged


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


# Adapted weights being merged while the writer writes, each by a worker thread of its own. On 2 cores the writer
# waited for one worker about 1 s of a 2.7 s merge (bench inputs), for two about 0.6 s.
AHEAD = 2


def _product_threads() -> int:
    """torch's threads per worker: all but two cores (kept for the writer and the hashing thread), shared by the
    workers. torch's threads wait for each other at every operation, so one that waits for a core another thread
    holds stalls the rest: with as many as there are cores, a merge next to a busy writer ran 5-10x slower on 2."""
    return max(1, (torch.get_num_threads() - 2) // AHEAD)


class _Worker:
    """A thread with readers of its own (a reader keeps one shard open), running torch with `threads` threads."""

    def __init__(self, index: CheckpointIndex, adapter: CheckpointIndex, threads: int):
        self.base, self.lora = LazyTensorReader(index), LazyTensorReader(adapter)
        self.pool = ThreadPoolExecutor(
            1, thread_name_prefix="dpa-merge", initializer=torch.set_num_threads, initargs=(threads,)
        )

    def close(self) -> None:
        """Wait for the weight it is merging, drop what is queued, close the readers."""
        self.pool.shutdown(wait=True, cancel_futures=True)
        self.base.close()
        self.lora.close()


class _Merges:
    """The adapted weights, merged `AHEAD` at a time by worker threads while the writer writes.

    Weight k is read into buffer k % (AHEAD + 1) (memory files, `OutputChunk`, reused from one weight to the next:
    no allocation, no page faults), merged there in place, and handed to the writer, which sends it to the file
    from that buffer. The writer asks for tensors in plan order and writes each before asking for the next
    (`write_sharded`), so when weight k is asked for, weight k - 1 is written and its buffer is free for weight
    k + AHEAD, which starts at once.
    """

    def __init__(
        self, index: CheckpointIndex, adapter: CheckpointIndex, targets: dict[str, LoraPair], specs: list[TensorSpec]
    ):
        self.targets = targets
        self.order: list[TensorSpec] = [spec for spec in specs if spec.name in targets]
        size = max([1, *(spec.nbytes for spec in self.order)])  # a memory file cannot map 0 bytes
        self.buffers = [OutputChunk(size) for _ in range(AHEAD + 1)] if self.order else []
        self.threads = (torch.get_num_threads(), _product_threads())
        self.workers = [_Worker(index, adapter, self.threads[1]) for _ in range(AHEAD)] if self.order else []
        self.merging: dict[int, Future] = {}
        self.taken = 0
        for k in range(min(AHEAD, len(self.order))):
            self._start(k)

    def __enter__(self) -> _Merges:
        return self

    def __exit__(self, kind: type[BaseException] | None, err: BaseException | None, tb: TracebackType | None) -> None:
        self.close()

    def _start(self, k: int) -> None:
        worker = self.workers[k % AHEAD]
        self.merging[k] = worker.pool.submit(self._make, worker, k)

    def _make(self, worker: _Worker, k: int) -> torch.Tensor:
        """Weight k of the order, merged: in its buffer where the merge can add in place, else a new tensor."""
        spec = self.order[k]
        pair = self.targets[spec.name]
        a, b = worker.lora.get(pair.a_key), worker.lora.get(pair.b_key)
        stored = torch_dtype(worker.base.index.tensors[spec.name].dtype)
        if stored != spec.dtype:
            return merged(worker.base.get(spec.name), a, b, pair.scale, spec.dtype)
        weight = worker.base.get(spec.name, out=self.buffers[k % len(self.buffers)].tensor)
        return weight if merge_in_place(weight, a, b, pair.scale) else merged(weight, a, b, pair.scale, spec.dtype)

    def take(self, spec: TensorSpec) -> torch.Tensor:
        """Merged `spec`, the next adapted weight in plan order; the one `AHEAD` after it starts meanwhile."""
        k = self.taken
        if k >= len(self.order) or self.order[k] != spec:
            raise ValueError(f"{spec.name}: asked for out of plan order")
        self.taken += 1
        if k + AHEAD < len(self.order):
            self._start(k + AHEAD)
        return self.merging.pop(k).result()

    def close(self) -> None:
        """Stop the workers (weights being merged are finished first), then free the buffers."""
        for worker in self.workers:
            worker.close()
        if self.workers and self.threads[0] != self.threads[1]:
            torch.set_num_threads(self.threads[0])  # the workers' count is torch's default for new threads too
        for buffer in self.buffers:
            buffer.close()


class _Producer:
    """Gives each output tensor: a kernel copy when unchanged, a cast converted while written, or an adapted weight
    merged ahead (`_Merges`)."""

    def __init__(self, base: LazyTensorReader, merges: _Merges | None):
        self.base, self.merges = base, merges

    def __call__(self, spec: TensorSpec) -> torch.Tensor | FileSlice | CastSlice:
        if self.merges is not None and spec.name in self.merges.targets:
            return self.merges.take(spec)
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
        merges = None
        if adapter is not None:
            adapter_index, pairs = lora_pairs(adapter)
            targets = merge_targets(index, adapter, pairs)
            merges = stack.enter_context(_Merges(index, adapter_index, targets, specs))
        files = write_sharded(out, specs, _Producer(reader, merges), shard_size, on_bytes, digests)
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
