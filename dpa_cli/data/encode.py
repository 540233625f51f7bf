"""A sample -> the DPA model's features: target ids with labels, and one perceiver sequence per image.

The DPA processor does the image work (perceiver inputs, each image's feature count, the target's image token
expanded to exactly its slots) and is the one place these rules live: the encoder asks it for the counts and the
expansion. Labels come from `TemplateMasker` on the unexpanded text and are expanded alongside: expansion only
inserts image slots, which are always -100. The encoder checks that its ids equal the processor's, so labels can
never drift from the tokens they label. With the paper encoding, images are first scaled down to the official
training cap (`processor.train_max_pixels`).
"""

from __future__ import annotations

from typing import Any

import torch

from dpa_cli.data.images import ImageError, cap_pixels, load_image
from dpa_cli.data.masking import Layout, TemplateMasker
from dpa_cli.data.samples import BadSampleError, Sample, structural_problems
from dpa_cli.errors import BadInputError, DpaError

IGNORE_INDEX = -100
TARGET_KEYS = ("input_ids", "attention_mask", "labels")
META_KEYS = ("sample_id",)


def processor_refusal(sample_id: str, err: ValueError) -> BadSampleError:
    """The processor refusing a sample's image (too thin for the perceiver's patch grid, an extreme aspect ratio):
    the sample's problem, the same whether it was encoded or only measured from its image sizes."""
    return BadSampleError(sample_id, "processor_error", f"the DPA processor refuses it ({err})")


def size_counts(counter: Any, sample_id: str, sizes: list[tuple[int, int]]) -> list[int]:
    """Feature counts of a sample's images from their sizes (`FeatureCounter`), refusals as the encoder's."""
    try:
        return [counter(size) for size in sizes]
    except ValueError as err:
        raise processor_refusal(sample_id, err) from None


def expand(processor: Any, layout: Layout, counts: list[int]) -> tuple[list[int], list[int]]:
    """Target ids with image `i`'s marker expanded to its slots (the processor's rule), and labels (-100 where not
    supervised; image slots never are)."""
    ids, labels = [], []
    for token_id, source in processor.expand_ids(layout.ids, counts):
        ids.append(token_id)
        supervised = source is not None and layout.supervised[source] and token_id != processor.image_token_id
        labels.append(token_id if supervised else IGNORE_INDEX)
    return ids, labels


CUT = "cut"


def length_verdict(ids: list[int], labels: list[int], max_length: int, slot_ids: set[int]) -> str | None:
    """What training does with a sample of this length: None (it fits), CUT (it is cut at `max_length`, after its
    last image slot, and something supervised is left), or why it is dropped instead. `dpa data check` asks the
    same question, so the check and the run agree."""
    last_slot = max((i for i, token_id in enumerate(ids) if token_id in slot_ids), default=-1)
    first_learned = next((i for i, label in enumerate(labels) if label != IGNORE_INDEX), len(labels))
    return verdict_of(len(ids), last_slot, first_learned, max_length)


def verdict_of(length: int, last_slot: int, first_learned: int, max_length: int) -> str | None:
    """`length_verdict` from the positions it reads: the last image slot's (-1: none) and the first supervised
    token's (`length`: none). Lengths computed without encoding (data/lengths.py) are judged here too."""
    if length <= max_length:
        return None
    if last_slot >= max_length:
        return "cutting it would split an image's slots"
    if first_learned >= max_length:
        return "nothing supervised is left within it"
    return CUT


class SampleEncoder:
    """Turns a `Sample` into un-padded model features; one per (processor, stage, max_length).

    Over `max_length` (target tokens, image slots included) a sample is cut after its last image slot; a sample
    whose cut would fall inside (or before) an image's slots, or leave nothing supervised, is a `BadSampleError`
    of kind `too_long`. With `strict`, every sample over `max_length` is.
    """

    def __init__(self, processor: Any, stage: int, max_length: int, strict: bool = False):
        if stage not in (1, 2):
            raise BadInputError(f"stage {stage}: the recipe has stages 1 and 2")
        if max_length < 1:
            raise BadInputError(f"max_length {max_length}: must be a positive number of tokens")
        self.processor, self.stage, self.max_length, self.strict = processor, stage, max_length, strict
        self.masker = TemplateMasker(processor, stage)
        self.image_token_id = processor.image_token_id
        self.slot_ids = set(processor.image_slot_token_ids)

    def layout(self, sample: Sample) -> Layout:
        """The sample's rendered text and supervised tokens, after its structural checks (no image read)."""
        problems = structural_problems(sample)
        if problems:
            kind, message = problems[0]
            raise BadSampleError(sample.id, kind, message)
        layout = self.masker.layout(sample)
        markers = layout.ids.count(self.image_token_id)
        if markers != len(sample.images):
            message = f"the rendered text holds {markers} image token(s) for {len(sample.images)} image(s)"
            raise BadSampleError(sample.id, "marker_mismatch", f"{message} (is the literal image token in the text?)")
        if not any(layout.supervised):
            raise BadSampleError(sample.id, "no_supervised", "no token is supervised")
        return layout

    def load_images(self, sample: Sample) -> list[Any]:
        images = []
        for ref in sample.images:
            try:
                images.append(load_image(ref)[0])
            except ImageError as err:
                raise BadSampleError(sample.id, err.kind, err.message) from None
        return images

    def __call__(self, sample: Sample) -> dict[str, Any]:
        return self.encode(sample)

    def encode(self, sample: Sample, images: list[Any] | None = None) -> dict[str, Any]:
        """Features of one sample; `images` are its decoded images when the caller has loaded them already."""
        layout = self.layout(sample)
        images = self.load_images(sample) if images is None else images
        images = [cap_pixels(image, self.processor.train_max_pixels) for image in images]
        texts = self.processor.perceiver_texts(sample.messages)
        kwargs = {"perceiver_text": texts} if images and texts is not None else {}
        try:
            inputs = self.processor(
                images=images or None, text=layout.text, add_special_tokens=False, return_tensors="pt", **kwargs
            )
        except ValueError as err:  # e.g. an image too thin for the perceiver's patch grid
            raise processor_refusal(sample.id, err) from None
        ids, labels = expand(self.processor, layout, self.processor.feature_counts(inputs))
        if ids != inputs["input_ids"][0].tolist():
            raise DpaError(
                f"sample {sample.id}: the processor's target ids differ from the masked layout's",
                hint="the target tokenizer does not tokenize the image token apart; please report this",
            )
        ids, labels = self._fit(sample, ids, labels)
        features = {k: v for k, v in inputs.items() if k not in TARGET_KEYS}
        features.update(
            input_ids=torch.tensor(ids, dtype=torch.long),
            attention_mask=torch.ones(len(ids), dtype=torch.long),
            labels=torch.tensor(labels, dtype=torch.long),
            sample_id=sample.id,
        )
        return features

    def refusal(self, sample_id: str, length: int, verdict: str | None) -> BadSampleError | None:
        """Why a sample of `length` tokens with this `verdict` is not trained (None: it is, cut when over)."""
        if verdict is None or (verdict == CUT and not self.strict):
            return None
        where = f"{length} tokens (image slots included), over max_length {self.max_length}"
        return BadSampleError(sample_id, "too_long", where if verdict == CUT else f"{where}; {verdict}")

    def _fit(self, sample: Sample, ids: list[int], labels: list[int]) -> tuple[list[int], list[int]]:
        verdict = length_verdict(ids, labels, self.max_length, self.slot_ids)
        refusal = self.refusal(sample.id, len(ids), verdict)
        if refusal is not None:
            raise refusal
        return ids[: self.max_length], labels[: self.max_length]
