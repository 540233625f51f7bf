"""Encoded datasets for the trainer: a sample is encoded when it is read, and bad samples are never silent.

`on_bad_sample="fail"` first runs the cheap checks over every sample (structure, markers, image files present
and inside the image root) and refuses to start with all of them listed; a bad sample met later still raises.
`on_bad_sample="skip"` replaces a bad sample by the next good one (deterministically) and counts it in
`skipped` (by kind) and `skipped_ids`. A sample over max_length that cannot be cut without splitting an image
(`too_long`) is always dropped that way and counted, unless the encoder is strict.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Iterator
from typing import Any

import torch

from dpa_cli.data.encode import SampleEncoder
from dpa_cli.data.image_refs import ImageError, check_ref
from dpa_cli.data.samples import BadSampleError, Sample, structural_problems
from dpa_cli.defaults import OnBadSample
from dpa_cli.errors import BadInputError

logger = logging.getLogger(__name__)


def cheap_problems(sample: Sample) -> list[tuple[str, str]]:
    """Problems found without decoding an image or tokenizing: structure, markers, image references (kind,
    confinement to the image root, the file present), through the same gate every image reader passes."""
    problems = structural_problems(sample)
    for ref in sample.images:
        try:
            check_ref(ref)
        except ImageError as err:
            problems.append((err.kind, err.message))
    return problems


def precheck(source: Any) -> None:
    """Refuse a dataset when any sample fails the cheap checks, naming the first and counting each kind."""
    found: dict[str, list[str]] = {}
    first: BadSampleError | None = None
    for sample in source:
        for kind, message in cheap_problems(sample)[:1]:
            found.setdefault(kind, []).append(sample.id)
            first = first or BadSampleError(sample.id, kind, message)
    if first is None:
        return
    summary = "; ".join(
        f"{len(ids)} {kind} ({', '.join(ids[:3])}{', ...' if len(ids) > 3 else ''})" for kind, ids in found.items()
    )
    where = f" (in {source.path})" if getattr(source, "path", None) is not None else ""
    raise BadSampleError(
        first.sample_id,
        first.kind,
        f"{first.detail}{where}. Bad samples: {summary}",
        hint="see `dpa data check`, fix the data, or pass --on-bad-sample skip",
    )


def _check_mode(on_bad_sample: str) -> None:
    if on_bad_sample not in OnBadSample.names():
        raise BadInputError(f"on_bad_sample {on_bad_sample!r}: use fail or skip")


def skippable(err: BadSampleError, encoder: SampleEncoder, on_bad_sample: str) -> bool:
    """Skip (and count) a bad sample: with `skip`, or when it is only too long for a non-strict encoder."""
    return on_bad_sample == OnBadSample.SKIP or (err.kind == "too_long" and not encoder.strict)


class _Skips:
    """Bad samples met so far: index -> (kind, id), each counted once however often it is met."""

    def __init__(self) -> None:
        self.bad: dict[int, tuple[str, str]] = {}

    def record(self, index: int, err: BadSampleError) -> None:
        if index not in self.bad:
            self.bad[index] = (err.kind, str(err.sample_id))
            logger.warning("skipping %s", err.message)

    @property
    def counts(self) -> Counter:
        return Counter(kind for kind, _ in self.bad.values())

    @property
    def ids(self) -> list[str]:
        return [sample_id for _, (_, sample_id) in sorted(self.bad.items())]


class _SkipReport:
    """What both datasets tell the trainer about the bad samples they skipped."""

    _skips: _Skips

    @property
    def skipped(self) -> Counter:
        """Skipped samples by problem kind (in this process)."""
        return self._skips.counts

    @property
    def skipped_ids(self) -> list[str]:
        return self._skips.ids


class EncodedDataset(_SkipReport, torch.utils.data.Dataset):
    """Map-style and lazy: item `i` is `encoder(source[i])`, or with `skip` the next good sample after it."""

    def __init__(
        self, source: Any, encoder: SampleEncoder, on_bad_sample: str = OnBadSample.FAIL, precheck: bool = True
    ):
        _check_mode(on_bad_sample)
        if getattr(source, "streaming", False):
            raise BadInputError("a streaming source has no random access: use EncodedIterableDataset")
        self.source, self.encoder, self.on_bad_sample = source, encoder, on_bad_sample
        self._skips = _Skips()
        if on_bad_sample == OnBadSample.FAIL and precheck:
            self.precheck()

    def precheck(self) -> None:
        """Refuse to start when any sample fails the cheap checks, naming the kinds and the first ids."""
        precheck(self.source)

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, index: int) -> dict[str, Any]:
        size = len(self)
        for step in range(size):
            features = self.encode_or_skip((index + step) % size)
            if features is not None:
                return features
        raise BadInputError("every sample of the dataset is bad", hint="run `dpa data check` on it")

    def skip(self, index: int, err: BadSampleError) -> None:
        """Count sample `index` as skipped for `err` (found before training: it is never read)."""
        self._skips.record(index, err)

    def encode_or_skip(self, index: int) -> dict[str, Any] | None:
        """Sample `index` encoded, or None when it is bad and skipped (counted); never another sample in its
        place, so a packed row holds exactly the samples it was planned with."""
        if index in self._skips.bad:
            return None
        try:
            return self.encoder(self.source[index])
        except BadSampleError as err:
            if not skippable(err, self.encoder, self.on_bad_sample):
                raise
            self._skips.record(index, err)
            return None


class EncodedIterableDataset(_SkipReport, torch.utils.data.IterableDataset):
    """The streaming counterpart: samples in file order, bad ones skipped and counted, or raised."""

    def __init__(self, source: Any, encoder: SampleEncoder, on_bad_sample: str = OnBadSample.FAIL):
        _check_mode(on_bad_sample)
        self.source, self.encoder, self.on_bad_sample = source, encoder, on_bad_sample
        self._skips = _Skips()

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = torch.utils.data.get_worker_info()
        for position, sample in enumerate(self.source):
            if info is not None and position % info.num_workers != info.id:
                continue
            try:
                yield self.encoder(sample)
            except BadSampleError as err:
                if not skippable(err, self.encoder, self.on_bad_sample):
                    raise
                self._skips.record(position, err)
