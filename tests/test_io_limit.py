"""Issue 19, upgrade and merge at the I/O limit: the streamed writer (kernel copies of whole runs, casts through
reused chunk buffers, hashes from the page cache) writes the very bytes the load-cast-write path wrote, and their
sha256; kernel copies fall back cleanly; the bf16 merge fast path stays within its stated tolerance of peft's
`merge_and_unload`; commands import only what they need; the bench's figures and probes hold together.
"""

from __future__ import annotations

import errno
import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from blake3 import blake3

from dpa_cli.checkpoint import LazyTensorReader, copying, hashing, read_checkpoint_index
from dpa_cli.checkpoint.hashing import Cancelled
from dpa_cli.checkpoint.reader import torch_dtype
from dpa_cli.checkpoint.writer import CastSlice, TensorSpec, write_sharded
from dpa_cli.export import products

DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.int64, torch.bool, torch.uint8]
FLOATS = [torch.float32, torch.bfloat16, torch.float16]


def _random_tensor(rng: random.Random, dtype: torch.dtype) -> torch.Tensor:
    shape = [rng.choice([0, 1, 3, 7, 64, 129]) for _ in range(rng.randint(0, 3))]
    generator = torch.Generator().manual_seed(rng.randint(0, 2**31))
    values = torch.randn(shape, generator=generator) * rng.choice([1e-3, 1.0, 3e4])  # fp16 overflows to inf too
    if dtype == torch.bool:
        return values > 0
    if not dtype.is_floating_point:
        return values.abs().to(torch.int64).clamp(max=200).to(dtype)
    return values.to(dtype)


def _source(rng: random.Random, folder: Path) -> dict[str, torch.Tensor]:
    """A sharded checkpoint of random tensors of every dtype, written by the real writer."""
    tensors = {f"t{i:02d}": _random_tensor(rng, rng.choice(DTYPES)) for i in range(rng.randint(3, 14))}
    folder.mkdir(parents=True)
    specs = [TensorSpec(name, t.dtype, tuple(t.shape)) for name, t in tensors.items()]
    write_sharded(folder, specs, lambda spec: tensors[spec.name], max_shard_bytes=rng.choice([64, 600, 10**6]))
    return tensors


def _plan(rng: random.Random, index) -> list[TensorSpec]:
    """Output specs: storage order or shuffled, floating tensors cast at random, a new tensor here and there."""
    names = list(index.tensors)
    if rng.random() < 0.3:
        rng.shuffle(names)
    specs = []
    for name in names:
        stored = torch_dtype(index.tensors[name].dtype)
        dtype = rng.choice(FLOATS) if stored.is_floating_point and rng.random() < 0.6 else stored
        specs.append(TensorSpec(name, dtype, index.tensors[name].shape))
        if rng.random() < 0.15:
            specs.append(TensorSpec(f"new.{name}", torch.float32, (5,)))
    return specs


def _write(folder: Path, index, specs: list[TensorSpec], streamed: bool, shard: int) -> dict[str, str]:
    """The plan written either streamed (FileSlice / CastSlice) or as before (load, `.to(dtype)`, write)."""
    folder.mkdir()
    digests: dict[str, str] = {}
    with LazyTensorReader(index) as reader:

        def produce(spec: TensorSpec):
            if spec.name.startswith("new."):
                return torch.arange(5, dtype=torch.float32)
            stored = torch_dtype(index.tensors[spec.name].dtype)
            if not streamed:
                return reader.get(spec.name).to(spec.dtype)
            piece = reader.slice(spec.name)
            return piece if stored == spec.dtype else CastSlice(piece, stored)

        write_sharded(folder, specs, produce, shard, digests=digests)
    return digests


def _files(folder: Path) -> dict[str, str]:
    """The digests dpa records (BLAKE3, labelled), computed here by the blake3 library from the bytes on disk."""
    return {p.name: "blake3:" + blake3(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def _case(seed: int, tmp_path: Path, monkeypatch) -> tuple:
    rng = random.Random(seed)
    _source(rng, tmp_path / "source")
    # Small chunks and hash pieces, so casts, fallbacks and hashes cross many chunk boundaries.
    monkeypatch.setattr(copying, "CHUNK", rng.choice([8, 24, 4096, 1 << 20]))
    monkeypatch.setattr(hashing, "PIECE", rng.choice([7, 4096, 8192, 1 << 20]))
    index = read_checkpoint_index(tmp_path / "source")
    return rng, index, _plan(rng, index), rng.choice([100, 2000, 10**7])


@pytest.mark.parametrize("seed", range(16))
def test_streamed_writes_are_the_bytes_of_load_cast_write_and_hash_what_is_on_disk(seed, tmp_path, monkeypatch):
    rng, index, specs, shard = _case(seed, tmp_path, monkeypatch)
    before = _write(tmp_path / "loaded", index, specs, streamed=False, shard=shard)
    after = _write(tmp_path / "streamed", index, specs, streamed=True, shard=shard)
    assert _files(tmp_path / "streamed") == _files(tmp_path / "loaded")
    assert after == before == _files(tmp_path / "streamed")  # digests computed while writing, of the right bytes


def _runs(index, specs: list[TensorSpec], shard: int) -> list[tuple[str, int, int]]:
    """(source file, offset, bytes) of each maximal run of kept tensors lying back to back in one source file,
    within one output shard: what one kernel copy should move."""
    from dpa_cli.checkpoint.writer import plan_shards

    runs: list[tuple[str, int, int]] = []
    for shard_specs in plan_shards(specs, shard):
        run = None
        for spec in shard_specs:
            info = index.tensors.get(spec.name)
            if info is None or torch_dtype(info.dtype) != spec.dtype:  # new or cast: the run ends
                runs, run = runs + [run] if run else runs, None
                continue
            start = index.shards[info.file].header_bytes + info.data_offsets[0]
            if run and run[0] == str(info.file) and run[1] + run[2] == start:
                run = (run[0], run[1], run[2] + info.nbytes)
            else:
                runs, run = runs + [run] if run else runs, (str(info.file), start, info.nbytes)
        runs += [run] if run else []
    return [run for run in runs if run[2]]


@pytest.mark.parametrize("seed", range(16, 28))
def test_kernel_copies_move_each_run_of_consecutive_tensors_at_once(seed, tmp_path, monkeypatch):
    rng, index, specs, shard = _case(seed, tmp_path, monkeypatch)
    calls, real = [], os.copy_file_range

    def spy(src, dst, count, offset_src=None, offset_dst=None):
        where = (os.readlink(f"/proc/self/fd/{src}"), os.readlink(f"/proc/self/fd/{dst}"))
        calls.append((where, offset_src, os.lseek(dst, 0, os.SEEK_CUR), count))
        return real(src, dst, count, offset_src, offset_dst)

    monkeypatch.setattr(os, "copy_file_range", spy)
    _write(tmp_path / "out", index, specs, streamed=True, shard=shard)
    # One run is one call, or three where its offsets line up for a reflink (`segments`): join those back, the
    # parts of one run continuing each other in both files.
    joined: list[list] = []
    for where, offset, position, count in calls:
        last = joined[-1] if joined else None
        if last and last[0] == where and last[1] + last[3] == offset and last[2] + last[3] == position:
            last[3] += count
        else:
            joined.append([where, offset, position, count])
    assert [(where[0], offset, count) for where, offset, _, count in joined] == _runs(index, specs, shard)
    assert len(calls) <= 3 * len(joined)


def _failing_copy(code: int | None, after: int):
    """copy_file_range that copies `after` bytes at most, then fails with `code` (None: the call is missing)."""
    real, done = os.copy_file_range, [0]

    def copy(src, dst, count, offset_src=None, offset_dst=None):
        if done[0] >= after:
            raise (AttributeError("copy_file_range") if code is None else OSError(code, os.strerror(code)))
        count = min(count, after - done[0], max(1, count // 2))  # a short copy, as the kernel may make
        copied = real(src, dst, count, offset_src, offset_dst)
        done[0] += copied
        return copied

    return copy


@pytest.mark.parametrize("code", [errno.EXDEV, errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL, None])
@pytest.mark.parametrize("after", [0, 37, 5000])
def test_copies_fall_back_to_user_space_where_the_kernel_cannot(code, after, tmp_path, monkeypatch):
    rng, index, specs, shard = _case(101 + after, tmp_path, monkeypatch)
    before = _write(tmp_path / "loaded", index, specs, streamed=False, shard=shard)
    monkeypatch.setattr(os, "copy_file_range", _failing_copy(code, after))
    assert _write(tmp_path / "streamed", index, specs, streamed=True, shard=shard) == before
    assert _files(tmp_path / "streamed") == _files(tmp_path / "loaded")


def _failing_send(code: int, after: int):
    """sendfile that sends `after` bytes at most (in short pieces), then fails with `code`."""
    real, done = os.sendfile, [0]

    def send(out_fd, in_fd, offset, count, *args, **kwargs):
        send.calls += 1
        if done[0] >= after:
            raise OSError(code, os.strerror(code))
        sent = real(out_fd, in_fd, offset, min(count, after - done[0], max(1, count // 2)), *args, **kwargs)
        done[0] += sent
        return sent

    send.calls = 0
    return send


@pytest.mark.parametrize("fault", ["no memfd", "sendfile EINVAL", "sendfile ENOSYS after 100 bytes", "sendfile short"])
def test_bytes_made_in_user_space_fall_back_to_write_where_sendfile_cannot(fault, tmp_path, monkeypatch):
    rng, index, specs, shard = _case(11, tmp_path, monkeypatch)
    before = _write(tmp_path / "loaded", index, specs, streamed=False, shard=shard)
    send = None
    if fault == "no memfd":
        monkeypatch.delattr(os, "memfd_create")
    else:
        code, after = {
            "sendfile EINVAL": (errno.EINVAL, 0),
            "sendfile ENOSYS after 100 bytes": (errno.ENOSYS, 100),
            "sendfile short": (errno.EINVAL, 10**12),
        }[fault]
        monkeypatch.setattr(os, "sendfile", send := _failing_send(code, after))
    assert _write(tmp_path / "streamed", index, specs, streamed=True, shard=shard) == before
    assert _files(tmp_path / "streamed") == _files(tmp_path / "loaded")
    assert send is None or send.calls > 0  # the case did make bytes in user space


def test_a_sendfile_error_the_kernel_means_is_raised_not_hidden(tmp_path, monkeypatch):
    rng, index, specs, shard = _case(11, tmp_path, monkeypatch)
    monkeypatch.setattr(os, "sendfile", _failing_send(errno.EIO, 0))
    with pytest.raises(OSError) as failure:
        _write(tmp_path / "out", index, specs, streamed=True, shard=shard)
    assert failure.value.errno == errno.EIO


def test_bytes_made_in_user_space_are_written_from_plain_memory_where_no_memory_file_maps(tmp_path, monkeypatch):
    import mmap

    rng, index, specs, shard = _case(7, tmp_path, monkeypatch)
    before = _write(tmp_path / "loaded", index, specs, streamed=False, shard=shard)

    def no_map(*args, **kwargs):
        raise OSError(errno.ENODEV, "no mmap on this file system")

    monkeypatch.setattr(mmap, "mmap", no_map)
    assert _write(tmp_path / "streamed", index, specs, streamed=True, shard=shard) == before


def test_a_copy_error_the_kernel_means_is_raised_not_hidden(tmp_path, monkeypatch):
    rng, index, specs, shard = _case(3, tmp_path, monkeypatch)
    monkeypatch.setattr(os, "copy_file_range", _failing_copy(errno.EIO, 0))
    with pytest.raises(OSError) as failure:
        _write(tmp_path / "out", index, [s for s in specs if not s.name.startswith("new.")], streamed=True, shard=shard)
    assert failure.value.errno == errno.EIO


@pytest.mark.parametrize("seed", range(40))
def test_reflink_segments_cover_the_range_and_align_one_body_where_the_offsets_agree(seed):
    rng = random.Random(seed)
    block = rng.choice([512, 4096])
    src, count = rng.randrange(0, 3 * block), rng.randrange(0, 5 * block)
    dst = src + rng.choice([0, block, 3 * block, rng.randrange(1, block)])
    parts = copying.segments(src, dst, count, block)
    assert sum(parts) == count and len(parts) <= 3 and (all(parts) or parts == [0])
    starts = [sum(parts[:i]) for i in range(len(parts))]
    aligned = [
        n for at, n in zip(starts, parts) if (src + at) % block == (dst + at) % block == 0 and n and n % block == 0
    ]
    if (src - dst) % block or count < -dst % block + block:
        assert parts == [count]  # nothing to share: one plain copy
    else:
        assert len(aligned) == 1 and count - aligned[0] < 2 * block  # the whole aligned middle, at once


# --- the LoRA merge fast path against peft ----------------------------------------------------------------


def _ulp(values: torch.Tensor) -> torch.Tensor:
    """bf16's unit in the last place at each value's magnitude."""
    return 2.0 ** (torch.floor(torch.log2(values.abs().clamp_min(2.0**-126))) - 7)


def _peft_merge(weight: torch.Tensor, a: torch.Tensor, b: torch.Tensor, alpha: float) -> torch.Tensor:
    """peft's own merge_and_unload of a LoRA on one bf16 linear layer (adapter in float32, as peft keeps it)."""
    from peft import LoraConfig, get_peft_model

    layer = torch.nn.Sequential()
    layer.add_module("proj", torch.nn.Linear(weight.shape[1], weight.shape[0], bias=False, dtype=torch.bfloat16))
    layer.proj.weight.data.copy_(weight)
    model = get_peft_model(layer, LoraConfig(r=a.shape[0], lora_alpha=alpha, target_modules=["proj"]))
    with torch.no_grad():
        model.base_model.model.proj.lora_A["default"].weight.copy_(a)
        model.base_model.model.proj.lora_B["default"].weight.copy_(b)
    return model.merge_and_unload().proj.weight.detach()


@pytest.mark.parametrize("seed", range(10))
def test_bf16_merge_is_within_two_ulps_of_peft_and_mostly_equal(seed):
    rng = random.Random(seed)
    out, inp, rank = rng.randint(8, 300), rng.randint(8, 300), rng.choice([1, 4, 16, 32])
    generator = torch.Generator().manual_seed(seed)
    weight = (torch.randn(out, inp, generator=generator) * rng.choice([1e-3, 0.02, 0.5])).bfloat16()
    scale = rng.choice([0.5, 1.0, 2.0])
    a = torch.randn(rank, inp, generator=generator) * rng.choice([1e-3, 0.02, 0.3])
    b = torch.randn(out, rank, generator=generator) * rng.choice([1e-3, 0.02, 0.3])
    expected = _peft_merge(weight, a, b, scale * rank)
    got = products.merged(weight, a, b, scale, torch.bfloat16)
    assert got.dtype == torch.bfloat16 and got.shape == weight.shape
    terms = torch.maximum(weight.double().abs(), (b.abs() @ a.abs()).double() * scale)
    distance = (got.double() - expected.double()).abs() / _ulp(terms)
    assert float(distance.max()) <= 2.0
    assert float((got != expected).double().mean()) < 0.01


def test_without_native_bf16_the_merge_is_peft_s_float32_merge(monkeypatch):
    monkeypatch.setattr(products, "native_bf16", lambda: False)
    generator = torch.Generator().manual_seed(0)
    weight = (torch.randn(64, 48, generator=generator) * 0.02).bfloat16()
    a, b = torch.randn(8, 48, generator=generator) * 0.1, torch.randn(64, 8, generator=generator) * 0.1
    assert torch.equal(products.merged(weight, a, b, 2.0, torch.bfloat16), _peft_merge(weight, a, b, 16.0))
    exact = weight.float().addmm_(b, a, alpha=2.0)
    assert torch.equal(products.merged(weight.float(), a, b, 2.0, torch.float32), exact)  # float32: no fast path


# --- commands import only what they need -------------------------------------------------------------------

HEAVY = ("torch", "transformers", "PIL.Image", "peft", "datasets", "deepspeed")


def _modules_after(argv: list[str]) -> list[str]:
    """Which heavy modules a fresh interpreter holds after running `dpa ARGV` (its exit code must be 0)."""
    script = (
        "import json, sys; from dpa_cli.cli.app import app\n"
        "code = app(args=sys.argv[1:], prog_name='dpa', standalone_mode=False)\n"
        f"print(json.dumps([code or 0, [m for m in {HEAVY!r} if m in sys.modules]]))"
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    result = subprocess.run([sys.executable, "-c", script, *argv], capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stderr
    code, modules = json.loads(result.stdout.strip().splitlines()[-1])
    assert code == 0, result.stderr
    return modules


@pytest.fixture(scope="module")
def workspace(dpa_workspace) -> Path:
    return dpa_workspace("next_composed")


TORCH_FREE = {
    "help": lambda ws: ["--help"],
    "inspect": lambda ws: ["inspect", str(ws / "model")],
    "inspect --json": lambda ws: ["inspect", str(ws / "model"), "--json"],
    "catalog": lambda ws: ["catalog"],
    "verify": lambda ws: ["verify", str(ws)],
    "upgrade --help": lambda ws: ["upgrade", "--help"],
    "export --help": lambda ws: ["export", "--help"],
    "bench upgrade --help": lambda ws: ["bench", "upgrade", "--help"],
}


@pytest.mark.parametrize("command", TORCH_FREE)
def test_commands_that_read_headers_and_configs_never_import_torch(command, workspace):
    assert _modules_after(TORCH_FREE[command](workspace)) == []


def test_the_streaming_path_imports_torch_only(workspace, tmp_path):
    """Copying, casting and hashing a checkpoint (an export without an adapter) needs no transformers at all."""
    script = (
        "import json, sys, torch; from pathlib import Path; from dpa_cli.export.merge import export_weights\n"
        "export_weights(Path(sys.argv[1]), Path(sys.argv[2]), dtype=torch.float16)\n"
        f"print(json.dumps([m for m in {HEAVY!r} + ('dpa_cli.model', 'tokenizers') if m in sys.modules]))"
    )
    (tmp_path / "out").mkdir()
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    result = subprocess.run(
        [sys.executable, "-c", script, str(workspace / "model"), str(tmp_path / "out")],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout.strip().splitlines()[-1]) == ["torch"]
    assert read_checkpoint_index(tmp_path / "out").tensors  # it did write the weights


# --- input fingerprints ------------------------------------------------------------------------------------


def test_input_fingerprints_take_a_hub_cache_blobs_sha256_from_its_name(tmp_path):
    """A blob of the Hugging Face cache is named by its sha256: recorded as `sha256:<name>`, never read (a blob
    edited after download keeps its name's digest, the one the hub lists)."""
    from dpa_cli.upgrade.fingerprint import fingerprint_folder
    from tests.factories import add_to_hub_cache

    source = tmp_path / "src"
    source.mkdir()
    (source / "model.safetensors").write_bytes(os.urandom(1 << 16))
    (source / "config.json").write_text("{}")
    snapshot = add_to_hub_cache(tmp_path / "cache", "org/model", source)
    names = {p.name: p.resolve().name for p in snapshot.iterdir()}
    (snapshot / "config.json").resolve().write_text('{"edited": 1}')
    assert fingerprint_folder(snapshot) == {name: f"sha256:{blob}" for name, blob in names.items()}


def test_input_fingerprints_are_the_files_digests_and_cancel_stops_them(tmp_path):
    from dpa_cli.upgrade.fingerprint import InputHashes

    folder = tmp_path / "in"
    (folder / "sub").mkdir(parents=True)
    files = {"a.bin": os.urandom(3 << 20), "sub/b.json": b"{}", "empty": b""}
    for name, data in files.items():
        (folder / name).write_bytes(data)
    (folder / ".hidden").write_bytes(b"skipped")
    inputs = InputHashes()
    inputs.start([folder, folder])  # once per folder
    assert inputs.result(folder) == {name: "blake3:" + blake3(data).hexdigest() for name, data in files.items()}
    stopped = InputHashes()
    stopped.cancel()
    with pytest.raises(Cancelled):
        stopped.result(folder)


# --- the bench's figures -----------------------------------------------------------------------------------


@pytest.mark.parametrize("layout", ["hub", "save_pretrained", "v5"])
def test_keys_saved_as_the_model_holds_them_skip_transformers_renaming_with_the_same_names(tiny_checkpoint, layout):
    """`rename_to_memory` answers keys that already name the model's parameters without building transformers'
    conversion table; for every tiny family and on-disk layout its names equal transformers' own renaming."""
    from dpa_cli import loading
    from dpa_cli.checkpoint.naming import meta_model, rename_to_memory, renamed_by_transformers
    from tests.factories import SPECS

    shortcut = families = 0
    for name, spec in SPECS.items():
        if spec.writer is not None:  # hand-written formats: their family declares its own renaming
            continue
        folder = tiny_checkpoint(name, layout=layout)
        index = read_checkpoint_index(folder)
        model = meta_model(
            f"AutoModelFor{'CausalLM' if spec.family == 'causal_lm' else 'ImageTextToText'}",
            loading.load_config(folder),
        )
        keys = list(index.tensors)
        assert rename_to_memory(model, keys, folder) == renamed_by_transformers(model, keys, folder), (name, layout)
        shortcut += set(keys) <= set(model.state_dict())
        families += 1
    # v5 keys are memory names everywhere; the older layouts take both paths (llava-hf, Qwen-VL legacy names)
    assert shortcut == families if layout == "v5" else 0 < shortcut < families


def test_the_cli_leaves_its_objects_to_reference_counting_at_exit(monkeypatch):
    """`dpa` freezes the garbage collector once the command is done: interpreter shutdown then skips walking
    every object torch and transformers made (1 s after a model import here), as the bench's children do."""
    import gc

    from dpa_cli.bench import measure
    from dpa_cli.cli.app import main

    monkeypatch.setattr(sys, "argv", ["dpa", "--version"])
    gc.unfreeze()
    try:
        with pytest.raises(SystemExit) as done:
            main()
        assert done.value.code in (0, None) and gc.get_freeze_count() > 0
    finally:
        gc.unfreeze()
    assert "gc.freeze()" in measure._CHILD


def test_every_phase_probe_finds_its_function():
    """A renamed function would silently drop out of the breakdown: every probe must resolve."""
    import importlib

    from dpa_cli.bench.phases import BACKGROUND, CRITICAL

    for label, where in (*CRITICAL, *BACKGROUND):
        module, _, path = where.partition(":")
        owner = importlib.import_module(module)
        for part in path.split("."):
            owner = getattr(owner, part)
        assert callable(owner), label


def test_end_to_end_ratios_are_net_of_the_import_and_the_breakdown_takes_medians():
    from dpa_cli.bench.measure import breakdown, ratios

    def run(cp_sync: float, work: float, e2e: float, imports: float) -> dict:
        child = {
            "work_s": work,
            "end_to_end_s": e2e,
            "import_torch_transformers_s": imports,
            "import_rest_s": 1.0,
            "rss_growth": 10,
            "largest_shard": 100,
            "phases": {"plan": work / 4},
        }
        return {"cp_s": cp_sync / 2, "cp_sync_s": cp_sync, "keep": child}

    runs = [run(2.0, 2.2, 9.0, 4.0), run(1.0, 1.5, 7.0, 3.0), run(2.0, 3.0, 10.0, 3.0)]
    r = ratios(runs, "keep")
    assert r["time_over_cp_sync"] == {"min": 1.1, "median": 1.5}
    assert r["end_to_end_net_over_cp_sync"] == {"min": 2.5, "median": 3.5}
    assert r["end_to_end_over_cp_sync"]["min"] == 4.5 and r["rss_growth_over_shard"]["median"] == 0.1
    phases = breakdown(runs, "keep")
    assert phases["import torch, transformers"] == 3.0 and phases["plan"] == 0.55 and phases["work"] == 2.2
    assert phases["interpreter start and exit, printing"] == 1.8  # median of 9-4-1-2.2, 7-3-1-1.5, 10-3-1-3
