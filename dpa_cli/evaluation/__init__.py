"""`dpa eval`: local VQA, multiple-choice and MMLU-style text benchmarks, scored with the standard metrics."""

from dpa_cli.evaluation.items import Item, load_items
from dpa_cli.evaluation.metrics import anls, exact_match, normalize_answer, parse_choice
from dpa_cli.evaluation.run import evaluate, summarise

__all__ = ["Item", "anls", "evaluate", "exact_match", "load_items", "normalize_answer", "parse_choice", "summarise"]
