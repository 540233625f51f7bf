"""A sample -> the DPA model's features: target ids with labels, and one perceiver sequence per image.

The DPA processor does the image work (perceiver inputs, each image's feature count, the target's image token
expanded to exactly that many slots). Labels come from `TemplateMasker` on the unexpanded text and are expanded
alongside: expansion only inserts image slots, which are always -100. The encoder checks that its ids equal the
processor's, so labels can never drift from the tokens they label.
"""

from __future__ import annotations

from typing import Any

import torch

from dpa_cli.data.images import ImageError, load_image
from dpa_cli.data.masking import Layout, TemplateMasker
from dpa_cli.data.samples import BadSampleError, Sample, image_blocks, message_text, structural_problems
from dpa_cli.errors import BadInputError, DpaError

IGNORE_INDEX = -100
TARGET_KEYS = ("input_ids", "attention_mask", "labels")
META_KEYS = ("sample_id",)


def perceiver_texts(sample: Sample) -> list[str]:
    """Early fusion: each image's perceiver text is the text of the user turn holding it."""
    texts = []
    for message in sample.messages:
        texts += [message_text(message)] * image_blocks(message)
    return texts


def feature_counts(processor: Any, inputs: Any) -> list[int]:
    """Per image: the positions of its perceiver sequence the model turns into features (as the processor counts)."""
    if "perceiver_input_ids" not in inputs:
        return []
    ids, mask = inputs["perceiver_input_ids"], inputs["perceiver_attention_mask"]
    features = torch.isin(ids, torch.tensor(processor.feature_token_ids)) & mask.bool()
    return features.sum(-1).tolist()


def expand(layout: Layout, counts: list[int], image_token_id: int) -> tuple[list[int], list[int]]:
    """Target ids with image `i`'s token repeated counts[i] times, and labels (-100 where not supervised)."""
    ids, labels, image = [], [], 0
    for token_id, supervised in zip(layout.ids, layout.supervised):
        if token_id == image_token_id:
            ids += [token_id] * counts[image]
            labels += [IGNORE_INDEX] * counts[image]
            image += 1
        else:
            ids.append(token_id)
            labels.append(token_id if supervised else IGNORE_INDEX)
    return ids, labels


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
        kwargs = {"perceiver_text": perceiver_texts(sample)} if images and self.processor.early_fusion else {}
        try:
            inputs = self.processor(images=images or None, text=layout.text, add_special_tokens=False,
                                    return_tensors="pt", **kwargs)  # fmt: skip
        except ValueError as err:  # e.g. an image too thin for the perceiver's patch grid
            raise BadSampleError(sample.id, "processor_error", f"the DPA processor refuses it ({err})") from None
        counts = feature_counts(self.processor, inputs)
        ids, labels = expand(layout, counts, self.image_token_id)
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

    def _fit(self, sample: Sample, ids: list[int], labels: list[int]) -> tuple[list[int], list[int]]:
        if len(ids) <= self.max_length:
            return ids, labels
        where = f"{len(ids)} tokens (image slots included), over max_length {self.max_length}"
        if self.strict:
            raise BadSampleError(sample.id, "too_long", where)
        if self.image_token_id in ids[self.max_length :]:
            raise BadSampleError(sample.id, "too_long", f"{where}; cutting it would split an image's slots")
        ids, labels = ids[: self.max_length], labels[: self.max_length]
        if all(label == IGNORE_INDEX for label in labels):
            raise BadSampleError(sample.id, "too_long", f"{where}; nothing supervised is left within it")
        return ids, labels
