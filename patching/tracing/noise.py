"""Gaussian-noise corruption (ROME's causal tracing, Meng et al. 2022, §2.1): noise added to the
token embeddings of chosen positions, no counterfactual prompt needed.

Symmetric token replacement stays the default corruption of `patch_*` (DESIGN.md, Corruptions):
it keeps the corrupted run in distribution. Noise is the option when no counterfactual prompt of
the same length exists; its scale is k times the standard deviation of the model's token
embeddings over a corpus (ROME uses k = 3).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from patching.errors import PatchingError
from patching.model import tl_compat


@dataclass(frozen=True)
class NoiseConfig:
    """Seeded Gaussian noise on the embeddings of the subject's positions."""

    scale: float
    """Standard deviation of the noise, in embedding units (k × `embedding_std`; 0 adds nothing)."""
    n_samples: int = 10
    """Noise draws per prompt; the metric is averaged over them (ROME uses 10)."""
    seed: int = 0
    """Seed of the draws: the same seed gives the same corrupted runs."""

    def __post_init__(self) -> None:
        if isinstance(self.scale, bool) or not isinstance(self.scale, (int, float)) or not self.scale >= 0:
            raise PatchingError(f"NoiseConfig.scale must be a finite number >= 0, got {self.scale!r}")
        if self.scale == float("inf"):
            raise PatchingError("NoiseConfig.scale must be finite, got inf")
        if isinstance(self.n_samples, bool) or not isinstance(self.n_samples, int) or self.n_samples < 1:
            raise PatchingError(f"NoiseConfig.n_samples must be a positive int, got {self.n_samples!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or not 0 <= self.seed < 2 ** 63:
            raise PatchingError(f"NoiseConfig.seed must be an int in [0, 2**63) (what torch.Generator takes), "
                                f"got {self.seed!r}")

    def draw(self, n_positions: int, d_model: int) -> Tensor:
        """The noise, `(n_samples, n_positions, d_model)`, the same for every call with this config."""
        generator = torch.Generator().manual_seed(self.seed)
        return torch.randn(self.n_samples, n_positions, d_model, generator=generator) * self.scale


def embedding_std(model: Any, corpus_tokens: Tensor) -> float:
    """Standard deviation of the token embeddings of every token in `corpus_tokens` (ROME measures
    it over the subjects of its dataset; any representative corpus will do)."""
    if corpus_tokens.numel() == 0:
        raise PatchingError("embedding_std needs a non-empty corpus of token ids")
    return float(tl_compat.token_embeddings(model, corpus_tokens.flatten()).std())


def subject_positions(model: Any, tokens: Tensor, subject: str | Sequence[int]) -> tuple[int, ...]:
    """Positions of `subject` in `tokens` (1, pos): its last occurrence as a token span (with or
    without a leading space), or explicit positions."""
    n_pos = tokens.shape[1]
    if not isinstance(subject, str):
        positions = tuple(int(p) for p in subject)
        if not positions or min(positions) < 0 or max(positions) >= n_pos:
            raise PatchingError(f"subject positions must be a non-empty list within [0, {n_pos}), got {list(subject)}")
        return positions
    row = tokens[0].tolist()
    for variant in (" " + subject, subject):
        span = tl_compat.encode_text(model, variant)
        for start in range(n_pos - len(span), -1, -1):
            if span and row[start : start + len(span)] == span:
                return tuple(range(start, start + len(span)))
    raise PatchingError(f"subject {subject!r} does not appear as a token span in the prompt "
                        f"{tl_compat.to_str_tokens(model, tokens[0])}; pass its positions instead")
