"""Training data for DPA: formats, chat-template label masking, encoding, collation and `dpa data check`.

Data flows `open_samples` (LLaVA JSON / JSONL, Hugging Face datasets) -> `Sample` -> `SampleEncoder` (the DPA
processor + template masking) -> `EncodedDataset` (skip / fail) -> `DPACollator` -> the DPA model's kwargs.
"""

from dpa_cli.data.check import PROBLEMS, FeatureCounter, check_dataset, load_processor
from dpa_cli.data.collate import DPACollator, LengthGroupedSampler, length_grouped_indices
from dpa_cli.data.dataset import EncodedDataset, EncodedIterableDataset
from dpa_cli.data.encode import IGNORE_INDEX, SampleEncoder
from dpa_cli.data.formats import SampleSource, dataset_fingerprint, open_samples
from dpa_cli.data.lengths import sample_lengths
from dpa_cli.data.render import render_supervised, supervised_segments
from dpa_cli.data.samples import BadSampleError, ImageRef, Sample

__all__ = [
    "BadSampleError",
    "DPACollator",
    "EncodedDataset",
    "EncodedIterableDataset",
    "FeatureCounter",
    "IGNORE_INDEX",
    "ImageRef",
    "LengthGroupedSampler",
    "PROBLEMS",
    "Sample",
    "SampleEncoder",
    "SampleSource",
    "check_dataset",
    "dataset_fingerprint",
    "length_grouped_indices",
    "load_processor",
    "open_samples",
    "render_supervised",
    "sample_lengths",
    "supervised_segments",
]
