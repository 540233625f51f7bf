"""The tests' tokenizers are the package's synthetic ones (also used by `dpa bench` and `dpa demo`)."""

from dpa_cli.synthetic.tokenizers import TOKENIZERS, tiny_tokenizer

__all__ = ["TOKENIZERS", "tiny_tokenizer"]
