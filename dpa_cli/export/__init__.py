"""`dpa export`: a workspace's latest stage as a self-contained Hugging Face folder, LoRA merged while streaming,
verified by plain transformers in a fresh process before it is renamed into place.

Modules: `stages` (which folder holds the trained model, loading it as trained), `adapter` (a LoRA adapter's
pairs and scales), `merge` (the streamed weights), `files` and `card` (everything else in the folder),
`verify` + `probe_check` (the reload-and-compare check), `run` (the command as one call).
"""
