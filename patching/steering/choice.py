"""Choosing latents to steer with: a ranked `LatentChoice`, from a contrast of two corpora
(difference of mean activations) or from a patching/attribution result; `top(k)` is Top-k."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from patching.errors import SteeringError
from patching.model.sites import Site
from patching.splice.collect import Corpus, iter_site_latents, resolve_site
from patching.splice.splicer import SpliceChecks
from patching.sweep.results import PatchResult
from sae.protocol import SAELike
from sae.deprecation import renamed_keywords


@dataclass(frozen=True)
class LatentChoice:
    """Latents ranked for a concept, best first; `top(k)` is the Top-k choice."""

    site: Site
    """The SAE's site."""
    latents: tuple[int, ...]
    """Latent indices, best first."""
    scores: tuple[float, ...]
    """Ranking score of each (mean activation difference, or patching effect)."""
    typical_activations: tuple[float, ...] | None = None
    """Mean non-zero activation of each on the concept prompts (None when unknown)."""
    source: str = "given"
    """How the ranking was made (`contrast`, `result:<method>`, `given`)."""

    def __post_init__(self) -> None:
        n = len(self.latents)
        if n == 0 or len(self.scores) != n or (self.typical_activations is not None and len(self.typical_activations) != n):
            raise SteeringError(f"LatentChoice needs equally many latents ({n}), scores ({len(self.scores)}) and "
                                f"typical activations; got {self.typical_activations!r}")

    def top(self, k: int) -> "LatentChoice":
        if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= len(self.latents):
            raise SteeringError(f"k must be an int in 1..{len(self.latents)} (latents ranked), got {k!r}")
        acts = None if self.typical_activations is None else self.typical_activations[:k]
        return LatentChoice(self.site, self.latents[:k], self.scores[:k], acts, self.source)



@renamed_keywords(batch_rows="batch_size")
def contrast_latents(model: Any, sae: Any, positive: Corpus, negative: Corpus, *, k: int = 16,
                     site: Site | None = None, batch_size: int = 8, checks: SpliceChecks | None = None) -> LatentChoice:
    """Rank latents by mean activation on `positive` minus mean on `negative` (tokens pooled,
    special tokens left out) and keep the `k` best: the difference-of-means direction of Rimsky
    et al. 2024 ("Steering Llama 2 via Contrastive Activation Addition"), read in the SAE's basis.
    `batch_size` corpus rows per forward (`batch_rows=` is its deprecated name).
    """
    site, sae = resolve_site(model, sae, site, checks=checks)
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= sae.d_sae:
        raise SteeringError(f"k must be an int in 1..{sae.d_sae} (d_sae), got {k!r}")
    pos_mean, pos_active_mean = _mean_latents(model, sae, site, positive, batch_size)
    neg_mean, _ = _mean_latents(model, sae, site, negative, batch_size)
    difference = pos_mean - neg_mean
    order = torch.argsort(difference, descending=True, stable=True)[:k]
    return LatentChoice(site, tuple(int(i) for i in order), tuple(float(difference[i]) for i in order),
                        tuple(float(pos_active_mean[i]) for i in order), "contrast")


def _mean_latents(model: Any, sae: SAELike, site: Site, corpus: Corpus, batch_rows: int) -> tuple[Tensor, Tensor]:
    """Mean activation per latent over counted tokens, and mean over the tokens where it fires."""
    total = torch.zeros(sae.d_sae, dtype=torch.float64)
    active = torch.zeros(sae.d_sae, dtype=torch.float64)
    n = 0
    for item in iter_site_latents(model, sae, site, corpus, batch_rows=batch_rows):
        z = item.latents[item.keep].double()
        total += z.sum(0)
        active += (z > 0).sum(0)
        n += z.shape[0]
    if n == 0:
        raise SteeringError("the contrast corpus has no counted tokens (only special tokens?)")
    return total / n, total / active.clamp(min=1)


def latents_from_result(result: PatchResult, k: int, *, site: Site | None = None) -> LatentChoice:
    """The `k` latents with the largest positive mean effect in a patching/attribution result
    (from `result.top`), each latent counted once; all at one site."""
    entries = [e for e in result.top(len(result.units), by_abs=False) if e.kind == "latent" and e.latent is not None]
    sites = {e.site for e in entries}
    wanted = site.hook_name if site is not None else (sites.pop() if len(sites) == 1 else None)
    if wanted is None:
        raise SteeringError(f"the result has latents at several sites {sorted(map(str, sites))}: pass site=")
    chosen: dict[int, float] = {}
    for entry in entries:
        if entry.site == wanted and entry.effect > 0 and entry.latent not in chosen:
            chosen[entry.latent] = entry.effect
    if len(chosen) < k:
        raise SteeringError(f"asked for k={k} latents but the result has {len(chosen)} with a positive effect at {wanted}")
    top = list(chosen.items())[:k]
    return LatentChoice(Site.from_hook_name(wanted), tuple(i for i, _ in top), tuple(e for _, e in top), None,
                        f"result:{result.method}")
