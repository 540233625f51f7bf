"""`dpa data check`: every problem of a dataset, against the processor it will be trained with, before training.

By default each image is decoded (so truncated files are caught) and each sample encoded exactly as training
will encode it. `fast` only reads image headers (size and mode) and counts a sample's image slots from the
image size, which keeps it above 1,000 samples per second on one core.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from dpa_cli import loading
from dpa_cli.data.encode import CUT, IGNORE_INDEX, SampleEncoder, expand, length_verdict, size_counts
from dpa_cli.data.formats import open_samples
from dpa_cli.data.images import ImageError, load_image, probe_image
from dpa_cli.data.render import perceiver_segments, supervised_segments
from dpa_cli.data.samples import BadSampleError, Sample
from dpa_cli.errors import BadInputError
from dpa_cli.model.processing_dpa import FeatureCounter
from dpa_cli.workspace.layout import MODEL_DIR

# kind -> (severity, what it means). Errors make `dpa data check` exit 2; warnings are said, not fatal.
PROBLEMS: dict[str, tuple[str, str]] = {
    "bad_record": ("error", "malformed sample (missing fields, wrong types, template refuses it)"),
    "video_sample": (
        "error",
        "a video sample (`video` / `videos` entry, <video> marker, video block): dpa trains on images; extract frames",
    ),
    "empty_conversation": ("error", "no turns"),
    "no_assistant": ("error", "no assistant answer to learn"),
    "marker_mismatch": ("error", "<image> markers differ from the number of images"),
    "image_in_assistant": ("error", "an <image> marker inside an assistant turn"),
    "missing_image": ("error", "image file not found"),
    "unsafe_image_path": ("error", "image path leaves the image root (.., absolute path, ~, file:, symlink)"),
    "unsupported_image": ("error", "a URL or a video, not an image file (dpa never downloads)"),
    "bad_image_ref": (
        "error",
        "an image entry that names no image: a number, nested list, base64 text, "
        "control characters, an overlong path, a broken data: URI",
    ),
    "unreadable_image": ("error", "not a readable image (corrupt, empty file, unknown format)"),
    "truncated_image": ("error", "image file is truncated"),
    "image_too_large": ("error", "image over the decompression-bomb limit"),
    "processor_error": ("error", "the DPA processor refuses the sample"),
    "no_supervised": ("error", "no supervised token after rendering with the chat template"),
    "too_long": (
        "error",
        "over max_length (image slots included), and training cannot cut it (it would split an "
        "image's slots or leave nothing supervised): dropped",
    ),
    "cut_at_max_length": (
        "warning",
        "over max_length: training cuts it there (after its last image); the rest of the answer is not learned",
    ),
    "duplicate_id": ("error", "the same id as an earlier sample"),
    "converted_cmyk": ("warning", "CMYK image, converted to RGB"),
    "converted_alpha": ("warning", "image with transparency, composited on white"),
    "converted_grayscale": ("warning", "grayscale image, converted to RGB"),
    "converted_16bit": ("warning", "16-bit image, scaled to 8 bits"),
}
EXAMPLES = 5


def load_processor(workspace_or_processor: Any) -> Any:
    """A processor object as given, or the DPA processor of a workspace (its `model/`) or of a model folder."""
    if not isinstance(workspace_or_processor, (str, Path)):
        return workspace_or_processor
    folder = Path(workspace_or_processor)
    folder = folder / MODEL_DIR if (folder / MODEL_DIR / "config.json").exists() else folder
    if not (folder / "processor_config.json").exists():
        raise BadInputError(f"{folder}: no DPA processor (processor_config.json)", hint="run `dpa upgrade` first")
    return loading.load_processor(folder)


class Report:
    """Problems by kind (count, first ids, first message) and token statistics, gathered sample by sample."""

    def __init__(self) -> None:
        self.problems: dict[str, dict[str, Any]] = {}
        self.lengths: list[int] = []
        self.tokens = {"prompt": 0, "answer": 0, "image": 0}
        self.images = self.text_only = self.samples = 0

    def add(self, sample_id: str, kind: str, message: str) -> None:
        entry = self.problems.setdefault(kind, {"count": 0, "examples": [], "message": message})
        entry["count"] += 1
        if len(entry["examples"]) < EXAMPLES and sample_id not in entry["examples"]:
            entry["examples"].append(sample_id)

    def tokens_of(self, length: int, answer: int, image: int) -> None:
        self.tokens["image"] += image
        self.tokens["answer"] += answer
        self.tokens["prompt"] += length - image - answer
        self.lengths.append(length)

    def result(self) -> dict[str, Any]:
        problems = [
            {
                "kind": kind,
                "severity": PROBLEMS[kind][0],
                "count": entry["count"],
                "examples": entry["examples"],
                "description": PROBLEMS[kind][1],
                "message": entry["message"],
            }
            for kind, entry in self.problems.items()
        ]
        problems.sort(key=lambda p: (p["severity"] != "error", list(PROBLEMS).index(p["kind"])))
        return {"problems": problems, "stats": self.stats()}

    def stats(self) -> dict[str, Any]:
        lengths, counted = sorted(self.lengths), max(len(self.lengths), 1)
        stats: dict[str, Any] = {
            f"{name}_tokens": {"total": total, "mean": round(total / counted, 1)} for name, total in self.tokens.items()
        }
        stats["images"], stats["text_only_samples"], stats["encoded_samples"] = (
            self.images,
            self.text_only,
            len(lengths),
        )
        if lengths:
            pick = lambda q: lengths[min(len(lengths) - 1, int(q * len(lengths)))]  # noqa: E731
            stats["length"] = {
                "min": lengths[0],
                "p50": pick(0.5),
                "p90": pick(0.9),
                "p99": pick(0.99),
                "max": lengths[-1],
                "mean": round(sum(lengths) / len(lengths), 1),
            }
        return stats


class Checker:
    """Checks samples one at a time into a `Report`; keeps the first clean sample's features to show."""

    def __init__(self, processor: Any, stage: int, max_length: int, fast: bool):
        self.processor, self.fast, self.max_length = processor, fast, max_length
        # Encoded whole (never cut) so over-long samples are measured, then judged against max_length here.
        self.encoder = SampleEncoder(processor, stage, max_length=1 << 40)
        self.counter = FeatureCounter(processor) if fast else None
        self.report, self.seen, self.shown = Report(), set(), None

    def _images(self, sample: Sample) -> tuple[list[Any], list[tuple[int, int]], bool]:
        """Decoded images (or, fast, their sizes) and whether all could be read; problems go to the report."""
        images, sizes, ok = [], [], True
        for ref in sample.images:
            try:
                if self.fast:
                    size, warnings = probe_image(ref)
                    sizes.append(size)
                else:
                    image, warnings = load_image(ref)
                    images.append(image)
            except ImageError as err:
                self.report.add(sample.id, err.kind, err.message)
                ok = False
                continue
            for kind, message in warnings:
                self.report.add(sample.id, kind, message)
        return images, sizes, ok

    def _encoded(
        self, sample: Sample, images: list[Any], sizes: list[tuple[int, int]]
    ) -> tuple[list[int], list[int], int]:
        """(ids, labels, image slots): from the processor by default, from image sizes with `fast`."""
        if self.fast and self.shown is not None:
            counts = size_counts(self.counter, sample.id, sizes)
            ids, labels = expand(self.processor, self.encoder.layout(sample), counts)
            return list(ids), list(labels), sum(counts)
        features = self.encoder.encode(sample, None if self.fast else images)
        if self.shown is None:
            self.shown = features
        ids, labels = features["input_ids"].tolist(), features["labels"].tolist()
        return ids, labels, sum(i in self.encoder.slot_ids for i in ids)

    def check(self, sample: Sample) -> None:
        report = self.report
        report.samples += 1
        if sample.id in self.seen:
            report.add(sample.id, "duplicate_id", f"id {sample.id} appears more than once")
        self.seen.add(sample.id)
        report.images += len(sample.images)
        report.text_only += not sample.images
        images, sizes, images_ok = self._images(sample)
        try:
            if not images_ok:
                self.encoder.layout(sample)  # still report what is wrong with the conversation
                return
            ids, labels, image = self._encoded(sample, images, sizes)
        except BadSampleError as err:
            report.add(sample.id, err.kind, err.detail)
            return
        length = len(ids)
        report.tokens_of(length, sum(label != IGNORE_INDEX for label in labels), image)
        verdict = length_verdict(ids, labels, self.max_length, self.encoder.slot_ids)
        if verdict is not None:
            where = f"{length} tokens (image slots included), over max_length {self.max_length}"
            if verdict == CUT:
                report.add(sample.id, "cut_at_max_length", f"{where}: training cuts it there")
            else:
                report.add(sample.id, "too_long", f"{where}; {verdict}")


def check_dataset(
    data: str | Path,
    workspace_or_processor: Any,
    max_length: int,
    image_root: str | Path | None = None,
    limit: int | None = None,
    fast: bool = False,
    stage: int = 2,
    progress: Callable[[int, int | None], None] | None = None,
) -> dict[str, Any]:
    """The `dpa data check` result: `samples`, `problems` (`kind`, `severity`, `count`, `examples`, ...), `stats`,
    `errors` / `warnings` (findings by severity), the rendered `sample` (its target text and each image's
    perceiver text, as segments), and the measured rates (per wall-clock
    second, and per CPU-second of this process: the per-core figure). `max_length`: the recipe's, training's cut."""
    processor = load_processor(workspace_or_processor)
    source = open_samples(data, image_root)
    total = len(source) if limit is None else min(limit, len(source))
    checker = Checker(processor, stage, max_length, fast)
    started, cpu_started = time.perf_counter(), time.process_time()
    for position in range(total):
        checker.check(source[position])
        if progress is not None and (position % 256 == 255 or position == total - 1):
            progress(position + 1, total)
    seconds, cpu_seconds = time.perf_counter() - started, time.process_time() - cpu_started
    result = {"data": str(data), "samples": total, "total_samples": len(source), **checker.report.result()}
    result["errors"] = sum(p["count"] for p in result["problems"] if p["severity"] == "error")
    result["warnings"] = sum(p["count"] for p in result["problems"] if p["severity"] == "warning")
    result["stats"]["max_length"], result["stats"]["stage"] = max_length, stage
    shown = checker.shown
    result["sample"] = (
        None
        if shown is None
        else {
            "id": shown["sample_id"],
            "tokens": len(shown["labels"]),
            "supervised_tokens": int((shown["labels"] != IGNORE_INDEX).sum()),
            "segments": [list(s) for s in supervised_segments(processor, shown)],
            "perceiver": [
                {"features": count, "segments": [list(s) for s in segments]}
                for count, segments in zip(processor.feature_counts(shown), perceiver_segments(processor, shown))
            ],
        }
    )
    result["mode"] = "fast" if fast else "decode"
    result["seconds"], result["cpu_seconds"] = round(seconds, 3), round(cpu_seconds, 3)
    result["samples_per_second"] = round(total / seconds, 1) if seconds > 0 else None
    # Per core: samples over the CPU time this process used, whatever else the machine was doing.
    result["samples_per_cpu_second"] = round(total / cpu_seconds, 1) if cpu_seconds > 0 else None
    return result
