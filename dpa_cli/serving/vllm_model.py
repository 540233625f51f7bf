"""The DPA model in vLLM (imported by vLLM only, through the plugin's lazy registration; needs vLLM >= 0.34).

Written against vLLM 0.34.0 (the `vllm-0.34.0` wheel): vllm/model_executor/models/llava.py is the pattern
(`SupportsMultiModal`, `_mark_tower_model` / `_mark_language_model`, `init_vllm_registered_model`,
`AutoWeightsLoader` with a `WeightsMapper`, a `BaseMultiModalProcessor` registered on the class). vLLM is not
installable beside dpa's pinned torch, so this module runs only on a GPU machine: `scripts/gpu_check.sh`
serves the demo export with it and compares greedy answers with transformers. Everything it decides that
needs no vLLM lives in dpa_cli.serving.vllm_spec and is tested on CPU.

- The multimodal encoder step runs once per image: the perceiver (the export's small VLM, as its transformers
  module, reading its own token sequence around the image) and phi give the image's features, exactly
  DPAModel.get_image_features.
- The target LLM is vLLM's own class for its family (Qwen3ForCausalLM, LlamaForCausalLM, ...); vLLM writes the
  features into the image placeholder positions, which DPAProcessor expanded to one per feature.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

import torch
import torch.nn as nn
from transformers import AutoModel, BatchFeature, PretrainedConfig
from vllm.config import VllmConfig
from vllm.config.multimodal import MultiModalDummyOptions
from vllm.inputs import MultiModalDataDict
from vllm.model_executor.models.interfaces import MultiModalEmbeddings, SupportsMultiModal, SupportsPP
from vllm.model_executor.models.utils import AutoWeightsLoader, WeightsMapper, init_vllm_registered_model, maybe_prefix
from vllm.multimodal import MULTIMODAL_REGISTRY
from vllm.multimodal.inputs import MultiModalFieldConfig, MultiModalKwargsItems
from vllm.multimodal.parse import ImageProcessorItems, ImageSize, MultiModalDataItems
from vllm.multimodal.processing import (
    BaseDummyInputsBuilder,
    BaseMultiModalProcessor,
    BaseProcessingInfo,
    PromptReplacement,
    PromptUpdate,
)
from vllm.sequence import IntermediateTensors

import dpa_cli.model  # noqa: F401  DPAConfig and DPAProcessor registered with the Auto classes in this process
from dpa_cli.model.modeling_dpa import OWN_PERCEIVERS, DPAModel, DPAProjector
from dpa_cli.serving import vllm_spec as spec


class DPAProcessingInfo(BaseProcessingInfo):
    def get_supported_mm_limits(self) -> Mapping[str, int | None]:
        return {"image": None}

    def get_num_image_tokens(self, *, image_width: int, image_height: int) -> int:
        from PIL import Image

        image = Image.new("RGB", (image_width, image_height))
        return spec.image_feature_counts(self.get_hf_processor(), [image])[0]

    def get_image_size_with_most_features(self) -> ImageSize:
        width, height = spec.largest_image_size(self.get_hf_processor())
        return ImageSize(width=width, height=height)


class DPADummyInputsBuilder(BaseDummyInputsBuilder[DPAProcessingInfo]):
    def get_dummy_text(self, mm_counts: Mapping[str, int]) -> str:
        return self.info.get_hf_processor().image_token * mm_counts.get("image", 0)

    def get_dummy_mm_data(
        self, seq_len: int, mm_counts: Mapping[str, int], mm_options: MultiModalDummyOptions
    ) -> MultiModalDataDict:
        size = self.info.get_image_size_with_most_features()
        return {
            "image": self._get_dummy_images(
                width=size.width,
                height=size.height,
                num_images=mm_counts.get("image", 0),
                overrides=mm_options.get("image"),
            )
        }


class DPAMultiModalProcessor(BaseMultiModalProcessor[DPAProcessingInfo]):
    def _get_hf_mm_text(self, mm_counts: Mapping[str, int]) -> str | None:
        """DPAProcessor reads images with text holding one image token per image (vLLM tokenizes the prompt
        itself and expands its image tokens with `_get_prompt_updates`)."""
        return self.dummy_inputs.get_dummy_text(mm_counts)

    def _get_mm_fields_config(
        self, hf_inputs: BatchFeature, hf_processor_mm_kwargs: Mapping[str, object]
    ) -> Mapping[str, MultiModalFieldConfig]:
        num_images = int(hf_inputs["perceiver_input_ids"].shape[0]) if "perceiver_input_ids" in hf_inputs else 0
        fields = {}
        for key, sizes in spec.field_sizes(hf_inputs, num_images).items():
            fields[key] = (
                MultiModalFieldConfig.batched("image")
                if sizes is None
                else MultiModalFieldConfig.flat_from_sizes("image", torch.tensor(sizes))
            )
        return fields

    def _get_prompt_updates(
        self,
        mm_items: MultiModalDataItems,
        hf_processor_mm_kwargs: Mapping[str, object],
        out_mm_kwargs: MultiModalKwargsItems,
    ) -> Sequence[PromptUpdate]:
        processor = self.info.get_hf_processor(**hf_processor_mm_kwargs)
        image_token_id = processor.image_token_id

        def replacement(item_index: int) -> list[int]:
            images = mm_items.get_items("image", ImageProcessorItems)
            [count] = spec.image_feature_counts(processor, [images.get(item_index)])
            return [image_token_id] * count

        return [PromptReplacement(modality="image", target=[image_token_id], replacement=replacement)]


class DPAEncoder(nn.Module):
    """The perceiver and phi with the export's own module names (`perceiver.*`, `multi_modal_projector.*`) and
    DPAModel's feature code, so an image's features are the transformers model's, computed the same way."""

    feature_mask = DPAModel.feature_mask
    get_image_features = DPAModel.get_image_features

    def __init__(self, config: PretrainedConfig) -> None:
        super().__init__()
        self.config = config
        perceiver, own = config.perceiver_config, OWN_PERCEIVERS.get(config.perceiver_config.model_type)
        self.perceiver = own._from_config(perceiver) if own else AutoModel.from_config(perceiver)
        self.multi_modal_projector = DPAProjector(
            config.perceiver_hidden_size,
            config.text_config.hidden_size,
            kind=config.projector_type,
            bias=config.projector_bias,
        )


@MULTIMODAL_REGISTRY.register_processor(
    DPAMultiModalProcessor, info=DPAProcessingInfo, dummy_inputs=DPADummyInputsBuilder
)
class DPAForConditionalGeneration(nn.Module, SupportsMultiModal, SupportsPP):
    hf_to_vllm_mapper = WeightsMapper(orig_to_new_prefix=dict(spec.PREFIXES))

    @classmethod
    def get_placeholder_str(cls, modality: str, i: int) -> str | None:
        if modality.startswith("image"):
            return "<image>"  # the chat template's image marker for LLaVA-style targets; others render their own
        raise ValueError("DPA reads images only")

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "") -> None:
        super().__init__()
        config = vllm_config.model_config.hf_config
        spec.check_servable(config)  # what vLLM's placeholders and encoder step cannot reproduce is refused
        self.config = config
        self.configure_mm_token_handling(
            vocab_size=config.text_config.vocab_size, mm_token_ids=list(config.image_slot_token_ids)
        )
        with self._mark_tower_model(vllm_config, "image"):
            self.encoder = DPAEncoder(config)
        text_config = type(config.text_config).from_dict(spec.target_hf_config(config))
        with self._mark_language_model(vllm_config):
            self.language_model = init_vllm_registered_model(
                vllm_config=vllm_config, hf_config=text_config, prefix=maybe_prefix(prefix, "language_model")
            )
        self.make_empty_intermediate_tensors = self.language_model.make_empty_intermediate_tensors

    def embed_multimodal(self, **kwargs: object) -> MultiModalEmbeddings:
        """One `[n_features, target_hidden]` tensor per image, one image at a time: its perceiver sequence without
        the padding other images forced on it (vllm_spec.image_inputs), so its features are the transformers
        model's for that image alone. Batched fields arrive stacked or as a list per image; Qwen-VL's patches
        arrive flat, `image_grid_thw` rows per image."""
        fields = {k: v for k, v in kwargs.items() if isinstance(v, (torch.Tensor, list))}
        if "perceiver_input_ids" not in fields:
            return []
        grid = fields.get("image_grid_thw")
        sizes = None if grid is None else [int(n) for n in torch.stack(list(grid)).reshape(-1, 3).prod(-1)]
        layout = {key: sizes if key == "pixel_values" else None for key in fields}
        dtype = next(self.encoder.parameters()).dtype
        features = []
        for index in range(len(fields["perceiver_input_ids"])):
            one = spec.image_inputs(fields, layout, index)
            one = {k: (v.to(dtype) if v.is_floating_point() else v) for k, v in one.items()}
            features.append(self.encoder.get_image_features(**one).pooler_output[0])
        return features

    def forward(
        self,
        input_ids: torch.Tensor | None,
        positions: torch.Tensor,
        intermediate_tensors: IntermediateTensors | None = None,
        inputs_embeds: torch.Tensor | None = None,
        **kwargs: object,
    ) -> torch.Tensor | IntermediateTensors:
        if intermediate_tensors is not None:
            inputs_embeds = None
        return self.language_model.model(input_ids, positions, intermediate_tensors, inputs_embeds=inputs_embeds)

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor | None:
        return self.language_model.compute_logits(hidden_states)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        # The target's q/k/v and gate/up are stacked by vLLM's LLM class itself (vllm_spec.STACKED).
        return AutoWeightsLoader(self).load_weights(weights, mapper=self.hf_to_vllm_mapper)


__all__ = ["DPAForConditionalGeneration"]
