"""Issue 19, the LoRA merge at the I/O limit: adapted weights are read into reused memory-file buffers, merged there
in place by worker threads ahead of the writer (with fewer torch threads than cores, so the products never stall
behind the writer), and sent to the file from the buffer. The bytes are those of the load-merge-write path, bit for
bit, whatever the dtypes, order, shard size or number of workers; a failure anywhere stops the workers.
"""

from __future__ import annotations

import errno
import json
import os
import random
import threading
from pathlib import Path

import pytest
import torch
from blake3 import blake3

from dpa_cli.bench.export import write_adapter
from dpa_cli.checkpoint import LazyTensorReader, copying, outchunk, read_checkpoint_index
from dpa_cli.checkpoint.reader import torch_dtype
from dpa_cli.checkpoint.writer import TensorSpec, write_sharded
from dpa_cli.errors import CheckpointError
from dpa_cli.export import merge, products
from dpa_cli.export.adapter import lora_pairs

FLOATS = [torch.bfloat16, torch.float32, torch.float16]


def _bits(tensor: torch.Tensor) -> torch.Tensor:
    """The tensor's bit patterns, so -0.0 and 0.0 (or two NaNs) differ where the bytes do."""
    return tensor.contiguous().view({1: torch.uint8, 2: torch.int16, 4: torch.int32}[tensor.element_size()])


# --- the product, in place --------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(24))
def test_merging_in_place_is_bit_for_bit_the_merge_whatever_the_threads(seed, monkeypatch):
    rng = random.Random(seed)
    if rng.random() < 0.3:
        monkeypatch.setattr(products, "native_bf16", lambda: False)
    dtype = rng.choice(FLOATS)
    out, inp, rank = rng.randint(1, 160), rng.randint(1, 160), rng.choice([1, 2, 8, 32])
    generator = torch.Generator().manual_seed(seed)
    weight = (torch.randn(out, inp, generator=generator) * rng.choice([1e-3, 0.05, 3.0])).to(dtype)
    a = torch.randn(rank, inp, generator=generator) * rng.choice([1e-3, 0.1])
    b = torch.randn(out, rank, generator=generator) * rng.choice([1e-3, 0.1])
    scale = rng.choice([0.25, 1.0, 2.0, 16.0])
    main = products.merged(weight.clone(), a, b, scale, dtype)  # here, with this thread's torch threads
    work, threads, found = weight.clone(), rng.choice([1, 2, 3]), []

    def in_worker() -> None:  # as the merge's workers run: a thread with a torch thread count of its own
        torch.set_num_threads(threads)
        expected = products.merged(weight.clone(), a, b, scale, dtype)  # a float32 weight is merged in place
        found.extend([expected, products.merge_in_place(work, a, b, scale)])

    before = torch.get_num_threads()
    worker = threading.Thread(target=in_worker)
    worker.start()
    worker.join()
    torch.set_num_threads(before)
    expected, in_place = found
    fast = dtype == torch.bfloat16 and products.native_bf16()
    if in_place:
        assert torch.equal(_bits(work), _bits(expected))
    else:  # only where the merge computes in float32 and rounds back to a 16-bit weight
        assert dtype != torch.float32 and not fast
        assert torch.equal(_bits(work), _bits(weight))
    if fast:  # bf16 sums its rank-3r products in one order whatever the threads: the bytes of any machine
        assert torch.equal(_bits(expected), _bits(main))


# --- the export, against load-merge-write -----------------------------------------------------------------


@pytest.fixture(scope="module")
def model(dpa_workspace) -> Path:
    return dpa_workspace("next_composed") / "model"


def _adapter(model: Path, folder: Path, rng: random.Random) -> Path:
    """A PEFT adapter on every linear layer of the LLM, at a random rank and alpha."""
    write_adapter(model, folder, rank=rng.choice([1, 4, 8]))
    config = json.loads((folder / "adapter_config.json").read_text())
    config["lora_alpha"] = rng.choice([1, 8, 32])
    (folder / "adapter_config.json").write_text(json.dumps(config))
    return folder


def _load_merge_write(model: Path, adapter: Path, out: Path, dtype: torch.dtype | None, shard: int) -> dict[str, str]:
    """The merge done the plain way: every tensor loaded, adapted ones merged by `products.merged`, cast, written."""
    index = read_checkpoint_index(model)
    adapter_index, pairs = lora_pairs(adapter)
    targets = merge.merge_targets(index, adapter, pairs)
    specs = [TensorSpec(k, merge._out_dtype(i.dtype, dtype), i.shape) for k, i in index.tensors.items()]
    out.mkdir()
    digests: dict[str, str] = {}
    with LazyTensorReader(index) as reader, LazyTensorReader(adapter_index) as lora:

        def produce(spec: TensorSpec) -> torch.Tensor:
            pair = targets.get(spec.name)
            if pair is None:
                return reader.get(spec.name).to(spec.dtype)
            a, b = lora.get(pair.a_key), lora.get(pair.b_key)
            return products.merged(reader.get(spec.name), a, b, pair.scale, spec.dtype)

        write_sharded(out, specs, produce, shard, digests=digests)
    return digests


def _files(folder: Path) -> dict[str, str]:
    return {p.name: "blake3:" + blake3(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


@pytest.mark.parametrize("seed", range(8))
def test_the_merge_writes_the_bytes_of_load_merge_write(seed, model, tmp_path, monkeypatch):
    rng = random.Random(seed)
    monkeypatch.setattr(merge, "AHEAD", rng.choice([1, 2, 3]))
    if rng.random() < 0.25:
        monkeypatch.setattr(products, "native_bf16", lambda: False)
    if rng.random() < 0.25:
        monkeypatch.delattr(os, "memfd_create")  # buffers in plain memory, written with write()
    dtype, shard = rng.choice([None, *FLOATS]), rng.choice([3000, 200_000, 10**9])
    adapter = _adapter(model, tmp_path / "adapter", rng)
    expected = _load_merge_write(model, adapter, tmp_path / "plain", dtype, shard)
    found, copied = [], []  # (the output chunk holding each tensor written, its offset) or None; tensors copied
    real_holding, real_write = copying.holding, copying.ChunkBuffers.write
    monkeypatch.setattr(copying, "holding", lambda data: found.append(real_holding(data)) or found[-1])
    monkeypatch.setattr(
        copying.ChunkBuffers,
        "write",
        lambda self, data, *rest: copied.append(data.numel()) or real_write(self, data, *rest),
    )
    (tmp_path / "out").mkdir()
    digests: dict[str, str] = {}
    written = merge.export_weights(model, tmp_path / "out", adapter, dtype, shard, digests=digests)
    assert _files(tmp_path / "out") == _files(tmp_path / "plain") == digests == expected
    # Every adapted weight went through the writer as a tensor; those merged in place were sent from a buffer
    # (no copy on the way), and only AHEAD + 1 buffers ever held them.
    index = read_checkpoint_index(model)
    targets = merge.merge_targets(index, adapter, lora_pairs(adapter)[1])
    in_place = []
    for name in (k for k in index.tensors if k in targets):
        stored = torch_dtype(index.tensors[name].dtype)
        fast = stored == torch.float32 or (stored == torch.bfloat16 and products.native_bf16())
        in_place.append(dtype in (None, stored) and fast)
    assert len(found) == written["merged_modules"] == len(in_place) > 0
    assert [held is not None for held in found] == in_place
    assert len(copied) == in_place.count(False)  # the others were sent from their buffer, never copied
    assert len({id(held[0]) for held in found if held is not None}) <= merge.AHEAD + 1


@pytest.mark.parametrize("threads", [1, 2, 4, 7])
def test_workers_run_torch_on_the_cores_the_writer_leaves_and_give_the_count_back(
    threads, model, tmp_path, monkeypatch
):
    """torch's threads wait for each other at every operation: products on every core, next to a writer and a
    hash thread, ran 5-10x slower (2 cores). The workers use all but two cores between them; the count is restored."""
    adapter = _adapter(model, tmp_path / "adapter", random.Random(threads))
    seen = []
    real = merge.merge_in_place

    def spy(*args, **kwargs):
        seen.append((threading.current_thread().name, torch.get_num_threads()))
        return real(*args, **kwargs)

    monkeypatch.setattr(merge, "merge_in_place", spy)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        (tmp_path / "out").mkdir()
        merge.export_weights(model, tmp_path / "out", adapter)
        after, fresh = torch.get_num_threads(), []
        thread = threading.Thread(target=lambda: fresh.append(torch.get_num_threads()))
        thread.start()
        thread.join()
    finally:
        torch.set_num_threads(before)
    assert seen and {count for _, count in seen} == {max(1, (threads - 2) // merge.AHEAD)}
    assert all(name.startswith("dpa-merge") for name, _ in seen)
    assert after == fresh[0] == threads  # this thread's count, and the default of threads started later


# --- failures stop the workers ----------------------------------------------------------------------------


def _merge_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("dpa-merge")]


@pytest.mark.parametrize("where", ["first weight", "middle weight", "last weight", "writer"])
def test_a_failure_in_a_worker_or_the_writer_is_raised_and_stops_the_workers(where, model, tmp_path, monkeypatch):
    adapter = _adapter(model, tmp_path / "adapter", random.Random(where))
    index = read_checkpoint_index(model)
    targets = merge.merge_targets(index, adapter, lora_pairs(adapter)[1])
    names = [k for k in index.tensors if k in targets]
    before = torch.get_num_threads()
    if where == "writer":
        monkeypatch.setattr(os, "sendfile", lambda *args: (_ for _ in ()).throw(OSError(errno.EIO, "I/O error")))
        monkeypatch.delattr(os, "copy_file_range")  # every byte through sendfile
        expected: type[Exception] = OSError
    else:
        bad = names[{"first weight": 0, "middle weight": len(names) // 2, "last weight": -1}[where]]
        real = LazyTensorReader.get

        def get(self, name, **kwargs):
            if name == bad:
                raise CheckpointError(f"{name}: cannot read it")
            return real(self, name, **kwargs)

        monkeypatch.setattr(LazyTensorReader, "get", get)
        expected = CheckpointError
    (tmp_path / "out").mkdir()
    with pytest.raises(expected):
        merge.export_weights(model, tmp_path / "out", adapter)
    assert _merge_threads() == [] and torch.get_num_threads() == before


# --- the pieces ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("memfd", [True, False])
def test_a_tensor_is_found_in_the_output_chunk_that_holds_it_and_nowhere_else(memfd, monkeypatch):
    if not memfd:
        monkeypatch.delattr(os, "memfd_create")
    chunk, other = outchunk.OutputChunk(4096), outchunk.OutputChunk(64)
    assert chunk.sending == memfd
    inside = chunk.tensor[100:1100].view(torch.int16).reshape(20, 25)
    assert outchunk.holding(inside) == (chunk, 100) and outchunk.holding(other.tensor[8:]) == (other, 8)
    assert outchunk.holding(inside.t()) is None  # not contiguous: its bytes are not a range of the chunk
    assert outchunk.holding(torch.zeros(10)) is None and outchunk.holding(inside.clone()) is None
    chunk.close()
    assert outchunk.holding(inside) is None  # a closed chunk is forgotten
    other.close()


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("pickled", [False, True])
def test_a_tensor_read_into_a_reused_buffer_is_the_tensor_read_alone(seed, pickled, tmp_path):
    rng = random.Random(seed)
    tensors = {
        f"t{i}": (torch.randn([rng.randint(1, 9) for _ in range(rng.randint(1, 3))]) * 3).to(rng.choice(FLOATS))
        for i in range(rng.randint(2, 6))
    }
    if pickled:
        torch.save(tensors, tmp_path / "pytorch_model.bin")
    else:
        specs = [TensorSpec(name, t.dtype, tuple(t.shape)) for name, t in tensors.items()]
        write_sharded(tmp_path, specs, lambda spec: tensors[spec.name], max_shard_bytes=rng.choice([64, 10**6]))
    buffer = torch.full((1024,), 0xAB, dtype=torch.uint8)
    with LazyTensorReader(read_checkpoint_index(tmp_path, pickled=pickled)) as reader:
        for name in rng.sample(sorted(tensors), len(tensors)):
            got = reader.get(name, out=buffer)
            assert got.data_ptr() == buffer.data_ptr() and torch.equal(_bits(got), _bits(tensors[name]))
            assert torch.equal(_bits(reader.get(name)), _bits(tensors[name]))
