"""Restoration curves that can be read: per unit kind, the fraction of a pair's refusal score
restored by patching the top n units, against n as a percent of the pair's active units.

A pair enters only if its span, refusal score(harmful) − refusal score(harmless), clears a stated
threshold: the effect is divided by that span, and a near-zero span turns noise into "12×".
Effects are kept unclipped; points above `1 + overshoot_margin` are counted and flagged (patching
a subset can overshoot when the units left out had pushed against refusal). Medians are true
medians (the mean of the middle two for an even count).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from sae.metrics import median
from patching.errors import PatchingError

DEFAULT_PERCENTS: tuple[float, ...] = (0.01, 0.03, 0.1, 0.3, 1.0, 3.0, 10.0, 30.0, 100.0)
"""Percent of active units at which each curve is measured."""


def pairs_clearing(spans: Sequence[float], threshold: float) -> list[int]:
    """Indices of the pairs whose span (harmful minus harmless refusal score) is at least `threshold`."""
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not threshold > 0:
        raise PatchingError(f"the span threshold must be a positive number, got {threshold!r}")
    return [i for i, span in enumerate(spans) if math.isfinite(span) and span >= threshold]


def counts_for(percents: Sequence[float], n_active: int) -> list[int]:
    """The unit counts at `percents` of `n_active` (at least 1 each, at most all)."""
    return [min(n_active, max(1, round(p / 100 * n_active))) for p in percents]


@dataclass
class UnitCurve:
    """One unit kind's curve over the pairs that cleared the span threshold."""

    kind: str
    """Unit kind and site, e.g. `latents@blocks.15.hook_resid_pre`, `mlp_post@all layers`."""
    percents: list[float]
    """Percent of active units patched (columns of `fraction`)."""
    fraction: Tensor
    """(pairs, percents): restored fraction of the refusal score, unclipped."""
    n_active: list[int]
    """Per pair, the active units the percent is taken of."""
    pairs: list[int]
    """Suite indices of the pairs (rows of `fraction`)."""

    def median(self) -> list[float | None]:
        """Per percent, the true median over pairs (None without pairs)."""
        if not self.pairs:
            return [None] * len(self.percents)
        return median(self.fraction, 0).tolist()

    def needed(self, level: float) -> list[float | None]:
        """Per pair, the smallest percent whose fraction reaches `level`, or None."""
        out: list[float | None] = []
        for row in self.fraction.tolist():
            hits = [p for p, value in zip(self.percents, row) if value >= level]
            out.append(min(hits) if hits else None)
        return out

    def summary(self, overshoot_margin: float = 0.1) -> dict[str, Any]:
        out: dict[str, Any] = {"kind": self.kind, "n_pairs": len(self.pairs), "percents": self.percents,
                               "median_fraction": self.median()}
        for level in (0.5, 0.9):
            reached = [p for p in self.needed(level) if p is not None]
            key = int(level * 100)
            out[f"median_percent_for_{key}"] = float(median(reached)) if reached else None
            out[f"pairs_reaching_{key}"] = len(reached)
            # The same figure as a count of units: the median pair's n at that percent.
            counts = [float(max(1, round(p / 100 * a))) for p, a in zip(self.needed(level), self.n_active) if p is not None]
            out[f"median_units_for_{key}"] = float(median(counts)) if counts else None
        over = self.fraction > 1 + overshoot_margin
        out["overshoot_points"] = int(over.sum())
        out["max_fraction"] = float(self.fraction.max()) if self.fraction.numel() else None
        out["median_active_units"] = float(median([float(a) for a in self.n_active])) if self.n_active else None
        return out


def empty_curve(kind: str, percents: Sequence[float]) -> UnitCurve:
    return UnitCurve(kind, list(percents), torch.zeros(0, len(percents)), [], [])
