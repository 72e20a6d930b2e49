"""Checking an estimate against exact patching: rank agreement, recall and a false-negative probe.

Linear estimates fail in known places — saturated attention softmax, flat regions of the
metric, cancellation between paths (Kramár et al. 2024, section 3) — so `verify` runs the exact
sweep on the estimate's top-k units and on a random sample of the rest and reports how far
the ranking holds.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from patching.errors import PatchingError
from patching.figures import subplots
from patching.saved import SavedResult
from patching.sweep.patch import patch_latents
from patching.sweep.results import PatchResult
from sae.deprecation import renamed_keywords


@dataclass(frozen=True)
class Verification(SavedResult):
    """How an estimate compares with exact patching on the units it was checked on."""

    spearman: float
    """Spearman rank correlation of estimated and exact mean effects (by magnitude for unsigned estimates)."""
    recall_at_k: float
    """Share of the exact top-k (among checked units, by magnitude) that the estimate also ranks top-k."""
    k: int
    """The k used."""
    max_missed_effect: float
    """Largest exact |effect| among the randomly sampled units outside the estimate's top-k."""
    n_checked: int
    """Units patched exactly."""
    exact: PatchResult
    """The exact effects of the checked units."""
    estimate: Tensor
    """The estimate's mean effects of the same units."""
    provenance: dict[str, Any] = field(default_factory=dict, compare=False)
    """What produced it: the estimate's inputs and the checked counts (`patching.model.provenance`)."""

    def to_dict(self) -> dict[str, float | int]:
        return {"spearman": self.spearman, "recall_at_k": self.recall_at_k, "k": self.k,
                "max_missed_effect": self.max_missed_effect, "n_checked": self.n_checked}

    def to_dataframe(self) -> Any:
        """One row per checked unit: its label, the estimated and the exact mean effect."""
        import pandas as pd

        return pd.DataFrame({"unit": [unit.label() for unit in self.exact.units], "estimate": self.estimate.tolist(),
                             "exact": self.exact.mean_effect.tolist()})

    def plot(self, path: str | Path) -> Path:
        """Estimated against exact mean effect of each checked unit, with the diagonal."""
        fig, ax = subplots(figsize=(4.5, 4.5))
        exact = self.exact.mean_effect
        ax.scatter(exact.tolist(), self.estimate.tolist(), s=12)
        both = torch.cat([exact, self.estimate]) if exact.numel() else torch.zeros(1)
        low, high = float(both.min()), float(both.max())
        ax.plot([low, high], [low, high], color="black", linewidth=0.6, linestyle=":")
        ax.set_xlabel("exact effect")
        ax.set_ylabel("estimated effect")
        ax.set_title(f"Spearman {self.spearman:.3f}, recall@{self.k} {self.recall_at_k:.2f}", fontsize=9)
        fig.tight_layout()
        fig.savefig(Path(path), dpi=120)
        return Path(path)


@renamed_keywords(top_k="k")
def verify(result: PatchResult, *, k: int = 50, random_k: int = 50, seed: int = 0, batch_size: int | None = None,
           context: dict[str, Any] | None = None) -> Verification:
    """Patch the estimate's top `k` units and `random_k` others exactly; compare (`top_k=` is the
    deprecated name of `k`).

    `context` (model, saes, clean, corrupted, metric, direction, align) defaults to the one an
    estimate carries from `attribute_latents`; pass it for a result loaded from disk.
    """
    context = context or result.context
    if context is None:
        raise PatchingError("this result carries no inputs to re-run (loaded from disk?): pass context={model, saes, ...}")
    for name, value in (("k", k), ("random_k", random_k)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise PatchingError(f"{name} must be a non-negative int, got {value!r}")
    score = result.mean_effect.abs()
    order = torch.argsort(score, descending=True, stable=True)
    top = order[: k].tolist()
    rest = order[k:].tolist()
    generator = torch.Generator().manual_seed(seed)
    sampled = [rest[i] for i in torch.randperm(len(rest), generator=generator)[:random_k].tolist()]
    checked = top + sampled
    exact = patch_latents(context["model"], context["saes"], context["clean"], context["corrupted"], context["metric"],
                          direction=context["direction"], align=context["align"], units=[result.units[i] for i in checked],
                          batch_size=batch_size, progress=False, checks=context.get("checks"))
    estimate = result.mean_effect[checked]
    truth = exact.mean_effect
    signed = result.method != "atp_gd"
    k = min(k, len(checked))
    exact_top = set(torch.argsort(truth.abs(), descending=True, stable=True)[:k].tolist())
    recall = len(exact_top & set(range(k))) / k if k else float("nan")
    missed = truth[len(top):].abs().max().item() if sampled else 0.0
    record = {**result.provenance, "verified_with": {"k": k, "random_k": random_k, "seed": seed, "method": result.method}}
    return Verification(spearman=spearman(estimate if signed else estimate.abs(), truth if signed else truth.abs()),
                        recall_at_k=recall, k=k, max_missed_effect=missed, n_checked=len(checked), exact=exact,
                        estimate=estimate, provenance=record)


def spearman(a: Tensor, b: Tensor) -> float:
    """Spearman's rho with average ranks for ties."""
    if a.numel() < 2:
        return float("nan")
    ra, rb = _ranks(a.double()), _ranks(b.double())
    ra, rb = ra - ra.mean(), rb - rb.mean()
    denominator = (ra.norm() * rb.norm()).item()
    return float((ra @ rb).item() / denominator) if denominator > 0 else float("nan")


def _ranks(x: Tensor) -> Tensor:
    order = torch.argsort(x, stable=True)
    ranks = torch.empty_like(x)
    ranks[order] = torch.arange(x.numel(), dtype=x.dtype)
    for value in torch.unique(x):
        tied = x == value
        if tied.sum() > 1:
            ranks[tied] = ranks[tied].mean()
    return ranks
