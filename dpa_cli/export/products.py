"""`W + scale * B @ A`, the LoRA merge of one weight, rounded once to the dtype it is written in.

bf16 weights written as bf16, on a CPU with native bf16 dot products (AVX512-BF16 or AMX), take a fast path:
the product is computed by bf16 hardware without losing the adapter's float32 precision, since each factor is
split into a high and a low bf16 part, `B @ A ~ Bh @ Ah + Bh @ Al + Bl @ Ah` (the dropped `Bl @ Al` is 2^-16
of the product), all three in one `addmm` of rank 3r that accumulates in float32 and adds W before its single
rounding. Against peft's `merge_and_unload` (float32 product, added to the bf16 weight): every element within
2 bf16 ulps of max(|W|, scale * |B| @ |A|), and over 99% of them equal (tests/test_io_limit.py checks both).
Everything else is computed in float32, as peft does.
"""

from __future__ import annotations

import functools

import torch


@functools.cache
def native_bf16() -> bool:
    """Whether this CPU multiplies bf16 natively; elsewhere bf16 matmuls are emulated and slower than float32."""
    probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(getattr(torch.cpu, probe, lambda: False)() for probe in probes)


def _split(factor: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """float32 -> (high, low) bf16 parts whose sum is the factor to 16 bits of mantissa."""
    high = factor.to(torch.bfloat16)
    return high, (factor.float() - high.float()).to(torch.bfloat16)


def _fast(weight: torch.Tensor, dtype: torch.dtype) -> bool:
    """Whether `weight` merged into `dtype` takes the bf16 fast path."""
    return weight.dtype == dtype == torch.bfloat16 and weight.device.type == "cpu" and native_bf16()


def _bf16_factors(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`(Bh|Bh|Bl, Ah;Al;Ah)`: the rank-3r bf16 factors whose product is `b @ a` less `Bl @ Al`."""
    (a_high, a_low), (b_high, b_low) = _split(a), _split(b)
    return torch.cat([b_high, b_high, b_low], 1), torch.cat([a_high, a_low, a_high], 0)


def merged(weight: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scale: float, dtype: torch.dtype) -> torch.Tensor:
    """`weight + scale * b @ a` in `dtype`: the bf16 fast path where it applies, else float32 (one fused addmm)
    cast to `dtype`."""
    if _fast(weight, dtype):
        return torch.addmm(weight, *_bf16_factors(a, b), alpha=scale)
    return weight.float().addmm_(b.float(), a.float(), alpha=scale).to(dtype)


def merge_in_place(weight: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scale: float) -> bool:
    """`weight += scale * b @ a` in `weight`'s own memory, bit for bit what `merged` returns for `weight`'s dtype
    (the same addmm, adding into its input instead of a copy of it); False, `weight` untouched, where that
    computation needs another dtype than `weight`'s (a bf16 or fp16 weight without the fast path)."""
    if _fast(weight, weight.dtype):
        weight.addmm_(*_bf16_factors(a, b), alpha=scale)
        return True
    if weight.dtype == torch.float32:  # `merged`'s `weight.float()` is `weight` itself
        weight.addmm_(b.float(), a.float(), alpha=scale)
        return True
    return False
