"""The DPA model files, registered with the transformers Auto classes.

The modules here import only torch and transformers: they are copied next to every upgraded checkpoint
as remote code (`auto_map`), so plain `transformers` loads the result with `trust_remote_code=True`.
"""

from transformers import AutoConfig, AutoModel, AutoModelForImageTextToText, AutoProcessor

from .configuration_dpa import DPAConfig
from .configuration_paper_dpa import Qwen2_5_VLQwen3Config, Qwen2_5_VLQwen3TextConfig
from .modeling_dpa import DPAFeatureMismatchError, DPAForConditionalGeneration, DPAModel
from .modeling_paper_dpa import Qwen2_5_VLQwen3ForConditionalGeneration, Qwen2_5_VLQwen3Model
from .processing_dpa import DPAProcessor

AutoConfig.register("dpa", DPAConfig, exist_ok=True)
AutoModel.register(DPAConfig, DPAModel, exist_ok=True)
AutoModelForImageTextToText.register(DPAConfig, DPAForConditionalGeneration, exist_ok=True)
AutoProcessor.register(DPAConfig, DPAProcessor, exist_ok=True)

# save_pretrained then copies these files and writes `auto_map` into config.json.
DPAConfig.register_for_auto_class()
DPAForConditionalGeneration.register_for_auto_class("AutoModelForImageTextToText")
DPAProcessor.register_for_auto_class()  # processor_config.json gets auto_map; processing_dpa.py is copied

__all__ = [
    "DPAConfig",
    "DPAForConditionalGeneration",
    "DPAModel",
    "DPAFeatureMismatchError",
    "DPAProcessor",
    "Qwen2_5_VLQwen3Config",
    "Qwen2_5_VLQwen3TextConfig",
    "Qwen2_5_VLQwen3ForConditionalGeneration",
    "Qwen2_5_VLQwen3Model",
]
