"""Configuration of a Deep Pre-Alignment (DPA) model: a small VLM (the perceiver) feeding a target LLM.

Shipped as remote code next to upgraded checkpoints, so it imports only torch and transformers.
"""

from typing import Literal

from transformers import AutoConfig, PreTrainedConfig
from transformers.configuration_utils import SubConfigSpec

# Imported for its registration: a perceiver_config may name the paper skeleton's model_type. (Written as
# `from .module import name`, the form transformers follows when it copies remote code's relative imports.)
from .configuration_paper_dpa import Qwen2_5_VLQwen3Config  # noqa: F401

PROJECTOR_TYPES = ("mlp2x_relu", "mlp2x_gelu", "linear")
FEATURE_SPANS = ("image", "image+markers")
# How training and inference text is built: `dpa` (the target's own chat template, the perceiver sees the image
# alone) or `paper` (the official DPA code's encoding: ChatML with a think block in every assistant turn, the
# perceiver sees its user-turn frame, N+2 features written into the target's start, pad and end slots).
ENCODINGS = ("dpa", "paper")


def _check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"DPAConfig.{name}={value!r} is not one of {', '.join(choices)}.")


class DPAConfig(PreTrainedConfig):
    r"""
    perceiver_config (`dict` or `PreTrainedConfig`):
        Config of the perceiver: a complete small VLM (e.g. Qwen2.5-VL, LLaVA-NeXT, Idefics3) whose base model,
        without its LM head, encodes each image.
    text_config (`dict` or `PreTrainedConfig`):
        Config of the target language model (e.g. Qwen3-4B) that receives the aligned image features.
    projector_type (`str`, *optional*, defaults to `"mlp2x_relu"`):
        The alignment projector phi: `mlp2x_relu` (Linear(d_p, d_p) -> ReLU -> Linear(d_p, d_t), the paper's),
        `mlp2x_gelu` (LLaVA's: Linear(d_p, d_t) -> GELU -> Linear(d_t, d_t)) or `linear`.
    projector_bias (`bool`, *optional*, defaults to `True`):
        Whether the projector's linear layers have a bias.
    feature_span (`str`, *optional*, defaults to `"image"`):
        Which perceiver positions become features: `image` (the image tokens) or `image+markers` (also the
        perceiver's image marker tokens, e.g. `<|vision_start|>`/`<|vision_end|>`: N+2 features per image).
    early_fusion (`bool`, *optional*, defaults to `False`):
        Whether the processor also feeds the user's turn text to the perceiver, before the image. The model code
        is the same either way; the flag travels with the checkpoint so the processor knows.
    encoding (`str`, *optional*, defaults to `"dpa"`):
        `dpa` (the target's own chat template) or `paper` (the official DPA code's encoding; needs
        `feature_span="image+markers"` and two target marker tokens). Read by the processor; the model only sees
        it through `image_slot_token_ids`.
    image_token_id (`int`, *optional*):
        The target tokenizer's image placeholder id; each image expands to as many of these as it has features.
    perceiver_image_token_id (`int`, *optional*):
        The perceiver tokenizer's image token id. Defaults to the perceiver config's `image_token_id`.
    perceiver_marker_token_ids (`list[int]`, *optional*):
        The perceiver's image marker token ids, used with `feature_span="image+markers"`.
    target_marker_token_ids (`list[int]`, *optional*):
        The target's image start and end marker ids (e.g. `<|vision_start|>`, `<|vision_end|>`). With
        `feature_span="image+markers"` they are image slots too: an image's N+2 features go into its start, pad
        and end slots, as the official code writes them, instead of N+2 pads between the target's own markers.
    tie_word_embeddings (`bool`, *optional*, defaults to `False`):
        Whether `lm_head` shares the target's input embeddings; follows the text config when that ties them.
    """

    model_type = "dpa"
    sub_configs_defaults = {
        "perceiver_config": SubConfigSpec(config_class=AutoConfig, model_type="qwen2_5_vl"),
        "text_config": SubConfigSpec(config_class=AutoConfig, model_type="qwen3"),
    }

    perceiver_config: dict | PreTrainedConfig | None = None
    text_config: dict | PreTrainedConfig | None = None
    projector_type: Literal["mlp2x_relu", "mlp2x_gelu", "linear"] = "mlp2x_relu"
    projector_bias: bool = True
    feature_span: Literal["image", "image+markers"] = "image"
    early_fusion: bool = False
    encoding: Literal["dpa", "paper"] = "dpa"
    image_token_id: int | None = None
    perceiver_image_token_id: int | None = None
    perceiver_marker_token_ids: list[int] | None = None
    target_marker_token_ids: list[int] | None = None
    tie_word_embeddings: bool = False

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        _check_choice("projector_type", self.projector_type, PROJECTOR_TYPES)
        _check_choice("feature_span", self.feature_span, FEATURE_SPANS)
        _check_choice("encoding", self.encoding, ENCODINGS)
        # The tie lives in the text config of the target (Qwen3-4B ties, Qwen3-32B does not); transformers
        # reads it from the top-level config, so copy it up or the tie is silently lost.
        if not self.tie_word_embeddings and getattr(self.text_config, "tie_word_embeddings", False):
            self.tie_word_embeddings = True
        if self.perceiver_image_token_id is None:
            self.perceiver_image_token_id = getattr(self.perceiver_config, "image_token_id", None)
        if self.perceiver_marker_token_ids is None:
            self.perceiver_marker_token_ids = []
        if self.feature_span == "image+markers" and not self.perceiver_marker_token_ids:
            raise ValueError("feature_span='image+markers' needs perceiver_marker_token_ids; this perceiver has none.")
        if self.target_marker_token_ids is None:
            self.target_marker_token_ids = []
        if len(self.target_marker_token_ids) not in (0, 2):
            raise ValueError("target_marker_token_ids holds an image's start and end marker ids: two, or none.")
        if self.encoding == "paper" and (self.feature_span != "image+markers" or not self.target_marker_token_ids):
            raise ValueError(
                "encoding='paper' writes the N+2 perceiver states <|vision_start|>..<|vision_end|> into the target's "
                "start, pad and end slots: it needs feature_span='image+markers' and two target_marker_token_ids."
            )

    @property
    def perceiver_hidden_size(self) -> int:
        """Width of the perceiver's last language block: the input width of the projector."""
        return self.perceiver_config.get_text_config().hidden_size

    @property
    def feature_token_ids(self) -> list[int]:
        """Perceiver token ids whose final hidden states are handed to the target."""
        ids = [self.perceiver_image_token_id]
        if self.feature_span == "image+markers":
            ids += list(self.perceiver_marker_token_ids)
        return ids

    @property
    def image_slot_token_ids(self) -> list[int]:
        """Target token ids whose input embeddings are replaced by image features, in reading order: the image
        token, and with `image+markers` the target's own start and end markers (when it has them)."""
        ids = [self.image_token_id]
        if self.feature_span == "image+markers":
            ids += list(self.target_marker_token_ids)
        return ids


def _list_with_transformers_serve() -> None:
    """List DPA in the name tables `transformers serve` reads, as transformers lists its own VLMs.

    serve (5.2x) loads a model whose `model_type` is a key of MODEL_FOR_MULTIMODAL_LM_MAPPING_NAMES with
    AutoModelForMultimodalLM (which follows `auto_map` to our class); any other model it looks up as
    `transformers.<architectures[0]>`, which a remote-code class never is. It then tells a VLM from an LLM by
    whether the loaded class's name is a value of those tables. The tables have no register() (the Auto
    classes' register() fills their lazy mappings only), and serve imports this module (AutoConfig, remote
    code) before it looks, so the entry is made here. Names only: the lazy Auto mappings skip a model type
    that CONFIG_MAPPING_NAMES lacks, so no Auto class resolves anything differently.
    """
    try:
        from transformers.models.auto import modeling_auto
    except ImportError:  # a transformers without the tables serves nothing the way described above
        return
    for table in ("MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES", "MODEL_FOR_MULTIMODAL_LM_MAPPING_NAMES"):
        names = getattr(modeling_auto, table, None)
        if isinstance(names, dict):
            names.setdefault(DPAConfig.model_type, "DPAForConditionalGeneration")


_list_with_transformers_serve()

__all__ = ["DPAConfig"]
