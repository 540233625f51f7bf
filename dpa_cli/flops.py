"""Analytic FLOPs from shapes (torch's FLOP counter over one real step), and device peaks for MFU."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

# Dense bf16 peak per device (vendor figures, no sparsity), matched on the CUDA device name.
PEAK_BF16 = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "A10": 125e12, "4090": 165e12}


def flop_counter() -> Any:
    """torch's FlopCounterMode plus the fused CPU attention kernels (forward and backward), which it does
    not know: without them attention counts on a GPU and vanishes on a CPU."""
    from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count

    def cpu_sdpa(query, key, value, *args, out_shape=None, **kwargs):
        return sdpa_flop_count(query, key, value)

    def cpu_sdpa_backward(grad_out, query, key, value, *args, out_shape=None, **kwargs):
        return sdpa_backward_flop_count(grad_out, query, key, value)

    aten = torch.ops.aten
    mapping = {
        aten._scaled_dot_product_flash_attention_for_cpu: cpu_sdpa,
        aten._scaled_dot_product_flash_attention_for_cpu_backward: cpu_sdpa_backward,
    }
    return FlopCounterMode(display=False, custom_mapping=mapping)


def count_flops(step: Callable[[], Any]) -> int:
    """FLOPs of running `step()` (matmuls, attention, convolutions), counted from operand shapes."""
    with flop_counter() as counter:
        step()
    return int(counter.get_total_flops())


def peak_flops(device: torch.device | str | None = None) -> float | None:
    """The device's dense bf16 peak, when it is a GPU we know; None on CPU or an unknown GPU."""
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name(device)
    return next((flops for key, flops in PEAK_BF16.items() if key in name), None)


def flops_per_token_estimate(model: torch.nn.Module) -> float:
    """6 x the non-embedding parameters: the usual training FLOPs per token, for a live MFU readout."""
    params = sum(p.numel() for name, p in model.named_parameters() if "embed" not in name)
    return 6.0 * params
