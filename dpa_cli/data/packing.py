"""Packing: several samples in one row up to max_length, planned before training from the samples' lengths.

`pack_lengths` is first-fit decreasing bin packing. `PackedDataset` serves one planned row per item (a list of
encoded samples) and `PackingCollator` joins each row: target ids and labels concatenated, the first label of
every sample masked (it would be predicted from the previous sample's last token), position ids restarting at
0 for every sample, and no padding mask. transformers' masking (`find_packed_sequence_indices`) reads the
restarts and lets a token attend only within its own sample (SDPA / eager: a block-diagonal causal mask;
flash-attention: varlen). Per-image perceiver inputs are joined by the plain collator, in reading order, so the
perceiver encodes every image of the batch in one call and the features land in their rows' slots in order.
"""

from __future__ import annotations

from typing import Any

import torch

from dpa_cli.data.dataset import _SkipReport
from dpa_cli.data.encode import IGNORE_INDEX
from dpa_cli.data.samples import BadSampleError
from dpa_cli.errors import BadInputError, DpaError

# Marks a packed batch until `model_inputs` turns it into the model's kwargs. The padding mask stays in the
# batch until then: the Trainer counts the tokens seen from it; the model must not get it (transformers builds
# the packed mask from position ids only when no 2-D mask is given).
PACKED = "packed_rows"


def pack_lengths(lengths: list[int], max_length: int) -> list[list[int]]:
    """First-fit decreasing: sample indices grouped into rows of at most `max_length` tokens; every index once.

    Longest first, each into the first row it fits in. A sample longer than max_length is cut to it by the
    encoder (or dropped, when cutting would split an image): it takes a row of its own. Indices within a row
    are in placement order (longest first); rows in order of creation. O(n log n): a segment tree over the
    rows' free room finds the first row with enough room.
    """
    if max_length < 1:
        raise BadInputError(f"max_length {max_length}: must be a positive number of tokens")
    sizes = [min(max(int(length), 0), max_length) for length in lengths]
    order = sorted(range(len(sizes)), key=lambda i: (-sizes[i], i))
    leaves = 1
    while leaves < max(len(sizes), 1):
        leaves *= 2
    room = [0] * (2 * leaves)  # room[leaves + r]: free tokens of row r (0 until the row is opened)
    rows: list[list[int]] = []
    for index in order:
        size = sizes[index]
        row = _first_fit(room, leaves, size) if rows else None
        if row is None or row >= len(rows):
            row = _open(rows, room, leaves, max_length)
        rows[row].append(index)
        _set(room, leaves + row, room[leaves + row] - size)
    return rows


def _first_fit(room: list[int], leaves: int, size: int) -> int | None:
    """The first row with at least `size` tokens free, or None."""
    if room[1] < size:
        return None
    node = 1
    while node < leaves:
        node = 2 * node if room[2 * node] >= size else 2 * node + 1
    return node - leaves


def _open(rows: list[list[int]], room: list[int], leaves: int, max_length: int) -> int:
    rows.append([])
    _set(room, leaves + len(rows) - 1, max_length)
    return len(rows) - 1


def _set(room: list[int], node: int, value: int) -> None:
    room[node] = value
    node //= 2
    while node:
        room[node] = max(room[2 * node], room[2 * node + 1])
        node //= 2


def uses_mrope(text_config: Any) -> bool:
    """Whether the target LLM takes M-RoPE position ids (Qwen2-VL style: rows t, h, w)."""
    rope = getattr(text_config, "rope_parameters", None) or getattr(text_config, "rope_scaling", None) or {}
    return isinstance(rope, dict) and "mrope_section" in rope


class PackedDataset(_SkipReport, torch.utils.data.Dataset):
    """Item `r` is row `r` of the plan: the encoded samples of `rows[r]` (a skipped bad sample leaves a gap;
    a row left empty gives the next row instead, like the unpacked dataset gives the next good sample)."""

    def __init__(self, dataset: Any, rows: list[list[int]], max_length: int):
        self.dataset, self.rows, self.max_length = dataset, rows, max_length
        self._skips = dataset._skips  # the samples skipped while encoding rows are the inner dataset's

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> list[dict[str, Any]]:
        for step in range(len(self.rows)):
            row = [
                f
                for i in self.rows[(index + step) % len(self.rows)]
                if (f := self.dataset.encode_or_skip(i)) is not None
            ]
            if row:
                return self._checked(index, row)
        raise BadInputError("every sample of the dataset is bad", hint="run `dpa data check` on it")

    def _checked(self, index: int, row: list[dict[str, Any]]) -> list[dict[str, Any]]:
        total = sum(len(f["input_ids"]) for f in row)
        if total > self.max_length:
            ids = ", ".join(str(f.get("sample_id", "?")) for f in row)
            raise DpaError(
                f"packed row {index} holds {total} tokens, over max_length {self.max_length}: the lengths planned "
                f"before training differ from the encoded samples ({ids})",
                hint="train without --pack (recipe key pack: false), and please report this",
            )
        return row


def pack_dataset(dataset: Any, max_length: int, cache_dir: Any = None) -> PackedDataset:
    """The dataset's good samples packed into rows, planned from their lengths (`dpa_cli.data.lengths`, no image
    decoded; `cache_dir` where the text-token cache goes when the data's folder cannot take it). A sample known
    to be bad before training is skipped (counted) and takes no room: every sample trains once per epoch."""
    from dpa_cli.data.lengths import known_lengths

    known = known_lengths(dataset, cache_dir=cache_dir)
    good = []
    for index, length in enumerate(known):
        if isinstance(length, BadSampleError):
            dataset.skip(index, length)
        else:
            good.append(index)
    rows = pack_lengths([known[index] for index in good], max_length)
    return PackedDataset(dataset, [[good[position] for position in row] for row in rows], max_length)


def position_ids(lengths: list[int], total: int) -> torch.Tensor:
    """`[total]`: 0..n-1 for each sample of the row, then 0..k-1 over the padding (a block of its own)."""
    parts = [torch.arange(n) for n in lengths] + [torch.arange(total - sum(lengths))]
    return torch.cat(parts)


class PackingCollator:
    """Rows (lists of encoded samples) -> the DPA model's kwargs, through `collator` (a DPACollator) for the
    perceiver inputs. `mrope`: position ids `[4, rows, seq]` (a text row, then t, h, w: transformers' packed
    form for Qwen-VL text models, which read the packing from the text row), else `[rows, seq]`."""

    def __init__(self, collator: Any, mrope: bool = False):
        self.collator, self.mrope = collator, mrope

    def __call__(self, rows: list[list[dict[str, Any]]]) -> dict[str, Any]:
        batch = self.collator([sample for row in rows for sample in row])  # perceiver inputs in reading order
        joined = [self._join(row) for row in rows]
        length = max(len(ids) for ids, _, _ in joined)
        if self.collator.pad_to_multiple_of:
            length = -(-length // self.collator.pad_to_multiple_of) * self.collator.pad_to_multiple_of
        input_ids = torch.full((len(rows), length), self.collator.pad_id, dtype=torch.long)
        labels = torch.full((len(rows), length), IGNORE_INDEX, dtype=torch.long)
        mask = torch.zeros((len(rows), length), dtype=torch.long)
        positions = torch.stack([position_ids(sizes, length) for _, _, sizes in joined])
        for r, (ids, row_labels, _) in enumerate(joined):
            input_ids[r, : len(ids)], labels[r, : len(ids)], mask[r, : len(ids)] = ids, row_labels, 1
        if self.mrope:
            positions = positions.unsqueeze(0).expand(4, -1, -1).contiguous()
        batch.update(input_ids=input_ids, labels=labels, attention_mask=mask, position_ids=positions)
        batch[PACKED] = True
        return batch

    @staticmethod
    def _join(row: list[dict[str, Any]]) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
        ids = [torch.as_tensor(f["input_ids"]).long() for f in row]
        labels = [torch.as_tensor(f["labels"]).long().clone() for f in row]
        for sample_labels in labels:
            sample_labels[0] = IGNORE_INDEX  # never predicted from the previous sample's last token
        return torch.cat(ids), torch.cat(labels), [len(i) for i in ids]


def model_inputs(batch: dict[str, Any]) -> dict[str, Any]:
    """A batch as the model takes it: a packed one without its padding mask and without a KV cache (either
    would hide the packing from transformers' mask, and samples would attend across their boundaries)."""
    if not batch.pop(PACKED, False):
        return batch
    batch.pop("attention_mask", None)
    batch["use_cache"] = False
    return batch
