"""Serving an export: `dpa serve` (vLLM's OpenAI-compatible server) and the vLLM model plugin.

`transformers serve EXPORT --trust-remote-code` needs nothing from here: the export's own config code lists it
with transformers' serving (dpa_cli.model.configuration_dpa). vLLM finds DPA through the `vllm.general_plugins`
entry point (vllm_plugin.register), which registers the model class of vllm_model lazily; vllm_spec holds what
that class decides without vLLM (target class, weight names, placeholder counts), tested on CPU.
"""
