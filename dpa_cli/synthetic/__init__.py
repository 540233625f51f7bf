"""Synthetic checkpoints, tokenizers and data for `dpa bench`, `dpa demo` and the tests."""
