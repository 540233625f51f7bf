"""dpa: upgrade a LLaVA-style vision-language model in place with Deep Pre-Alignment."""

__version__ = "0.1.0.dev0"
