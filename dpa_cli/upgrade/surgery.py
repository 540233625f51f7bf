"""Streamed surgery: write the planned tensors shard by shard, each copied, cast or made on its own.

Kept tensors are copied by the kernel and casts converted a chunk at a time (`checkpoint/copying.py`), so peak
memory is a few chunks plus the largest new or padded tensor, whatever the model size: sources are read with
plain file reads, never memory-mapped, and the model is never instantiated.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from contextlib import ExitStack
from pathlib import Path

import torch

from dpa_cli.checkpoint import LazyTensorReader
from dpa_cli.checkpoint.reader import torch_dtype
from dpa_cli.checkpoint.seeds import tensor_seed
from dpa_cli.checkpoint.writer import CastSlice, FileSlice, TensorSpec, write_sharded
from dpa_cli.upgrade.plan import TensorPlan, UpgradePlan


def init_tensor(plan: TensorPlan, seed: int, fan_in: int) -> torch.Tensor:
    """A new tensor, initialised in float32 then cast.

    `linear`: PyTorch's default nn.Linear init, U(-1/sqrt(fan_in), 1/sqrt(fan_in)) for weight and bias.
    `newline`: LLaVA-NeXT's image_newline init, N(0, 1/hidden).
    """
    generator = torch.Generator().manual_seed(tensor_seed(seed, plan.name))
    if plan.init == "newline":
        values = torch.randn(plan.shape, generator=generator) / math.sqrt(plan.shape[-1])
    else:
        bound = 1 / math.sqrt(fan_in)
        values = torch.empty(plan.shape).uniform_(-bound, bound, generator=generator)
    return values.to(plan.dtype)


def _fan_ins(plans: list[TensorPlan]) -> dict[str, int]:
    """A bias's fan-in is its weight's input width (as nn.Linear.reset_parameters uses)."""
    widths = {p.name.removesuffix(".weight"): p.shape[-1] for p in plans if p.name.endswith(".weight")}
    return {p.name: widths.get(p.name.rsplit(".", 1)[0], p.shape[-1]) for p in plans}


def _pad_vocab(tensor: torch.Tensor, rows: int) -> torch.Tensor:
    """Append rows for an added image token: the mean row, so the LM head does not favour the new token."""
    return torch.cat([tensor, tensor.mean(dim=0, keepdim=True).expand(rows, -1)], dim=0)


def _source_dtype(plan: UpgradePlan, tensor: TensorPlan) -> torch.dtype:
    checkpoint = next(c for c in plan.sources.all() if c.role == tensor.source)
    return torch_dtype(checkpoint.index.tensors[tensor.key].dtype)


class TensorSource:
    """Produces each planned tensor from its source checkpoint (one open shard per source) or its init."""

    def __init__(self, plan: UpgradePlan, stack: ExitStack):
        self.by_name = {t.name: t for t in plan.tensors}
        self.readers = {c.role: stack.enter_context(LazyTensorReader(c.index)) for c in plan.sources.all()}
        self.fan_ins = _fan_ins(plan.tensors)
        self.seed = plan.options.seed
        self.dtypes = {t.name: _source_dtype(plan, t) for t in plan.tensors if t.key is not None}

    def __call__(self, spec: TensorSpec) -> torch.Tensor | FileSlice | CastSlice:
        plan = self.by_name[spec.name]
        if plan.source == "new":
            return init_tensor(plan, self.seed, self.fan_ins[plan.name])
        reader = self.readers[plan.source]
        if plan.pad_rows:
            return _pad_vocab(reader.get(plan.key).float(), plan.pad_rows).to(plan.dtype)
        piece = reader.slice(plan.key)
        if self.dtypes[plan.name] == plan.dtype:
            return piece  # unchanged bytes: copied in the kernel, never loaded
        return CastSlice(piece, self.dtypes[plan.name])  # converted chunk by chunk while written


def write_weights(
    plan: UpgradePlan,
    folder: Path,
    on_bytes: Callable[[int], None] | None = None,
    digests: dict[str, str] | None = None,
) -> list[Path]:
    """Write every planned tensor into safetensors shards (and an index) under `folder`; `digests` receives
    each file's digest, computed while writing."""
    with ExitStack() as stack:
        produce = TensorSource(plan, stack)
        specs = [t.spec for t in plan.tensors]
        return write_sharded(folder, specs, produce, plan.options.shard_size, on_bytes=on_bytes, digests=digests)
