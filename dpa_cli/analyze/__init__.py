"""Analyses of a model's internals: the modality gap per layer of the target LLM (`dpa analyze modality-gap`)."""

from dpa_cli.analyze.modality_gap import default_baseline, modality_gap
from dpa_cli.analyze.report import check_outputs, write_outputs

__all__ = ["check_outputs", "default_baseline", "modality_gap", "write_outputs"]
