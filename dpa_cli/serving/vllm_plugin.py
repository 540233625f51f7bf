"""vLLM's `vllm.general_plugins` entry point (pyproject.toml): vLLM calls `register()` in each of its processes.

The model class is registered by name (`module:Class`), as vLLM recommends for plugins, so nothing imports
vLLM's CUDA-touching modules until vLLM builds the model. Importing dpa_cli.model registers DPAConfig and
DPAProcessor with the transformers Auto classes here, so vLLM reads an export's config and processor with dpa's
installed code (the same files the export carries) and needs no `--trust-remote-code`.
"""

from __future__ import annotations

from typing import Any

from dpa_cli.serving.vllm_spec import ARCHITECTURE

MODEL_CLASS = "dpa_cli.serving.vllm_model:DPAForConditionalGeneration"


def register(registry: Any = None) -> None:
    """Register the DPA architecture with vLLM's ModelRegistry (or `registry`, an object with its
    `register_model(arch, "module:Class")`)."""
    import dpa_cli.model  # noqa: F401  (the Auto-class registrations)

    if registry is None:
        from vllm import ModelRegistry

        registry = ModelRegistry
    registry.register_model(ARCHITECTURE, MODEL_CLASS)
