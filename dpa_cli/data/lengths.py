"""Every training sample's encoded length, without decoding an image: for length grouping and packing.

A sample's length is what `SampleEncoder` gives it (target tokens, image slots included, cut at `max_length`).
Its text part is the chat-template rendering with one image marker per image, tokenized once and kept as a
*skeleton* (token count, marker positions, first supervised token, last text slot) in a cache beside the data;
its image part is each image's feature count from the size in the file header (`FeatureCounter`, the processor's
own rule), read on every call. The skeleton and the counts give the expanded length, the position of the last
image slot and of the first supervised token, which `verdict_of` judges exactly as the encoder does.

The cache is one JSON file, `.NAME.dpa-lengths.json` beside the data file (or folder), or under `cache_dir`
when that folder is read-only. It holds its key (the data's fingerprint, the target tokenizer and chat template,
the image marker and slot settings, the stage) and is recomputed whenever the key differs.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Any

from dpa_cli import __version__
from dpa_cli.data.dataset import skippable
from dpa_cli.data.encode import CUT, SampleEncoder, size_counts, verdict_of
from dpa_cli.data.images import ImageError, probe_image
from dpa_cli.data.samples import BadSampleError, Sample
from dpa_cli.errors import BadInputError
from dpa_cli.model.processing_dpa import FeatureCounter

logger = logging.getLogger(__name__)
SKELETON_VERSION = 1  # bump when the skeleton's fields or their meaning change
SUFFIX = ".dpa-lengths.json"


def skeleton(encoder: SampleEncoder, sample: Sample) -> list:
    """The text part of a sample's length: `[tokens, first supervised, last text slot, markers, wrapped, learned]`
    (positions in the unexpanded ids), or `["bad", kind, message]` when its conversation is refused."""
    try:
        layout = encoder.layout(sample)
    except BadSampleError as err:
        return ["bad", err.kind, err.detail]
    ids, image = layout.ids, encoder.image_token_id
    start, end = (encoder.processor.marker_slots or [None, None])[:2]
    markers = [i for i, token_id in enumerate(ids) if token_id == image]
    # As DPAProcessor.expand_ids decides it: the text already wraps the marker in the target's slot markers.
    wrapped = [0 < i < len(ids) - 1 and ids[i - 1] == start and ids[i + 1] == end for i in markers]
    learned = [i for i, (token_id, on) in enumerate(zip(ids, layout.supervised)) if on and token_id != image]
    text_slots = [i for i, token_id in enumerate(ids) if token_id in encoder.slot_ids and token_id != image]
    first = learned[0] if learned else len(ids)
    return [len(ids), first, max(text_slots, default=-1), markers, wrapped, len(learned)]


def expanded_length(encoder: SampleEncoder, entry: list, counts: list[int]) -> tuple[int, str | None]:
    """(length before any cut, `verdict_of` it) for a skeleton whose images have `counts` features: each image
    marker becomes its `image_slots` (the processor's rule), which moves everything after it."""
    size, first, last_text_slot, markers, wrapped, _ = entry
    spans = [
        sum(map(len, (before, after))) + pads
        for before, pads, after in map(encoder.processor.image_slots, counts, wrapped)
    ]

    def at(position: int) -> int:  # where an unexpanded position lands once the images before it are expanded
        return position + sum(span - 1 for marker, span in zip(markers, spans) if marker < position)

    length = size + sum(span - 1 for span in spans)
    slots = [at(marker) + span - 1 for marker, span in zip(markers, spans) if span]
    last_slot = max(slots + ([at(last_text_slot)] if last_text_slot >= 0 else []), default=-1)
    return length, verdict_of(length, last_slot, at(first) if first < size else length, encoder.max_length)


def image_counts(counter: FeatureCounter, sample: Sample) -> list[int]:
    """Each image's feature count from its header's size; a missing or unreadable file is the sample's problem."""
    sizes = []
    for ref in sample.images:
        try:
            sizes.append(probe_image(ref)[0])
        except ImageError as err:
            raise BadSampleError(sample.id, err.kind, err.message) from None
    return size_counts(counter, sample.id, sizes)


def _identity(encoder: SampleEncoder) -> str:
    """What the skeletons depend on besides the data: the target tokenizer, its template, the image marker and
    slots, the stage (stage 1 learns captions only), this module's skeleton version and dpa's own (the masking
    and expansion code the skeletons come from may change between releases)."""
    processor, digest = encoder.processor, hashlib.sha256()
    tokenizer = processor.tokenizer
    parts = [
        SKELETON_VERSION,
        __version__,
        encoder.stage,
        encoder.masker.template,
        processor.image_token_id,
        sorted(encoder.slot_ids),
        processor.marker_slots,
        getattr(processor, "encoding", "dpa"),
        type(tokenizer).__name__,
    ]
    digest.update(json.dumps(parts, default=str).encode())
    digest.update(tokenizer.backend_tokenizer.to_str().encode())
    return digest.hexdigest()


def _cache_files(data: Path, cache_dir: Path | None) -> list[Path]:
    """Where the cache may live, best first: beside the data, then under `cache_dir`."""
    data = data.expanduser().resolve()
    files = [data.parent / f".{data.name}{SUFFIX}"]
    if cache_dir is not None:
        tag = hashlib.sha256(str(data).encode()).hexdigest()[:16]
        files.append(Path(cache_dir) / "lengths" / f"{data.name}-{tag}{SUFFIX[1:]}")
    return files


def _read_cache(files: list[Path], key: str, size: int) -> list | None:
    for file in files:
        try:
            cached = json.loads(file.read_text())
        except (OSError, ValueError):
            continue
        if isinstance(cached, dict) and cached.get("key") == key and len(cached.get("samples", ())) == size:
            return cached["samples"]
    return None


def _write_cache(files: list[Path], key: str, skeletons: list) -> Path | None:
    """Write atomically to the first place that takes it (several processes may write the same content)."""
    text = json.dumps({"key": key, "samples": skeletons}, separators=(",", ":"))
    for file in files:
        temporary = None
        try:
            file.parent.mkdir(parents=True, exist_ok=True)
            handle, temporary = tempfile.mkstemp(dir=file.parent, prefix=file.name, suffix=".tmp")
            with os.fdopen(handle, "w") as out:
                out.write(text)
            os.replace(temporary, file)
            return file
        except OSError:
            if temporary is not None:
                Path(temporary).unlink(missing_ok=True)
    logger.warning("the sample lengths could not be cached (%s not writable)", ", ".join(map(str, files)))
    return None


def skeletons(source: Any, encoder: SampleEncoder, cache_dir: Path | None = None) -> tuple[list, Any]:
    """Every sample's skeleton, from the cache when its key matches; and a function that writes them there."""
    from dpa_cli.data.formats import dataset_fingerprint

    path = getattr(source, "path", None)
    files = _cache_files(Path(path), cache_dir) if path is not None else []
    key = f"{dataset_fingerprint(path)}:{_identity(encoder)}" if files else ""
    cached = _read_cache(files, key, len(source)) if files else None
    if cached is not None:
        return cached, lambda: None
    computed = [skeleton(encoder, source[i]) for i in range(len(source))]
    return computed, lambda: _write_cache(files, key, computed) if files else None


def own_lengths(source: Any, encoder: SampleEncoder, entries: list) -> list[int | BadSampleError]:
    """Per sample: its encoded length (after the cut at max_length), or why the encoder refuses it."""
    counter = FeatureCounter(encoder.processor)
    out: list[int | BadSampleError] = []
    for index, entry in enumerate(entries):
        sample = source[index]
        if entry[0] == "bad":
            out.append(BadSampleError(sample.id, entry[1], entry[2]))
            continue
        try:
            length, verdict = expanded_length(encoder, entry, image_counts(counter, sample))
        except BadSampleError as err:
            out.append(err)
            continue
        refusal = encoder.refusal(sample.id, length, verdict)
        out.append(refusal if refusal is not None else min(length, encoder.max_length) if verdict == CUT else length)
    return out


def sample_lengths(dataset: Any, cache_dir: str | Path | None = None) -> list[int]:
    """`len(dataset[i]["input_ids"])` for every `i` of an `EncodedDataset`, without decoding an image.

    A sample the dataset would skip (`--on-bad-sample skip`, or too long to cut) takes the length of the good
    sample that replaces it, as `dataset[i]` does; with `fail`, a bad sample is refused here, before training.
    """
    return _replacements(known_lengths(dataset, cache_dir))


def known_lengths(dataset: Any, cache_dir: str | Path | None = None) -> list[int | BadSampleError]:
    """Each sample's own encoded length, or why the dataset will skip it; a bad sample the dataset would not skip
    (`fail`) is refused here, before training. `cache_dir`: where the text-token cache goes when the data's
    folder cannot take it."""
    source, encoder = dataset.source, dataset.encoder
    if getattr(source, "streaming", False):
        raise BadInputError(
            "a streaming dataset has no lengths known before training",
            hint="drop --streaming to group by length or pack",
        )
    entries, save = skeletons(source, encoder, Path(cache_dir) if cache_dir is not None else None)
    own = own_lengths(source, encoder, entries)
    for item in own:
        if isinstance(item, BadSampleError) and not skippable(item, encoder, dataset.on_bad_sample):
            raise item
    if all(isinstance(item, BadSampleError) for item in own):
        raise BadInputError("every sample of the dataset is bad", hint="run `dpa data check` on it")
    save()
    return own


def _replacements(own: list) -> list[int]:
    """The length each `dataset[index]` has: its own, or the next good sample's, wrapping around (one pass back
    to front, twice, so the last samples see the first ones)."""
    lengths: list[int | None] = [None] * len(own)
    following = None
    for index in [*reversed(range(len(own)))] * 2:
        if not isinstance(own[index], BadSampleError):
            following = own[index]
        lengths[index] = following
    return lengths  # type: ignore[return-value]
