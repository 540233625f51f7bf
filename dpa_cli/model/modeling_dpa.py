"""The Deep Pre-Alignment model: perceiver (small VLM) -> projector phi -> target LLM.

Each image is encoded by the perceiver's base model (ViT + internal projector + its language blocks); the
final-norm hidden states at the image positions are mapped by phi to the target's width and written into
the target sequence's image-token slots. Shipped as remote code, so it imports only torch and transformers.
"""

from dataclasses import dataclass

import torch
from torch import nn
from transformers import AutoModel, GenerationMixin, PreTrainedModel
from transformers.activations import ACT2FN
from transformers.cache_utils import Cache
from transformers.modeling_outputs import BaseModelOutputWithPast, BaseModelOutputWithPooling, ModelOutput
from transformers.modeling_utils import slice_logits_to_keep

from .configuration_dpa import DPAConfig
from .modeling_paper_dpa import Qwen2_5_VLQwen3Model

# Perceivers whose class ships with dpa's model code, built by model_type: loaded as remote code, transformers
# imports each file once per module folder, so perceiver_config may be another copy of the class AutoModel knows.
OWN_PERCEIVERS = {Qwen2_5_VLQwen3Model.config_class.model_type: Qwen2_5_VLQwen3Model}

# Perceiver inputs that describe images and keep their usual transformers names. Sequence-level perceiver
# inputs carry a `perceiver_` prefix instead, so they never collide with the target's `input_ids` etc.
_IMAGE_INPUT_NAMES = ("pixel_values", "image_grid_thw", "image_sizes", "pixel_attention_mask")
_PERCEIVER_PREFIX = "perceiver_"


class DPAFeatureMismatchError(ValueError):
    """The perceiver produced a different number of image features than the target has image-token slots."""


@dataclass
class DPAModelOutputWithPast(BaseModelOutputWithPast):
    r"""
    image_hidden_states (`torch.Tensor`, *optional*):
        The projected image features written into the target sequence, `[num_features, target_hidden]`.
    """

    image_hidden_states: torch.Tensor | None = None


@dataclass
class DPACausalLMOutputWithPast(ModelOutput):
    r"""
    loss (`torch.Tensor` of shape `(1,)`, *optional*): language-modeling loss, when `labels` are given.
    logits (`torch.Tensor` of shape `(batch, seq, vocab)`): next-token scores.
    image_hidden_states (`torch.Tensor`, *optional*): projected image features, `[num_features, target_hidden]`.
    """

    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    past_key_values: Cache | None = None
    hidden_states: tuple[torch.Tensor] | None = None
    attentions: tuple[torch.Tensor] | None = None
    image_hidden_states: torch.Tensor | None = None


class DPAProjector(nn.Module):
    """phi: perceiver width -> target width, `[n, d_p] -> [n, d_t]`. Sized from the two widths only."""

    def __init__(self, in_features: int, out_features: int, kind: str = "mlp2x_relu", bias: bool = True):
        super().__init__()
        self.kind = kind
        if kind == "linear":
            self.linear_1 = nn.Linear(in_features, out_features, bias=bias)
            return
        # The paper's phi keeps the perceiver width in the hidden layer; LLaVA's mlp2x_gelu uses the target's.
        hidden = in_features if kind == "mlp2x_relu" else out_features
        self.linear_1 = nn.Linear(in_features, hidden, bias=bias)
        self.act = ACT2FN["relu" if kind == "mlp2x_relu" else "gelu"]
        self.linear_2 = nn.Linear(hidden, out_features, bias=bias)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        hidden = self.linear_1(features)
        if self.kind == "linear":
            return hidden
        return self.linear_2(self.act(hidden))


class DPAPreTrainedModel(PreTrainedModel):
    config: DPAConfig
    config_class = DPAConfig
    base_model_prefix = "model"
    input_modalities = ("image", "text")
    supports_gradient_checkpointing = True
    _skip_keys_device_placement = ["past_key_values"]
    _supports_flash_attn = True
    _supports_sdpa = True
    _supports_flex_attn = True
    _supports_attention_backend = True


def _split_perceiver_kwargs(kwargs: dict) -> tuple[dict, dict]:
    """Separate extra `perceiver_*` inputs (family-specific, passed through unprefixed) from the rest."""
    perceiver = {k[len(_PERCEIVER_PREFIX) :]: v for k, v in kwargs.items() if k.startswith(_PERCEIVER_PREFIX)}
    rest = {k: v for k, v in kwargs.items() if not k.startswith(_PERCEIVER_PREFIX)}
    return perceiver, rest


class DPAModel(DPAPreTrainedModel):
    """Perceiver + projector + target language model, without the LM head."""

    def __init__(self, config: DPAConfig):
        super().__init__(config)
        # The perceiver's *base* model: its LM head is never computed (the official code wastes it).
        perceiver, own = config.perceiver_config, OWN_PERCEIVERS.get(config.perceiver_config.model_type)
        self.perceiver = own._from_config(perceiver) if own else AutoModel.from_config(perceiver)
        self.multi_modal_projector = DPAProjector(
            config.perceiver_hidden_size,
            config.text_config.hidden_size,
            kind=config.projector_type,
            bias=config.projector_bias,
        )
        self.language_model = AutoModel.from_config(config.text_config)
        self._no_split_modules = sorted(
            set(self.perceiver._no_split_modules or []) | set(self.language_model._no_split_modules or [])
        )
        self.post_init()

    def get_input_embeddings(self) -> nn.Module:
        return self.language_model.get_input_embeddings()

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.language_model.set_input_embeddings(value)

    def feature_mask(self, perceiver_input_ids: torch.LongTensor) -> torch.BoolTensor:
        """Positions of the perceiver sequence that become image features, `[num_images, perceiver_seq]`."""
        ids = torch.tensor(self.config.feature_token_ids, device=perceiver_input_ids.device)
        return torch.isin(perceiver_input_ids, ids)

    def get_image_features(
        self,
        pixel_values: torch.Tensor,
        perceiver_input_ids: torch.LongTensor | None = None,
        perceiver_attention_mask: torch.Tensor | None = None,
        image_grid_thw: torch.LongTensor | None = None,
        image_sizes: torch.LongTensor | None = None,
        pixel_attention_mask: torch.Tensor | None = None,
        perceiver_mm_token_type_ids: torch.Tensor | None = None,
        **kwargs,
    ) -> BaseModelOutputWithPooling:
        """Run the perceiver once over all images and project its features.

        `perceiver_input_ids` is `[num_images, perceiver_seq]`: one perceiver sequence per image, in the order the
        images appear in the batch. Returns `pooler_output`: a list with one `[n_i, target_hidden]` tensor per
        image, and `last_hidden_state`: the perceiver's final-norm states `[num_images, perceiver_seq, d_p]`.
        """
        if perceiver_input_ids is None:
            raise ValueError(
                "DPA needs `perceiver_input_ids` with `pixel_values`: the perceiver is a VLM and reads a token "
                "sequence around each image. Build the inputs with the DPA processor."
            )
        extra, _ = _split_perceiver_kwargs(kwargs)
        perceiver_inputs = {
            "input_ids": perceiver_input_ids,
            "attention_mask": perceiver_attention_mask,
            "pixel_values": pixel_values,
            "image_grid_thw": image_grid_thw,
            "image_sizes": image_sizes,
            "pixel_attention_mask": pixel_attention_mask,
            "mm_token_type_ids": perceiver_mm_token_type_ids,
            **extra,
        }
        perceiver_inputs = {k: v for k, v in perceiver_inputs.items() if v is not None}
        # last_hidden_state of a transformers base model is already after the final norm.
        outputs = self.perceiver(**perceiver_inputs, use_cache=False, return_dict=True)
        hidden = outputs.last_hidden_state
        mask = self.feature_mask(perceiver_input_ids)
        projected = self.multi_modal_projector(hidden[mask])
        per_image = torch.split(projected, mask.sum(dim=-1).tolist())
        return BaseModelOutputWithPooling(last_hidden_state=hidden, pooler_output=list(per_image))

    def image_slot_mask(self, input_ids: torch.LongTensor | None, inputs_embeds: torch.Tensor) -> torch.BoolTensor:
        """Where the target sequence holds image slots, `[batch, seq]`: the image token, plus the target's start
        and end markers when the features include the perceiver's (the official code writes N+2 features there)."""
        slot_ids = torch.tensor(self.config.image_slot_token_ids, dtype=torch.long, device=inputs_embeds.device)
        if input_ids is not None:
            return torch.isin(input_ids, slot_ids)
        slot_embeds = self.get_input_embeddings()(slot_ids)  # [slots, hidden]
        return (inputs_embeds.unsqueeze(-2) == slot_embeds).all(-1).any(-1)

    def embed_text(self, input_ids: torch.LongTensor) -> torch.Tensor:
        """Embed the target tokens; image slots get a placeholder row that the features overwrite."""
        # The image token id may lie outside the embedding table (the original LLaVA code uses -200).
        safe_ids = input_ids.masked_fill(input_ids == self.config.image_token_id, 0)
        return self.get_input_embeddings()(safe_ids)

    def merge_image_features(
        self, inputs_embeds: torch.Tensor, slot_mask: torch.BoolTensor, features: torch.Tensor, num_images: int
    ) -> torch.Tensor:
        """Write the image features `[num_features, target_hidden]` into the image-token slots, in reading order."""
        n_slots = int(slot_mask.sum())
        if n_slots != features.shape[0]:
            raise DPAFeatureMismatchError(
                f"The perceiver produced {features.shape[0]} image features for {num_images} image(s), but the "
                f"target input holds {n_slots} image-token slots (token ids {self.config.image_slot_token_ids}). "
                "Each image must expand to exactly its perceiver feature count: use the DPA processor."
            )
        features = features.to(inputs_embeds.device, inputs_embeds.dtype)
        return inputs_embeds.masked_scatter(slot_mask.unsqueeze(-1), features)

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        perceiver_input_ids: torch.LongTensor | None = None,
        perceiver_attention_mask: torch.Tensor | None = None,
        image_grid_thw: torch.LongTensor | None = None,
        image_sizes: torch.LongTensor | None = None,
        pixel_attention_mask: torch.Tensor | None = None,
        perceiver_mm_token_type_ids: torch.Tensor | None = None,
        mm_encoder_outputs: dict[str, BaseModelOutputWithPooling] | None = None,
        **kwargs,
    ) -> DPAModelOutputWithPast:
        """`input_ids` `[batch, seq]` -> `last_hidden_state` `[batch, seq, target_hidden]`."""
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("Pass exactly one of `input_ids` or `inputs_embeds`.")
        perceiver_extra, kwargs = _split_perceiver_kwargs(kwargs)
        if inputs_embeds is None:
            inputs_embeds = self.embed_text(input_ids)

        image_outputs = (mm_encoder_outputs or {}).get("image")
        if image_outputs is None and pixel_values is not None:
            image_outputs = self.get_image_features(
                pixel_values=pixel_values,
                perceiver_input_ids=perceiver_input_ids,
                perceiver_attention_mask=perceiver_attention_mask,
                image_grid_thw=image_grid_thw,
                image_sizes=image_sizes,
                pixel_attention_mask=pixel_attention_mask,
                perceiver_mm_token_type_ids=perceiver_mm_token_type_ids,
                **{_PERCEIVER_PREFIX + k: v for k, v in perceiver_extra.items()},
            )
        image_features = None
        if image_outputs is not None:
            per_image = list(image_outputs.pooler_output)
            image_features = torch.cat(per_image, dim=0)
            slot_mask = self.image_slot_mask(input_ids, inputs_embeds)
            inputs_embeds = self.merge_image_features(inputs_embeds, slot_mask, image_features, len(per_image))

        outputs = self.language_model(
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=past_key_values,
            inputs_embeds=inputs_embeds,
            **kwargs,
        )
        return DPAModelOutputWithPast(
            last_hidden_state=outputs.last_hidden_state,
            past_key_values=outputs.past_key_values,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            image_hidden_states=image_features,
        )


class DPAForConditionalGeneration(DPAPreTrainedModel, GenerationMixin):
    """DPA model with the target's LM head. `generate()` runs the perceiver once per prompt (prefill only)."""

    _tied_weights_keys = {"lm_head.weight": "model.language_model.embed_tokens.weight"}

    def __init__(self, config: DPAConfig):
        super().__init__(config)
        self.model = DPAModel(config)
        self.lm_head = nn.Linear(config.text_config.hidden_size, config.text_config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self) -> nn.Module:
        return self.model.get_input_embeddings()

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.model.set_input_embeddings(value)

    def get_output_embeddings(self) -> nn.Module:
        return self.lm_head

    def get_decoder(self) -> nn.Module:
        return self.model.language_model

    def get_image_features(self, pixel_values: torch.Tensor, **kwargs) -> BaseModelOutputWithPooling:
        return self.model.get_image_features(pixel_values=pixel_values, **kwargs)

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        pixel_values: torch.Tensor | None = None,
        perceiver_input_ids: torch.LongTensor | None = None,
        perceiver_attention_mask: torch.Tensor | None = None,
        image_grid_thw: torch.LongTensor | None = None,
        image_sizes: torch.LongTensor | None = None,
        pixel_attention_mask: torch.Tensor | None = None,
        perceiver_mm_token_type_ids: torch.Tensor | None = None,
        mm_encoder_outputs: dict[str, BaseModelOutputWithPooling] | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        **kwargs,
    ) -> DPACausalLMOutputWithPast:
        """`input_ids` `[batch, seq]` -> `logits` `[batch, seq, vocab]`; `labels` use -100 for unsupervised."""
        outputs = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=past_key_values,
            inputs_embeds=inputs_embeds,
            pixel_values=pixel_values,
            perceiver_input_ids=perceiver_input_ids,
            perceiver_attention_mask=perceiver_attention_mask,
            image_grid_thw=image_grid_thw,
            image_sizes=image_sizes,
            pixel_attention_mask=pixel_attention_mask,
            perceiver_mm_token_type_ids=perceiver_mm_token_type_ids,
            mm_encoder_outputs=mm_encoder_outputs,
            **kwargs,
        )
        hidden_states = slice_logits_to_keep(outputs.last_hidden_state, logits_to_keep)
        logits = self.lm_head(hidden_states)
        loss = None
        if labels is not None:
            loss = self.loss_function(
                logits=logits, labels=labels, vocab_size=self.config.text_config.vocab_size, **kwargs
            )
        return DPACausalLMOutputWithPast(
            loss=loss,
            logits=logits,
            past_key_values=outputs.past_key_values,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            image_hidden_states=outputs.image_hidden_states,
        )


__all__ = ["DPAForConditionalGeneration", "DPAModel", "DPAPreTrainedModel", "DPAProjector", "DPAFeatureMismatchError"]
