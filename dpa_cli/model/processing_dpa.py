"""The DPA processor: one perceiver sequence per image, and the target sequence with one slot per image feature.

It composes the perceiver's image processor and tokenizer with the target's tokenizer (and its chat template).
Each image is wrapped in the perceiver family's own image template, laid out exactly as that family's processor
lays it out; the target text's image marker then expands to as many placeholders as the perceiver gives that
image features. Shipped as remote code next to upgraded checkpoints, so it imports only torch and transformers.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import transformers
from transformers import BatchFeature, ProcessorMixin
from transformers.image_processing_utils import select_best_resolution
from transformers.image_utils import is_valid_image

from .configuration_dpa import FEATURE_SPANS
# The keys that carry an image in a chat content block, as ProcessorMixin.apply_chat_template reads them.
_IMAGE_BLOCK_KEYS = ("image", "url", "path", "base64")

# (image processor output for all images, image index) -> that image's tokens in the perceiver's vocabulary.
ImageTokens = Callable[[dict, int], str]


# --- how each perceiver family lays out one image --------------------------------------------------------
def _real_processor(class_name: str) -> Callable[[DPAProcessor], ImageTokens]:
    """Lay images out with the family's own processor class (LLaVA's and LLaVA-NeXT's build without torchvision)."""

    def build(processor: DPAProcessor) -> ImageTokens:
        kwargs = {**processor.perceiver_processor_kwargs, "image_token": processor.perceiver_image_token}
        real = getattr(transformers, class_name)(processor.image_processor, processor.perceiver_tokenizer, **kwargs)
        return real.replace_image_token

    return build


def _qwen_vl(processor: DPAProcessor) -> ImageTokens:
    """Qwen-VL: one token per `merge_size x merge_size` group of patches (Qwen2VLProcessor's rule; its class
    needs a torchvision video processor)."""
    merge_length = processor.image_processor.merge_size**2

    def tokens(image_inputs: dict, index: int) -> str:
        return processor.perceiver_image_token * (int(image_inputs["image_grid_thw"][index].prod()) // merge_length)

    return tokens


def _idefics3(processor: DPAProcessor) -> ImageTokens:
    """Idefics3 / SmolVLM: per tile `<fake_token_around_image><row_R_col_C>` and `image_seq_len` image tokens, a
    newline after each row of tiles, then the global image. Idefics3Processor's layout; that class re-adds special
    tokens to the tokenizer it is given, and SmolVLMProcessor needs num2words and a torchvision video processor."""
    image = processor.perceiver_image_token * processor.perceiver_processor_kwargs["image_seq_len"]
    whole = f"<fake_token_around_image><global-img>{image}<fake_token_around_image>"

    def tokens(image_inputs: dict, index: int) -> str:
        rows, cols = int(image_inputs["rows"][index][0]), int(image_inputs["cols"][index][0])
        if rows == 0 and cols == 0:  # small images are not split into tiles
            return whole
        grid = "".join(
            "".join(f"<fake_token_around_image><row_{r}_col_{c}>{image}" for c in range(1, cols + 1)) + "\n"
            for r in range(1, rows + 1)
        )
        return grid + "\n" + whole

    return tokens


def onevision_feature_count(settings: dict, pinpoints: list, image_size: list[int], crop_size: list[int]) -> int:
    """LLaVA-OneVision AnyRes: base crop + unpadded crop grid + one newline per grid row, the grid shrunk to about
    `anyres_max_N` crops (LlavaOnevisionProcessor's rule; its class needs a torchvision video processor)."""
    side = int(settings["num_image_tokens"] ** 0.5)  # features per side of one crop
    orig_height, orig_width = image_size
    best_height, best_width = select_best_resolution([orig_height, orig_width], pinpoints)
    height, width = side * (best_height // crop_size[0]), side * (best_width // crop_size[1])
    # The model cuts off the feature rows / columns that only cover the padding AnyRes added around the image.
    if orig_width / orig_height > width / height:
        height -= 2 * ((height - int(round(orig_height * (width / orig_width), 7))) // 2)
    else:
        width -= 2 * ((width - int(round(orig_width * (height / orig_height), 7))) // 2)
    max_crops = int(settings.get("vision_aspect_ratio", "anyres_max_9").strip("anyres_max_"))
    ratio = (height * width / (max_crops * side**2)) ** 0.5
    if ratio > 1.1:
        height, width = int(height // ratio), int(width // ratio)
    count = settings["num_image_tokens"] + height * width + height
    return count - (settings.get("vision_feature_select_strategy") == "default")  # CLS dropped


def _onevision(processor: DPAProcessor) -> ImageTokens:
    settings, pinpoints = processor.perceiver_processor_kwargs, processor.image_processor.image_grid_pinpoints

    def tokens(image_inputs: dict, index: int) -> str:
        image_size = [int(v) for v in image_inputs["image_sizes"][index]]
        crop_size = list(image_inputs["pixel_values"][index][0].shape[-2:])
        return processor.perceiver_image_token * onevision_feature_count(settings, pinpoints, image_size, crop_size)

    return tokens


@dataclass(frozen=True)
class PerceiverFamily:
    """How one perceiver family (by its model_type) turns an image into perceiver inputs."""

    image_token: str  # default perceiver image token
    layout: Callable[[DPAProcessor], ImageTokens]
    template: str = "{image}"  # the image's tokens wrapped the way the family's chat template wraps them
    markers: tuple[str, ...] = ()  # default marker tokens of the template (feature_span="image+markers")
    settings: tuple[str, ...] = ()  # keys of the family processor's config that the layout reads
    required: tuple[str, ...] = ()
    images_kwargs: dict[str, Any] = field(default_factory=dict)
    one_sample_per_image: bool = False  # the image processor batches images as samples (Idefics3)
    unused_outputs: tuple[str, ...] = ()  # image processor outputs the perceiver model does not take
    mm_token_type_ids: bool = False  # M-RoPE: the model finds image tokens by type to build 3-D positions


_QWEN_VL = PerceiverFamily(
    "<|image_pad|>",
    _qwen_vl,
    template="<|vision_start|>{image}<|vision_end|>",
    markers=("<|vision_start|>", "<|vision_end|>"),
    mm_token_type_ids=True,
)
_LLAVA_SETTINGS = ("patch_size", "vision_feature_select_strategy", "num_additional_image_tokens")
_IDEFICS3 = PerceiverFamily(
    "<image>",
    _idefics3,
    settings=("image_seq_len",),
    required=("image_seq_len",),
    images_kwargs={"return_row_col_info": True},
    one_sample_per_image=True,
    unused_outputs=("rows", "cols"),
)

PERCEIVER_FAMILIES: dict[str, PerceiverFamily] = {
    "qwen2_vl": _QWEN_VL,
    "qwen2_5_vl": _QWEN_VL,
    "qwen2_5_vl_qwen3": _QWEN_VL,  # the DPA paper's skeleton (configuration_paper_dpa.py): Qwen2.5-VL's layout
    "qwen3_vl": _QWEN_VL,
    "llava": PerceiverFamily("<image>", _real_processor("LlavaProcessor"), settings=_LLAVA_SETTINGS,
                             required=_LLAVA_SETTINGS[:2]),
    "llava_next": PerceiverFamily("<image>", _real_processor("LlavaNextProcessor"), settings=_LLAVA_SETTINGS,
                                  required=_LLAVA_SETTINGS[:2]),
    "llava_onevision": PerceiverFamily(
        "<image>", _onevision, settings=("num_image_tokens", "vision_feature_select_strategy", "vision_aspect_ratio"),
        required=("num_image_tokens",), unused_outputs=("batch_num_images",)),
    "idefics3": _IDEFICS3,
    "smolvlm": _IDEFICS3,
}  # fmt: skip


def perceiver_family(model_type: str) -> PerceiverFamily:
    """The layout of a perceiver's `model_type`; an unknown one is an error that lists the known ones."""
    if model_type not in PERCEIVER_FAMILIES:
        raise ValueError(
            f"No DPA processor layout for perceiver model_type {model_type!r}; known: {', '.join(PERCEIVER_FAMILIES)}."
        )
    return PERCEIVER_FAMILIES[model_type]


def _single_token_id(tokenizer: Any, token: str, role: str) -> int:
    """The id of `token`, which must encode as exactly one token (else its slots could never be counted)."""
    ids = tokenizer(token, add_special_tokens=False)["input_ids"]
    if len(ids) != 1:
        raise ValueError(f"{role} {token!r} is not a single token of its tokenizer (it encodes to {ids}).")
    return ids[0]


def _token_of_id(tokenizer: Any, token_id: int | None, name: str) -> str:
    known = token_id is not None and 0 <= token_id < len(tokenizer)
    token = tokenizer.convert_ids_to_tokens(token_id) if known else None
    if token is None:
        raise ValueError(f"config.{name}={token_id} is not a token id of the matching tokenizer.")
    return token


def _turn_texts(conversations: list[list[dict]]) -> list[str]:
    """Early fusion's perceiver text of each image (that carries data), in order: its message's text parts."""
    texts = []
    for message in (message for conversation in conversations for message in conversation):
        content = message.get("content") or []
        if isinstance(content, str):
            continue
        turn = "\n".join(block["text"] for block in content if block.get("type") == "text")
        images = [b for b in content if b.get("type") == "image" and any(k in b for k in _IMAGE_BLOCK_KEYS)]
        texts += [turn] * len(images)
    return texts


class DPAProcessor(ProcessorMixin):
    r"""
    Processor of a DPA model: the perceiver's image processor and tokenizer, and the target's tokenizer.

    image_processor: the perceiver family's image processor.
    perceiver_tokenizer: the perceiver's tokenizer (saved in the `perceiver_tokenizer/` subfolder).
    tokenizer: the target's tokenizer with its chat template (saved at the folder root).
    perceiver_model_type (`str`): the perceiver's model_type, which picks its image layout (PERCEIVER_FAMILIES).
    image_token (`str`): the target's image placeholder; the text holds it once per image, the output once per
        perceiver feature. Defaults to the target tokenizer's `image_token`, else `<image>`.
    perceiver_image_token (`str`), perceiver_marker_tokens (`list[str]`): the perceiver's image token and image
        marker tokens; default to the family's (e.g. `<|image_pad|>`, `<|vision_start|>`/`<|vision_end|>`).
    feature_span (`str`): `image` (features at the image tokens) or `image+markers` (also at the markers).
    early_fusion (`bool`): also feed each image's user turn text to the perceiver, after the image.
    perceiver_processor_kwargs (`dict`): the family processor's settings that its layout reads (the keys in
        PerceiverFamily.settings; others are dropped), e.g. `patch_size` and `vision_feature_select_strategy` for
        LLaVA, `image_seq_len` for Idefics3.
    """

    text_kwargs = {"return_token_type_ids": False}  # the DPA model takes no token_type_ids

    def __init__(
        self,
        image_processor: Any,
        perceiver_tokenizer: Any,
        tokenizer: Any,
        chat_template: str | None = None,
        perceiver_model_type: str | None = None,
        image_token: str | None = None,
        perceiver_image_token: str | None = None,
        perceiver_marker_tokens: list[str] | None = None,
        feature_span: str = "image",
        early_fusion: bool = False,
        perceiver_processor_kwargs: dict[str, Any] | None = None,
    ):
        chat_template = chat_template or tokenizer.chat_template  # the target's template renders the conversation
        super().__init__(image_processor, perceiver_tokenizer, tokenizer, chat_template=chat_template)
        family = perceiver_family(perceiver_model_type)
        self.perceiver_model_type = perceiver_model_type
        self.image_token = image_token or getattr(tokenizer, "image_token", None) or "<image>"
        self.perceiver_image_token = perceiver_image_token or family.image_token
        markers = family.markers if perceiver_marker_tokens is None else perceiver_marker_tokens
        self.perceiver_marker_tokens = list(markers)
        self.feature_span = feature_span
        self.early_fusion = early_fusion
        given = perceiver_processor_kwargs or {}  # may be the perceiver's whole processor_config.json
        self.perceiver_processor_kwargs = {key: given[key] for key in family.settings if key in given}
        self._check_settings(family)
        self.image_token_id = _single_token_id(tokenizer, self.image_token, "The target image token")
        self.perceiver_image_token_id = _single_token_id(
            perceiver_tokenizer, self.perceiver_image_token, "The perceiver image token"
        )
        self.feature_token_ids = [self.perceiver_image_token_id]
        if feature_span == "image+markers":
            self.feature_token_ids += [
                _single_token_id(perceiver_tokenizer, marker, "The perceiver marker")
                for marker in self.perceiver_marker_tokens
            ]

    def _check_settings(self, family: PerceiverFamily) -> None:
        if self.feature_span not in FEATURE_SPANS:
            raise ValueError(f"feature_span={self.feature_span!r} is not one of {', '.join(FEATURE_SPANS)}.")
        if self.feature_span == "image+markers" and not self.perceiver_marker_tokens:
            raise ValueError("feature_span='image+markers' needs perceiver_marker_tokens; this perceiver has none.")
        missing = [key for key in family.required if key not in self.perceiver_processor_kwargs]
        if missing:
            raise ValueError(
                f"A {self.perceiver_model_type} perceiver's layout needs perceiver_processor_kwargs {missing} "
                "(from its processor_config.json)."
            )

    @classmethod
    def _get_arguments_from_pretrained(cls, *args: Any, **kwargs: Any) -> list[Any]:
        """The parts, loaded without any sub-folder's own code: dpa wrote them with classes transformers has, so
        code an `auto_map` in `perceiver_tokenizer/` (or beside it) names never runs, whatever the caller trusts."""
        return super()._get_arguments_from_pretrained(*args, **{**kwargs, "trust_remote_code": False})

    @classmethod
    def _load_tokenizer_from_pretrained(cls, sub_processor_type: str, path: Any, subfolder: str = "", **kwargs: Any):
        """The perceiver's tokenizer from its own sub-folder or an error: transformers would quietly load the
        target's tokenizer (the folder's root) in its place, and the perceiver would read the wrong token ids."""
        if sub_processor_type == "tokenizer":
            return super()._load_tokenizer_from_pretrained(sub_processor_type, path, subfolder=subfolder, **kwargs)
        own_folder = f"{subfolder}/{sub_processor_type}" if subfolder else sub_processor_type
        return transformers.AutoTokenizer.from_pretrained(path, subfolder=own_folder, **kwargs)

    @classmethod
    def from_parts(
        cls,
        image_processor: Any,
        perceiver_tokenizer: Any,
        tokenizer: Any,
        config: Any,
        perceiver_processor_config: dict[str, Any] | None = None,
    ) -> DPAProcessor:
        """The processor of a DPA model with `config` (a DPAConfig), from its three parts.

        The token strings come from the config's token ids, so processor and model agree by construction;
        `perceiver_processor_config` is the perceiver's processor_config.json (the family's settings are read
        from it).
        """
        markers = [
            _token_of_id(perceiver_tokenizer, token_id, "perceiver_marker_token_ids")
            for token_id in config.perceiver_marker_token_ids
        ]
        return cls(
            image_processor,
            perceiver_tokenizer,
            tokenizer,
            perceiver_model_type=config.perceiver_config.model_type,
            image_token=_token_of_id(tokenizer, config.image_token_id, "image_token_id"),
            perceiver_image_token=_token_of_id(
                perceiver_tokenizer, config.perceiver_image_token_id, "perceiver_image_token_id"
            ),
            perceiver_marker_tokens=markers or None,
            feature_span=config.feature_span,
            early_fusion=config.early_fusion,
            perceiver_processor_kwargs=perceiver_processor_config,
        )

    @property
    def family(self) -> PerceiverFamily:
        return perceiver_family(self.perceiver_model_type)

    @property
    def model_input_names(self) -> list[str]:
        family = self.family
        names = ["input_ids", "attention_mask", "perceiver_input_ids", "perceiver_attention_mask"]
        names += ["perceiver_mm_token_type_ids"] if family.mm_token_type_ids else []
        return names + [n for n in self.image_processor.model_input_names if n not in family.unused_outputs]

    def __call__(
        self,
        images: Any = None,
        text: str | list[str] | None = None,
        perceiver_text: str | list[str] | None = None,
        return_tensors: str | None = "pt",
        padding: bool | str = True,
        **kwargs: Any,
    ) -> BatchFeature:
        """Model inputs for `text` (rendered by the target's chat template, one image marker per image) and `images`
        (one image, a list in reading order, or one list per sample).

        `perceiver_text` (early fusion only): one string per image, the user's text of the turn holding it;
        `apply_chat_template` derives it from the messages. Other keyword arguments go to the target tokenizer or
        the image processor as in any transformers processor.

        Returns `input_ids`, `attention_mask` `[batch, seq]` and, when there are images, `perceiver_input_ids`,
        `perceiver_attention_mask` `[num_images, perceiver_seq]`, the image processor's tensors and, for Qwen-VL
        perceivers, `perceiver_mm_token_type_ids`.
        """
        for unsupported in ("videos", "audio", "audios"):
            if kwargs.pop(unsupported, None):  # evaluation harnesses pass `videos=[]` for image-only prompts
                raise ValueError(f"The DPA processor reads images and text only; got `{unsupported}`.")
        if text is None:
            raise ValueError(f"The DPA processor needs `text` holding one {self.image_token!r} marker per image.")
        texts = [text] if isinstance(text, str) else list(text)
        images = [image for sample in self._images_per_sample(images, texts) for image in sample]
        merged = self._merge_kwargs(tokenizer_init_kwargs=self.tokenizer.init_kwargs, padding=padding, **kwargs)
        data, counts = {}, []
        if images:
            perceiver_texts = self._perceiver_texts(perceiver_text, len(images))
            data, counts = self._perceiver_inputs(images, perceiver_texts, merged["images_kwargs"])
        data.update(self._target_inputs(texts, counts, merged["text_kwargs"]))
        return BatchFeature(data, tensor_type=return_tensors)

    def _images_per_sample(self, images: Any, texts: list[str]) -> list[list[Any]]:
        """Images grouped by sample, checked against each sample's count of image markers."""
        markers = [text.count(self.image_token) for text in texts]
        if images is None:
            nested = [[] for _ in texts]
        elif is_valid_image(images) or isinstance(images, str):
            nested = [[images]]
        elif all(isinstance(sample, (list, tuple)) for sample in images) and len(images) > 0:
            nested = [list(sample) for sample in images]
        elif len(texts) == 1:
            nested = [list(images)]
        elif sum(markers) == len(images):  # a flat list over several samples: split it in reading order
            starts = [sum(markers[:i]) for i in range(len(markers))]
            nested = [list(images[start : start + n]) for start, n in zip(starts, markers)]
        else:
            raise ValueError(
                f"The texts hold {sum(markers)} {self.image_token!r} markers ({markers} per sample) but {len(images)} "
                "images were given; pass one list of images per sample to match them sample by sample."
            )
        if len(nested) != len(texts):
            raise ValueError(f"Got images for {len(nested)} samples but {len(texts)} texts.")
        for index, (count, sample) in enumerate(zip(markers, nested)):
            if count != len(sample):
                raise ValueError(
                    f"Sample {index}: its text holds {count} {self.image_token!r} marker(s) but {len(sample)} "
                    "image(s) were given for it."
                )
        return [self.image_processor.fetch_images(sample) for sample in nested]

    def _perceiver_texts(self, perceiver_text: str | list[str] | None, num_images: int) -> list[str] | None:
        if not self.early_fusion:
            if perceiver_text is not None:
                raise ValueError("`perceiver_text` is read with early_fusion=True only; this processor has it off.")
            return None
        if perceiver_text is None:
            raise ValueError(
                "early_fusion=True feeds each image's user turn to the perceiver: pass `perceiver_text`, one string "
                "per image, or use apply_chat_template, which takes it from the messages."
            )
        texts = [perceiver_text] if isinstance(perceiver_text, str) else list(perceiver_text)
        if len(texts) != num_images:
            raise ValueError(f"Got {len(texts)} perceiver_text entries for {num_images} images; give one per image.")
        return texts

    def _perceiver_inputs(
        self, images: list[Any], perceiver_texts: list[str] | None, images_kwargs: dict
    ) -> tuple[dict[str, Any], list[int]]:
        """One perceiver sequence per image, the image processor's tensors, and each image's feature count."""
        family = self.family
        batch = [[image] for image in images] if family.one_sample_per_image else images
        image_inputs = self.image_processor(batch, **{**images_kwargs, **family.images_kwargs, "return_tensors": "pt"})
        image_tokens = family.layout(self)
        sequences = [family.template.replace("{image}", image_tokens(image_inputs, i)) for i in range(len(images))]
        if perceiver_texts is not None:
            sequences = [f"{sequence}\n{text}" for sequence, text in zip(sequences, perceiver_texts)]
        encoded = self.perceiver_tokenizer(sequences, padding=True, return_tensors="pt", return_token_type_ids=False)
        ids, mask = encoded["input_ids"], encoded["attention_mask"]
        # Exactly the positions the model turns into features (DPAModel.feature_mask), so the counts agree.
        features = torch.isin(ids, torch.tensor(self.feature_token_ids)) & mask.bool()
        data = {"perceiver_input_ids": ids, "perceiver_attention_mask": mask}
        if family.mm_token_type_ids:
            data["perceiver_mm_token_type_ids"] = (ids == self.perceiver_image_token_id).long()
        data.update({k: v for k, v in image_inputs.items() if k not in family.unused_outputs})
        return data, features.sum(-1).tolist()

    def _target_inputs(self, texts: list[str], counts: list[int], text_kwargs: dict) -> dict[str, Any]:
        """Tokenize the target texts with each image marker expanded to its image's feature count."""
        counts_left = iter(counts)
        expanded, expected = [], []
        for text in texts:
            first, *rest = text.split(self.image_token)
            sample_counts = [next(counts_left) for _ in rest]
            expanded.append(first + "".join(self.image_token * n + part for n, part in zip(sample_counts, rest)))
            expected.append(sum(sample_counts))
        encoded = self.tokenizer(expanded, **{**text_kwargs, "return_tensors": None})
        for index, (ids, want) in enumerate(zip(encoded["input_ids"], expected)):
            if ids.count(self.image_token_id) != want:
                raise ValueError(
                    f"Sample {index}: the target sequence holds {ids.count(self.image_token_id)} image slots but its "
                    f"images have {want} features (truncated by max_length, or {self.image_token!r} in the text?)."
                )
        return dict(encoded)

    def apply_chat_template(self, conversation: list, *args: Any, **kwargs: Any) -> Any:
        """The target's chat template (ProcessorMixin's). With early fusion and `tokenize=True`, each image's
        perceiver text is the text of the message holding it."""
        if self.early_fusion and kwargs.get("tokenize"):
            conversations = conversation if isinstance(conversation[0], (list, tuple)) else [conversation]
            processor_kwargs = dict(kwargs.get("processor_kwargs") or {})
            processor_kwargs.setdefault("perceiver_text", _turn_texts(conversations))
            kwargs["processor_kwargs"] = processor_kwargs
        return super().apply_chat_template(conversation, *args, **kwargs)


__all__ = ["DPAProcessor", "PERCEIVER_FAMILIES", "PerceiverFamily", "onevision_feature_count"]
