"""The error share: how much of a pair's effect at an SAE site the dictionary carries, and how much
its error node does (issue 26, section 4).

A spliced site's activation is `x = decode(z) + e`, with `e = x - decode(encode(x))` the SAE's error
node (Marks et al. 2024, "Sparse Feature Circuits", treat it as one more node). For each prompt pair
and site, three exact denoising patches run through the batched engine (`patch_latents` with
explicit units, every base position):

- `latents`: every latent patched to its clean value, the error node held at its corrupted value;
- `error`: the error node patched to its clean value, every latent held corrupted;
- `total`: both at once, i.e. the site's whole activation at every position. At a `resid_pre` site
  whose positions all align this is the clean run itself, so it is 1 up to float rounding: a check
  on the splice, kept in the result rather than assumed.

Each is a normalised effect, `(M_patched - M_corr) / (M_clean - M_corr)`. Where the metric is affine
in the site's activation the two shares add to `total`; elsewhere their gap from it measures the
interaction between what the dictionary and its error carry. A dictionary that explains a finding
has `latents` near 1 (the issue's target at the flagship site is 0.8).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from patching.configs import resolve_config
from patching.errors import PatchingError
from patching.figures import subplots
from patching.saved import SavedResult
from patching.splice.splicer import SpliceChecks, resolve_saes
from patching.sweep.engine import DEFAULT_MEMORY_MB
from patching.sweep.pairs import Align, Prompts
from patching.sweep.patch import patch_latents
from patching.sweep.units import PatchUnit, UnitPart

SHARES = ("latents", "error", "total")
"""The three patches of each site, in the order their units run."""


@dataclass(frozen=True)
class ErrorShareConfig:
    """Settings of `error_share`."""

    align: Align = None
    """How base and source positions correspond (`make_pairs`); unaligned positions stay corrupted."""
    batch_size: int | None = None
    """Rows per forward pass; None derives it from `memory_mb`."""
    memory_mb: int = DEFAULT_MEMORY_MB
    """Memory budget a sweep derives its batch size from."""
    progress: bool = False
    """Show a progress bar (three runs per site and pair: off by default)."""
    checks: SpliceChecks | None = None
    """Splice checks to waive (`SpliceChecks`); None waives nothing."""

    def __post_init__(self) -> None:
        if not isinstance(self.progress, bool):
            raise PatchingError(f"ErrorShareConfig.progress must be a bool, got {self.progress!r}")
        if self.checks is not None and not isinstance(self.checks, SpliceChecks):
            raise PatchingError(f"ErrorShareConfig.checks must be a SpliceChecks or None, got {type(self.checks).__name__}")


@dataclass
class ErrorShare(SavedResult):
    """Per pair and site, the fraction of the pair's denoising effect restored by the latents alone,
    by the error node alone, and by both (the whole site)."""

    sites: list[str]
    """Hook names of the SAE sites, one column each."""
    latents: Tensor
    """(pairs, sites): every latent patched clean, the error node held corrupted."""
    error: Tensor
    """(pairs, sites): the error node patched clean, every latent held corrupted."""
    total: Tensor
    """(pairs, sites): latents and error together, the site's whole activation."""
    metric_clean: Tensor
    """M on each pair's clean prompt, (pairs,)."""
    metric_corrupted: Tensor
    """M on each pair's corrupted prompt, (pairs,)."""
    provenance: dict[str, Any] = field(default_factory=dict)
    """What produced it (`patching.model.provenance.provenance`), with the engine's record."""

    def to_dataframe(self) -> Any:
        """One row per (pair, site): the three shares and the pair's clean and corrupted metric."""
        import pandas as pd

        return pd.DataFrame([{"pair": p, "site": site, **{name: float(getattr(self, name)[p, s]) for name in SHARES},
                              "metric_clean": float(self.metric_clean[p]),
                              "metric_corrupted": float(self.metric_corrupted[p])}
                             for p in range(self.latents.shape[0]) for s, site in enumerate(self.sites)])

    def plot(self, path: str | Path) -> Path:
        """Bars of the three shares per site, averaged over pairs (each pair a dot)."""
        fig, ax = subplots(figsize=(1.5 + 2.2 * len(self.sites), 3.2))
        width = 0.8 / len(SHARES)
        for j, name in enumerate(SHARES):
            values = getattr(self, name)
            xs = torch.arange(len(self.sites)) + (j - 1) * width
            ax.bar(xs.tolist(), values.mean(0).tolist(), width=width, label=name)
            for p in range(values.shape[0]):
                ax.plot(xs.tolist(), values[p].tolist(), "k.", markersize=3)
        ax.set_xticks(range(len(self.sites)), self.sites, fontsize=8)
        ax.axhline(1.0, color="grey", linewidth=0.6, linestyle="--")
        ax.set_ylabel("fraction of the pair's effect restored")
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(path, dpi=120)
        return Path(path)


def error_share(model: Any, saes: Any, clean: Prompts, corrupted: Prompts, metric: Any, *,
                config: ErrorShareConfig | None = None, **overrides: Any) -> ErrorShare:
    """The latents' and the error node's shares of each pair's denoising effect at each SAE site
    (module docstring): three exact joint patches per site over every position, in one batched sweep."""
    config = resolve_config(ErrorShareConfig, config, overrides)
    sites = list(resolve_saes(model, saes, checks=config.checks))
    units = []
    for site in sites:
        latents, error = UnitPart(site, "latent", None, None), UnitPart(site, "error", None)
        units += [PatchUnit((latents,)), PatchUnit((error,)), PatchUnit((latents, error))]
    result = patch_latents(model, saes, clean, corrupted, metric, direction="denoise", units=units, align=config.align,
                           batch_size=config.batch_size, memory_mb=config.memory_mb, progress=config.progress,
                           checks=config.checks)
    effect = result.effect.reshape(result.effect.shape[0], len(sites), len(SHARES))
    provenance = {**result.provenance, "unit": "error_share"}
    return ErrorShare([site.hook_name for site in sites], *effect.unbind(-1), result.metric_clean,
                      result.metric_corrupted, provenance)
