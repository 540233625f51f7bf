"""Values and modes several commands share, each spelled once. Torch-free: flags are checked before torch loads.

Modes are `StrEnum`s (they compare equal to the strings users type and dpa.yaml records), so a value is
checked against the one list every caller uses.
"""

from __future__ import annotations

import enum
from typing import Any

SHARD_SIZE = 5_000_000_000  # transformers' save_pretrained default ("5GB", decimal units)
SHARD_SIZE_TEXT = "5GB"  # the same, as the CLI's default flag text


class StrEnum(str, enum.Enum):  # enum.StrEnum needs Python 3.11; dpa supports 3.10
    def __str__(self) -> str:
        return self.value

    @classmethod
    def names(cls) -> tuple[str, ...]:
        return tuple(member.value for member in cls)


class Dtype(StrEnum):
    """Output dtype of `dpa upgrade` / `dpa export`: auto keeps the source's."""

    AUTO = "auto"
    BF16 = "bf16"
    FP16 = "fp16"
    FP32 = "fp32"

    def torch(self) -> Any:
        """The torch dtype this names; None for auto."""
        import torch

        return {Dtype.BF16: torch.bfloat16, Dtype.FP16: torch.float16, Dtype.FP32: torch.float32}.get(self)


class PartMode(StrEnum):
    """How a recipe trains a part (`trainable.<part>`)."""

    FROZEN = "frozen"
    FULL = "full"
    LORA = "lora"


class OnBadSample(StrEnum):
    """What training does with a sample that cannot be encoded: fail before step 1, or skip and count it."""

    FAIL = "fail"
    SKIP = "skip"


class ExportLora(StrEnum):
    """What an export did with a LoRA stage's adapter."""

    MERGED = "merged"
    KEPT = "kept"
    NONE = "none"
