"""Per-layer modality-gap statistics, accumulated sample by sample so memory stays flat in the token count.

For each layer and modality we keep the token count, the sum of the vectors and the sum of their squared
norms (enough for the centroid and the trace of the covariance), and one mean-pooled vector per sample (for
CKA) and one mean unit vector per sample (for the cosine similarity). Formulas: docs/evaluation.md.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

MIN_CKA_SAMPLES = 3  # with two samples, centred CKA is 1 whatever the representations


@dataclass
class ModalityStats:
    """Running sums of one modality's token vectors at one layer (float64)."""

    count: int = 0
    total: torch.Tensor | None = None  # [d]
    squared_norms: float = 0.0
    pooled: list[torch.Tensor] = field(default_factory=list)  # per sample: mean vector [d]
    unit_means: list[torch.Tensor] = field(default_factory=list)  # per sample: mean of unit vectors [d]

    def add(self, tokens: torch.Tensor) -> None:
        """Add one sample's tokens, `[n, d]` (n > 0)."""
        tokens = tokens.detach().to(torch.float64)
        total = tokens.sum(0)
        self.total = total if self.total is None else self.total + total
        self.count += tokens.shape[0]
        self.squared_norms += float((tokens * tokens).sum())
        self.pooled.append(tokens.mean(0))
        self.unit_means.append(torch.nn.functional.normalize(tokens, dim=-1).mean(0))

    @property
    def centroid(self) -> torch.Tensor:
        return self.total / self.count

    @property
    def covariance_trace(self) -> float:
        """tr Cov = E||x||^2 - ||E x||^2 (population covariance)."""
        return max(self.squared_norms / self.count - float(self.centroid @ self.centroid), 0.0)


def centroid_gap(image: ModalityStats, text: ModalityStats) -> float:
    """||mu_img - mu_txt|| / sqrt((tr Cov_img + tr Cov_txt) / 2): centroid distance in units of spread."""
    spread = math.sqrt((image.covariance_trace + text.covariance_trace) / 2)
    distance = float(torch.linalg.vector_norm(image.centroid - text.centroid))
    return distance / spread if spread > 0 else math.inf


def linear_cka(x: torch.Tensor, y: torch.Tensor) -> float:
    """Linear CKA (Kornblith et al. 2019) of paired rows `x` `[n, d1]`, `y` `[n, d2]`; NaN under 3 rows."""
    if x.shape[0] < MIN_CKA_SAMPLES:
        return math.nan
    x = x - x.mean(0, keepdim=True)
    y = y - y.mean(0, keepdim=True)
    gram_x, gram_y = x @ x.T, y @ y.T  # [n, n]: cheaper than d x d when samples are fewer than dimensions
    denominator = float(torch.linalg.matrix_norm(gram_x) * torch.linalg.matrix_norm(gram_y))
    return float((gram_x * gram_y).sum()) / denominator if denominator > 0 else math.nan


def mean_cosine(image: ModalityStats, text: ModalityStats) -> float:
    """Mean over samples of the mean cosine similarity over all (image token, text token) pairs of that sample.

    The mean of cos(x_i, y_j) over all pairs equals the dot product of the two mean unit vectors.
    """
    pairs = [float(a @ b) for a, b in zip(image.unit_means, text.unit_means)]
    return sum(pairs) / len(pairs)


@dataclass
class LayerStats:
    """Both modalities at one layer of the target LLM."""

    image: ModalityStats = field(default_factory=ModalityStats)
    text: ModalityStats = field(default_factory=ModalityStats)

    def measures(self) -> dict[str, float | int]:
        return {
            "centroid_gap": centroid_gap(self.image, self.text),
            "cka": linear_cka(torch.stack(self.image.pooled), torch.stack(self.text.pooled)),
            "cosine": mean_cosine(self.image, self.text),
            "image_tokens": self.image.count,
            "text_tokens": self.text.count,
            "samples": len(self.image.pooled),
        }
