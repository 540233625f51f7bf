"""The DPA processor: one perceiver sequence per image, and the target sequence with one slot per image feature.

It composes the perceiver's image processor and tokenizer with the target's tokenizer (and its chat template).
Each image is wrapped in the perceiver family's own image template, laid out exactly as that family's processor
lays it out; the target text's image marker then expands to as many placeholders as the perceiver gives that
image features. Shipped as remote code next to upgraded checkpoints, so it imports only torch and transformers.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import transformers
from transformers import BatchFeature, ProcessorMixin
from transformers.image_processing_utils import select_best_resolution
from transformers.image_utils import is_valid_image

from .configuration_dpa import ENCODINGS, FEATURE_SPANS

# The keys that carry an image in a chat content block, as ProcessorMixin.apply_chat_template reads them.
_IMAGE_BLOCK_KEYS = ("image", "url", "path", "base64")

# (image processor output for all images, image index) -> that image's tokens in the perceiver's vocabulary.
ImageTokens = Callable[[dict, int], str]

# --- the `paper` encoding: the official DPA code's text, token for token -----------------------------------
# Official ids (transcription sec. 5.1) are looked up by these strings in whatever tokenizer is given.
TURN_OPEN, TURN_CLOSE = "<|im_start|>", "<|im_end|>"
PAPER_PERCEIVER_FRAME = TURN_OPEN + "user\n"  # the user-turn frame the official perceiver reads before an image
# Every assistant turn opens with an empty think block (ms-swift ThinkingTemplate, TU:45-56), masked from the
# loss; the generation prompt ends with its opener, as the official chat() does (FVT:249-259).
THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
PAPER_THINK = THINK_OPEN + "\n\n" + THINK_CLOSE + "\n\n"
# The official training resizes every image to at most this many pixels before the processor (PT/SFT/LORA:14
# MAX_PIXELS; ms-swift vision_utils.py:89-99). Training only: the official chat() and benchmark do not cap.
PAPER_TRAIN_MAX_PIXELS = 262_144


def paper_chat_template(image: str) -> str:
    """The target text of the official DPA code (ms-swift's `qwen3` template, QWT:61-65; TB:1107-1163): ChatML
    without a default system turn, messages joined by one newline, no newline after the last `<|im_end|>`, the
    empty think block at the head of every assistant turn (unless its text already opens one), and a message's
    parts joined by newlines, so LLaVA's `<image>\\nQuestion` renders as it does there. `image` is the image's
    text (its markers and placeholder). The generation prompt ends with `<think>\\n\\n`; with
    `enable_thinking=False` it closes the block, as the official benchmark prompt does (EV:130-132)."""
    image = image.replace("'", "\\'")
    return (
        "{%- macro render(content) -%}{%- if content is string -%}{{- content -}}{%- else -%}"
        "{%- for part in content -%}{%- if not loop.first -%}{{- '\\n' -}}{%- endif -%}"
        "{%- if part.type == 'image' -%}{{- '" + image + "' -}}"
        "{%- elif part.type == 'text' -%}{{- part.text -}}{%- endif -%}{%- endfor -%}{%- endif -%}{%- endmacro -%}"
        "{%- for message in messages -%}{%- if not loop.first -%}{{- '\\n' -}}{%- endif -%}"
        "{%- set content = render(message.content) -%}"
        "{%- if message.role == 'assistant' and not content.startswith('" + THINK_OPEN + "') -%}"
        "{%- set content = '" + PAPER_THINK.replace("\n", "\\n") + "' + content -%}{%- endif -%}"
        "{{- '" + TURN_OPEN + "' + message.role + '\\n' + content + '" + TURN_CLOSE + "' -}}"
        "{%- endfor -%}"
        "{%- if add_generation_prompt -%}{{- '\\n" + TURN_OPEN + "assistant\\n" + THINK_OPEN + "\\n\\n' -}}"
        "{%- if enable_thinking is defined and enable_thinking is false -%}"
        "{{- '" + THINK_CLOSE + "\\n\\n' -}}{%- endif -%}{%- endif -%}"
    )


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
    "llava": PerceiverFamily(
        "<image>", _real_processor("LlavaProcessor"), settings=_LLAVA_SETTINGS, required=_LLAVA_SETTINGS[:2]
    ),
    "llava_next": PerceiverFamily(
        "<image>", _real_processor("LlavaNextProcessor"), settings=_LLAVA_SETTINGS, required=_LLAVA_SETTINGS[:2]
    ),
    "llava_onevision": PerceiverFamily(
        "<image>",
        _onevision,
        settings=("num_image_tokens", "vision_feature_select_strategy", "vision_aspect_ratio"),
        required=("num_image_tokens",),
        unused_outputs=("batch_num_images",),
    ),
    "idefics3": _IDEFICS3,
    "smolvlm": _IDEFICS3,
}


def perceiver_image_rules(model_type: str) -> PerceiverFamily:
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


def _turn_texts(conversations: list[list[dict]], bare_images: bool = False) -> list[str]:
    """Early fusion's perceiver text of each image (that carries data, or any with `bare_images`), in order: the
    text parts of its message, joined by newlines, which the perceiver reads before the image."""
    texts = []
    for message in (message for conversation in conversations for message in conversation):
        content = message.get("content") or []
        if isinstance(content, str):
            continue
        turn = "\n".join(block["text"] for block in content if block.get("type") == "text")
        images = [b for b in content if b.get("type") == "image"]
        texts += [turn] * sum(1 for b in images if bare_images or any(k in b for k in _IMAGE_BLOCK_KEYS))
    return texts


def capped_size(size: tuple[int, int], max_pixels: int | None) -> tuple[int, int]:
    """(width, height) scaled down proportionally to at most `max_pixels`, as the official DPA training does
    before its processor (ms-swift `rescale_image`, vision_utils.py:89-99: height sqrt(max / ratio) and width
    height * ratio, each truncated); unchanged when within the cap or without one."""
    width, height = size
    if not max_pixels or width * height <= max_pixels:
        return size
    ratio = width / height
    scaled_height = math.sqrt(max_pixels / ratio)
    return int(scaled_height * ratio), int(scaled_height)


class FeatureCounter:
    """An image's feature count (its target slots) from its size alone, equal to `DPAProcessor.feature_counts` of
    the processed image: the one size rule `dpa data check --fast`, length grouping and packing use.

    Qwen-VL perceivers: the image processor's patch count over merge_size^2. LLaVA, LLaVA-NeXT (composed
    perceivers too) and OneVision: the family's own layout rule fed the image size. Both plus the markers the
    feature span takes, calibrated once on a real processor run (a blank image, nothing decoded). Other families:
    the processor run once per distinct size on a blank image. Sizes go through the encoding's training cap first.
    """

    SIZE_RULE = ("llava", "llava_next", "llava_onevision")

    def __init__(self, processor: Any):
        self.processor, self.cache = processor, {}
        images = processor.image_processor
        if processor.family.mm_token_type_ids and hasattr(images, "get_number_of_image_patches"):
            self.rule = self._qwen_rule
        elif processor.perceiver_model_type in self.SIZE_RULE:
            self.rule, self._tokens = self._layout_rule, processor.family.layout(processor)
        else:
            self.rule = None
        calibration = (56, 56)
        self._inputs = self._run(calibration)
        self.extra = 0 if self.rule is None else processor.feature_counts(self._inputs)[0] - self.rule(calibration)

    def _run(self, size: tuple[int, int]) -> Any:
        from PIL import Image

        processor = self.processor
        texts = processor.perceiver_texts([{"role": "user", "content": [{"type": "image"}]}])
        kwargs = {} if texts is None else {"perceiver_text": texts}
        return processor(
            images=[Image.new("RGB", size)],
            text=processor.image_token,
            add_special_tokens=False,
            return_tensors="pt",
            **kwargs,
        )

    def _qwen_rule(self, size: tuple[int, int]) -> int:
        images = self.processor.image_processor
        return images.get_number_of_image_patches(size[1], size[0], {}) // images.merge_size**2

    def _layout_rule(self, size: tuple[int, int]) -> int:
        # These layouts read only the image size and the (fixed) crop shape of the processed pixels.
        inputs = {"image_sizes": [[size[1], size[0]]], "pixel_values": self._inputs["pixel_values"]}
        return self._tokens(inputs, 0).count(self.processor.perceiver_image_token)

    def __call__(self, size: tuple[int, int]) -> int:
        """Features of an image of `size` = (width, height), after the encoding's training cap if it has one."""
        size = tuple(size)
        if size not in self.cache:
            rule, fed = self.rule, capped_size(size, self.processor.train_max_pixels)
            self.cache[size] = rule(fed) + self.extra if rule else self.processor.feature_counts(self._run(fed))[0]
        return self.cache[size]


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
    early_fusion (`bool`): also feed each image's user turn text to the perceiver, before the image (a causal
        perceiver's image states never see text that follows the image).
    encoding (`str`): `dpa` or `paper` (the official DPA code's text: see `paper_chat_template`; the perceiver
        reads the user-turn frame before each image, `<|im_start|>user\\n` + the turn's text before the image).
    target_marker_tokens (`list[str]`): the target's image start and end markers; with `image+markers` they are
        image slots too, so an image's N+2 features fill its start, N pads and end.
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
        encoding: str = "dpa",
        target_marker_tokens: list[str] | None = None,
    ):
        chat_template = chat_template or tokenizer.chat_template  # the target's template renders the conversation
        super().__init__(image_processor, perceiver_tokenizer, tokenizer, chat_template=chat_template)
        family = perceiver_image_rules(perceiver_model_type)
        self.perceiver_model_type = perceiver_model_type
        self.image_token = image_token or getattr(tokenizer, "image_token", None) or "<image>"
        self.perceiver_image_token = perceiver_image_token or family.image_token
        markers = family.markers if perceiver_marker_tokens is None else perceiver_marker_tokens
        self.perceiver_marker_tokens = list(markers)
        self.feature_span = feature_span
        self.early_fusion = early_fusion
        self.encoding = encoding
        self.target_marker_tokens = list(target_marker_tokens or [])
        given = perceiver_processor_kwargs or {}  # may be the perceiver's whole processor_config.json
        self.perceiver_processor_kwargs = {key: given[key] for key in family.settings if key in given}
        self._check_settings(family)
        self.image_token_id = _single_token_id(tokenizer, self.image_token, "The target image token")
        self.perceiver_image_token_id = _single_token_id(
            perceiver_tokenizer, self.perceiver_image_token, "The perceiver image token"
        )
        self.feature_token_ids = [self.perceiver_image_token_id]
        self.marker_slots: list[int] = []  # the target's start and end marker ids, when they are image slots
        if feature_span == "image+markers":
            self.feature_token_ids += [
                _single_token_id(perceiver_tokenizer, marker, "The perceiver marker")
                for marker in self.perceiver_marker_tokens
            ]
            self.marker_slots = [
                _single_token_id(tokenizer, marker, "The target marker") for marker in self.target_marker_tokens
            ]
        # Target token ids the model overwrites with features (DPAConfig.image_slot_token_ids), in reading order.
        self.image_slot_token_ids = [self.image_token_id, *self.marker_slots]
        if encoding == "paper":
            _single_token_id(perceiver_tokenizer, TURN_OPEN, "The paper encoding's perceiver turn opener")

    def _check_settings(self, family: PerceiverFamily) -> None:
        if self.feature_span not in FEATURE_SPANS:
            raise ValueError(f"feature_span={self.feature_span!r} is not one of {', '.join(FEATURE_SPANS)}.")
        if self.encoding not in ENCODINGS:
            raise ValueError(f"encoding={self.encoding!r} is not one of {', '.join(ENCODINGS)}.")
        if self.feature_span == "image+markers" and not self.perceiver_marker_tokens:
            raise ValueError("feature_span='image+markers' needs perceiver_marker_tokens; this perceiver has none.")
        if len(self.target_marker_tokens) not in (0, 2):
            raise ValueError("target_marker_tokens holds an image's start and end markers: two, or none.")
        if self.encoding == "paper" and (self.feature_span != "image+markers" or not self.target_marker_tokens):
            raise ValueError("encoding='paper' needs feature_span='image+markers' and two target_marker_tokens.")
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
        target_markers = [
            _token_of_id(tokenizer, token_id, "target_marker_token_ids")
            for token_id in getattr(config, "target_marker_token_ids", None) or []
        ]
        encoding = getattr(config, "encoding", "dpa")
        image_token = _token_of_id(tokenizer, config.image_token_id, "image_token_id")
        # The paper encoding brings its own template: the official text, whatever the target's template does.
        wrapped = image_token.join(target_markers) if target_markers else image_token
        return cls(
            image_processor,
            perceiver_tokenizer,
            tokenizer,
            chat_template=paper_chat_template(wrapped) if encoding == "paper" else None,
            perceiver_model_type=config.perceiver_config.model_type,
            image_token=image_token,
            perceiver_image_token=_token_of_id(
                perceiver_tokenizer, config.perceiver_image_token_id, "perceiver_image_token_id"
            ),
            perceiver_marker_tokens=markers or None,
            feature_span=config.feature_span,
            early_fusion=config.early_fusion,
            perceiver_processor_kwargs=perceiver_processor_config,
            encoding=encoding,
            target_marker_tokens=target_markers or None,
        )

    @property
    def family(self) -> PerceiverFamily:
        return perceiver_image_rules(self.perceiver_model_type)

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

        `perceiver_text` (early fusion only): one string per image, the user's text of the turn holding it, which
        the perceiver reads before the image; `apply_chat_template` derives it from the messages. Other keyword
        arguments go to the target tokenizer or the image processor as in any transformers processor.

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
            heads = self._perceiver_heads(perceiver_text, texts, len(images))
            data, counts = self._perceiver_inputs(images, heads, merged["images_kwargs"])
        data.update(self._target_inputs(texts, counts, merged["text_kwargs"]))
        return BatchFeature(data, tensor_type=return_tensors)

    @property
    def train_max_pixels(self) -> int | None:
        """The most pixels a training image may have before the image processor sees it (None: its own cap)."""
        return PAPER_TRAIN_MAX_PIXELS if self.encoding == "paper" else None

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

    def _perceiver_heads(self, perceiver_text: str | list[str] | None, texts: list[str], num_images: int) -> list[str]:
        """Per image, what its perceiver sequence holds before the image's own tokens.

        The perceiver is causal: an image's states depend only on what comes before it, so text after the image
        (the rest of the conversation, which the official code also feeds) is left out, exactly. `dpa`: nothing,
        or with early fusion the turn's text. `paper`: the user-turn frame as training renders it, read from the
        target text (`<|im_start|>user\\n` + the turn's text before the image), or with early fusion the frame and
        the whole turn's text, the question before the image as in the official instruction-context variant.
        """
        if not self.early_fusion:
            if perceiver_text is not None:
                raise ValueError("`perceiver_text` is read with early_fusion=True only; this processor has it off.")
            return self._turn_heads(texts) if self.encoding == "paper" else [""] * num_images
        if perceiver_text is None:
            raise ValueError(
                "early_fusion=True feeds each image's user turn to the perceiver: pass `perceiver_text`, one string "
                "per image, or use apply_chat_template, which takes it from the messages."
            )
        turns = [perceiver_text] if isinstance(perceiver_text, str) else list(perceiver_text)
        if len(turns) != num_images:
            raise ValueError(f"Got {len(turns)} perceiver_text entries for {num_images} images; give one per image.")
        frame = PAPER_PERCEIVER_FRAME if self.encoding == "paper" else ""
        return [frame + (f"{turn}\n" if turn else "") for turn in turns]

    def _turn_heads(self, texts: list[str]) -> list[str]:
        """Paper: per image, its turn of the target text up to the image, from the turn's `<|im_start|>` (the
        frame alone when no turn opens before it). An earlier image of the same turn is left out with the newline
        that joins it, since this sequence has no pixels for it (the official perceiver sees it)."""
        start, end = self.target_marker_tokens
        heads = []
        for text in texts:
            pieces = text.split(self.image_token)
            turn = ""
            for index, piece in enumerate(pieces[:-1]):
                if index > 0:  # the text after the previous image: drop that image's end marker and joiner
                    piece = piece.removeprefix(end).removeprefix("\n")
                opened = piece.rfind(TURN_OPEN)
                turn = (piece[opened:] if opened >= 0 else turn + piece).removesuffix(start)
                heads.append(turn if turn.startswith(TURN_OPEN) else PAPER_PERCEIVER_FRAME + turn)
        return heads

    def _perceiver_inputs(
        self, images: list[Any], heads: list[str], images_kwargs: dict
    ) -> tuple[dict[str, Any], list[int]]:
        """One perceiver sequence per image (its head, then the image), the image processor's tensors, and each
        image's feature count."""
        family = self.family
        batch = [[image] for image in images] if family.one_sample_per_image else images
        image_inputs = self.image_processor(batch, **{**images_kwargs, **family.images_kwargs, "return_tensors": "pt"})
        image_tokens = family.layout(self)
        sequences = [
            head + family.template.replace("{image}", image_tokens(image_inputs, i)) for i, head in enumerate(heads)
        ]
        encoded = self.perceiver_tokenizer(sequences, padding=True, return_tensors="pt", return_token_type_ids=False)
        data = {"perceiver_input_ids": encoded["input_ids"], "perceiver_attention_mask": encoded["attention_mask"]}
        if family.mm_token_type_ids:
            data["perceiver_mm_token_type_ids"] = (encoded["input_ids"] == self.perceiver_image_token_id).long()
        data.update({k: v for k, v in image_inputs.items() if k not in family.unused_outputs})
        return data, self.feature_counts(data)

    def feature_mask(self, perceiver_input_ids: Any, perceiver_attention_mask: Any) -> Any:
        """The perceiver positions the model turns into features, `[num_images, perceiver_seq]`: exactly those of
        DPAModel.feature_mask (its config's feature_token_ids), outside the padding."""
        ids = torch.as_tensor(perceiver_input_ids)
        return torch.isin(ids, torch.tensor(self.feature_token_ids)) & torch.as_tensor(perceiver_attention_mask).bool()

    def feature_counts(self, inputs: Any) -> list[int]:
        """Per image: its number of features (the image slots its target marker expands to), from this
        processor's outputs; the one count every caller uses."""
        if "perceiver_input_ids" not in inputs:
            return []
        return self.feature_mask(inputs["perceiver_input_ids"], inputs["perceiver_attention_mask"]).sum(-1).tolist()

    def image_slots(self, count: int, wrapped: bool) -> tuple[list[str], int, list[str]]:
        """What one image marker of the target text becomes for an image of `count` features: (tokens to insert
        before it, how many image tokens, tokens to insert after). With marker slots the target's start and end
        markers take the first and last feature; `wrapped`: the text already has them around the marker."""
        if not self.marker_slots:
            return [], count, []
        if wrapped:
            return [], count - 2, []
        start, end = self.target_marker_tokens
        return [start], count - 2, [end]

    def expand_ids(self, ids: list[int], counts: list[int]) -> list[tuple[int, int | None]]:
        """Token ids of a target text with each image marker expanded to its image's slots (`image_slots`), as
        (id, index in `ids` it stands for, None for an inserted marker); equal to tokenizing the expanded text."""
        out: list[tuple[int, int | None]] = []
        start, end = (self.marker_slots or [None, None])[:2]
        images = iter(counts)
        for index, token_id in enumerate(ids):
            if token_id != self.image_token_id:
                out.append((token_id, index))
                continue
            wrapped = 0 < index < len(ids) - 1 and ids[index - 1] == start and ids[index + 1] == end
            before, pads, after = self.image_slots(next(images), wrapped)
            out += [(start, None)] * len(before) + [(token_id, index)] * pads + [(end, None)] * len(after)
        return out

    def _target_inputs(self, texts: list[str], counts: list[int], text_kwargs: dict) -> dict[str, Any]:
        """Tokenize the target texts with each image marker expanded to its image's slots."""
        counts_left = iter(counts)
        expanded, expected = [], []
        start, end = (self.target_marker_tokens or [None, None])[:2]
        for text in texts:
            first, *rest = text.split(self.image_token)
            pieces, before_text = [first], first
            for part in rest:
                count = next(counts_left)
                wrapped = bool(self.marker_slots) and before_text.endswith(start) and part.startswith(end)
                before, pads, after = self.image_slots(count, wrapped)
                pieces.append("".join(before) + self.image_token * pads + "".join(after) + part)
                before_text = part
                expected.append(count)
            expanded.append("".join(pieces))
        encoded = self.tokenizer(expanded, **{**text_kwargs, "return_tensors": None})
        wanted = iter(expected)
        slots = set(self.image_slot_token_ids)
        for index, (text, ids) in enumerate(zip(texts, encoded["input_ids"])):
            want = sum(next(wanted) for _ in range(text.count(self.image_token)))
            have = sum(1 for token_id in ids if token_id in slots)
            if have != want:
                raise ValueError(
                    f"Sample {index}: the target sequence holds {have} image slots but its images have {want} "
                    f"features (truncated by max_length, or {self.image_token!r} in the text?)."
                )
        return dict(encoded)

    def perceiver_texts(self, messages: list[dict], bare_images: bool = True) -> list[str] | None:
        """Early fusion's `perceiver_text` for a conversation (one string per image), or None when the processor
        reads none. `bare_images`: also count `{"type": "image"}` blocks that carry no image (training samples)."""
        if not self.early_fusion:
            return None
        return _turn_texts([messages], bare_images)

    def apply_chat_template(self, conversation: list, *args: Any, **kwargs: Any) -> Any:
        """The processor's chat template (ProcessorMixin's). With early fusion and `tokenize=True`, each image's
        perceiver text is the text of the message holding it."""
        if self.early_fusion and kwargs.get("tokenize"):
            conversations = conversation if isinstance(conversation[0], (list, tuple)) else [conversation]
            processor_kwargs = dict(kwargs.get("processor_kwargs") or {})
            processor_kwargs.setdefault("perceiver_text", _turn_texts(conversations))
            kwargs["processor_kwargs"] = processor_kwargs
        return super().apply_chat_template(conversation, *args, **kwargs)


__all__ = [
    "PERCEIVER_FAMILIES",
    "DPAProcessor",
    "FeatureCounter",
    "PerceiverFamily",
    "capped_size",
    "onevision_feature_count",
    "paper_chat_template",
]
