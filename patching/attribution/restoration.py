"""Restoration curves: how much of a behaviour the top n units restore when patched jointly.

For one clean/corrupted pair and a metric, units are ranked by attribution (AtP, Nanda 2023,
"Attribution Patching"; Syed et al. 2023) and the top n are patched *jointly and exactly* from
the clean run into the corrupted one (denoising). The curve is that normalized effect against n,
for SAE latents and for raw units at a site (residual dimensions, or MLP neurons at `mlp_post`).
Joint patching, not a sum of single-unit effects: single-unit patching misses redundant units
that compensate for each other (the Hydra effect, McGrath et al. 2023, "The Hydra Effect").

An element is one unit at one position; n counts elements. The safety-latent search
(`patching.safety.search`) and the polysemanticity benchmark both build on these curves.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import Tensor

from patching.attribution.estimators import attribute_latents, frozen_parameters
from patching.model import tl_compat
from patching.model.sites import Site
from patching.errors import PatchingError
from patching.saved import SavedResult
from patching.splice.collect import resolve_site
from patching.splice.splicer import SpliceChecks, splice
from patching.sweep.objectives import as_metric
from patching.sweep.patch import patch_latents, patch_residual
from patching.sweep.units import PatchUnit, UnitPart
from sae.deprecation import warn_deprecated
from sae.metrics import median


@dataclass
class RestorationCurve(SavedResult):
    """Fraction of a behaviour restored by patching the top n units jointly, per pair."""

    counts: list[int]
    """n, the number of (position, unit) elements patched."""
    fraction: Tensor
    """(pairs, counts): normalized denoising effect of patching the top n elements."""
    n_active: list[int]
    """Per pair, the elements the percent is taken of (active latents, or dimensions x positions)."""
    provenance: dict[str, Any] = field(default_factory=dict)
    """What produced it (`patching.model.provenance.provenance`)."""

    def to_dataframe(self) -> Any:
        """One row per (pair, n): the count, its percent of the pair's active elements, the fraction."""
        import pandas as pd

        return pd.DataFrame([{"pair": p, "count": n, "percent": 100.0 * n / self.n_active[p], "fraction": value}
                             for p, row in enumerate(self.fraction.tolist()) for n, value in zip(self.counts, row)])

    def plot(self, path: str | Path, *, label: str = "units", title: str = "", x: str = "percent") -> Path:
        """Fraction restored against units patched, one thin line per pair and the median in bold."""
        from patching.attribution.plots import plot_restoration_curves

        return plot_restoration_curves({label: self}, Path(path), title=title, ylabel="fraction restored", x=x)

    def median(self) -> list[float]:
        return median(self.fraction, 0).tolist()  # true median: the mean of the middle two for even counts

    def needed(self, threshold: float) -> list[float | None]:
        """Per pair, the smallest n (as a percent of active) reaching `threshold`, or None."""
        return [None if n is None else 100.0 * n / active for n, active in zip(self.needed_count(threshold), self.n_active)]

    def needed_count(self, threshold: float) -> list[int | None]:
        """Per pair, the smallest n among `counts` whose fraction reaches `threshold`, or None."""
        out = []
        for row in self.fraction:
            hits = [n for n, value in zip(self.counts, row.tolist()) if value >= threshold]
            out.append(min(hits) if hits else None)
        return out


class LatentRestoration(NamedTuple):
    """One pair's latent curve."""

    fraction: Tensor
    """(counts,): effect of the top n (position, latent) elements patched jointly."""
    n_active: int
    """Non-zero (position, latent) elements of the clean run (whose values are patched in) from `start` on."""
    full: float
    """Effect of patching every latent and the error node (bookkeeping: 1.0)."""
    scores: Tensor
    """(d_sae,): each latent's AtP estimate summed over positions."""


class RawRestoration(NamedTuple):
    """One pair's raw-unit curve."""

    fraction: Tensor
    """(counts,): effect of the top n (position, dimension) elements patched jointly."""
    n_elements: int
    """Dimensions x positions considered."""


def _site_second(fn: Any) -> Any:
    """The old order `(model, site, sae, ...)`, told apart by the `Site` in second place: warn and
    call as `(model, sae, ..., site=site)`."""
    @functools.wraps(fn)
    def wrapper(model: Any, *args: Any, **kwargs: Any) -> Any:
        if args and isinstance(args[0], Site):
            if "site" in kwargs:
                raise TypeError(f"{fn.__name__}() got a site both second (the old order) and as site=")
            warn_deprecated(f"{fn.__name__}(model, site, sae, ...)", f"{fn.__name__}(model, sae, ..., site=site)")
            kwargs["site"], args = args[0], args[1:]
        return fn(model, *args, **kwargs)
    return wrapper


@_site_second
def latent_restoration(model: Any, sae: Any, clean: Tensor, corrupted: Tensor, metric: Any,
                       counts: Sequence[int], start: int, *, site: Site | None = None, with_error: bool = False,
                       checks: SpliceChecks | None = None) -> LatentRestoration:
    """Rank (position, latent) elements from `start` on by AtP; patch the top n jointly.

    `site` defaults to the SAE's own hook (from its config). The old order `(model, site, sae, ...)`
    still works for one release, with a `DeprecationWarning`.

    `with_error` also patches the SAE's error node at every position from `start` with each
    top n: what the latents add to what the SAE does not reconstruct (Marks et al. 2024,
    "Sparse Feature Circuits", treat the error as one more node the same way). A count that
    selects no element (no latent differs from `start` on) restores exactly 0 and is not run."""
    site, sae = resolve_site(model, sae, site, checks=checks)
    positions = list(range(start, clean.shape[1]))
    estimate = attribute_latents(model, {site: sae}, clean, corrupted, metric, include_error=False,
                                 positions=positions, progress=False, checks=checks)
    order = torch.argsort(estimate.effect[0], descending=True, stable=True).tolist()
    units = [joint_latent_unit([estimate.units[j] for j in order[:n]], site) if order else None for n in counts]
    everything = PatchUnit((UnitPart(site, "latent", None, None), UnitPart(site, "error", None)))
    if with_error:
        error = UnitPart(site, "error", tuple(positions))
        units = [PatchUnit((unit.parts if unit else ()) + (error,)) for unit in units]
    run = [unit for unit in units if unit is not None] + [everything]
    exact = patch_latents(model, {site: sae}, clean, corrupted, metric, units=run, progress=False, checks=checks)
    values = iter(exact.effect[0, :-1].tolist())
    fraction = torch.tensor([next(values) if unit is not None else 0.0 for unit in units])
    with torch.inference_mode(), splice(model, {site: sae}, cache=True, checks=checks) as state:
        tl_compat.forward_logits(model, clean)
    active = int((state.records[site].latents[0, start:] != 0).sum())
    scores = torch.zeros(sae.d_sae)
    for unit, value in zip(estimate.units, estimate.effect[0].tolist()):
        scores[unit.latent] += value
    return LatentRestoration(fraction, active, exact.effect[0, -1].item(), scores)


def joint_latent_unit(units: list[PatchUnit], site: Site) -> PatchUnit:
    """One unit patching the given single (position, latent) units together, grouped by position.
    An empty selection is an error: there is no unit that patches nothing (the old placeholder
    patched latent 0 at position 0)."""
    if not units:
        raise PatchingError("joint_latent_unit needs at least one (position, latent) unit")
    by_position: dict[int, list[int]] = {}
    for unit in units:
        by_position.setdefault(unit.position, []).append(unit.latent)
    return PatchUnit(tuple(UnitPart(site, "latent", (p,), tuple(sorted(latents))) for p, latents in sorted(by_position.items())))


class RawAttribution(NamedTuple):
    """AtP on raw activations at several sites for one pair, and the pair's span."""

    scores: dict[Site, Tensor]
    """(x_clean − x_corrupted) · dM/dx at the corrupted run, (pos, width) per site."""
    span: float
    """M(clean) − M(corrupted), from the same two forwards: its sign orients the ranking."""

    def oriented(self, site: Site) -> Tensor:
        """`scores[site]` signed as shares of the span: positive where a unit moves the metric
        towards the clean run (raw AtP's sign flips when the clean metric lies below the corrupted)."""
        return self.scores[site] if self.span >= 0 else -self.scores[site]


def raw_restoration(model: Any, site: Site | Sequence[Site], clean: Tensor, corrupted: Tensor, metric: Any,
                    counts: Sequence[int], start: int, *, attribution: RawAttribution | None = None) -> RawRestoration:
    """The same curve for raw units at `site` (residual dimensions, or neurons at `mlp_pre` /
    `mlp_post`), ranked by AtP on the raw activation. Several sites (e.g. `mlp_post` of every
    layer) are ranked together: the top n may mix sites. `attribution`: the AtP scores of these
    sites already computed (`raw_attribution_sites` on the same pair and metric), so that several
    curves on one pair share one forward and backward pass."""
    sites = [site] if isinstance(site, Site) else list(site)
    if attribution is not None and not set(sites) <= set(attribution.scores):
        missing = set(sites) - set(attribution.scores)
        raise PatchingError(f"attribution holds no scores for {sorted(s.hook_name for s in missing)}")
    by_site = attribution if attribution is not None else raw_attribution_sites(model, sites, clean, corrupted, metric)
    # Ranked by the share of the span each element restores, as latent_restoration ranks.
    scores = torch.cat([by_site.oriented(s)[start:] for s in sites], dim=1)  # (pos, sum of widths)
    bounds = torch.tensor([0] + [by_site.scores[s].shape[1] for s in sites]).cumsum(0)
    order = torch.argsort(scores.flatten(), descending=True, stable=True)
    width = scores.shape[1]
    units = []
    for n in counts:
        flat = order[:n]
        column = flat % width
        which = torch.searchsorted(bounds, column, right=True) - 1  # the site of each chosen element
        key = which * scores.shape[0] + flat // width  # (site, position), sortable
        ranked = torch.argsort(key, stable=True)
        keys, sizes = torch.unique_consecutive(key[ranked], return_counts=True)
        parts = []
        for k, group in zip(keys.tolist(), torch.split(ranked, sizes.tolist())):
            i, p = divmod(k, scores.shape[0])
            dims = (column[group] - bounds[i]).sort().values
            parts.append(UnitPart(sites[i], "raw", (start + p,), tuple(dims.tolist())))
        units.append(PatchUnit(tuple(parts)))
    exact = patch_residual(model, clean, corrupted, metric, units=units, progress=False)
    return RawRestoration(exact.effect[0], scores.numel())


def raw_attribution(model: Any, site: Site, clean: Tensor, corrupted: Tensor, metric: Any) -> Tensor:
    """AtP on a raw activation: (x_clean − x_corrupted) · dM/dx at the corrupted run, (pos, width)."""
    return raw_attribution_sites(model, [site], clean, corrupted, metric).scores[site]


def raw_attribution_sites(model: Any, sites: Sequence[Site], clean: Tensor, corrupted: Tensor,
                          metric: Any) -> RawAttribution:
    """`raw_attribution` at several sites from one clean forward and one corrupted backward, and
    the pair's span read from those same two forwards."""
    metric = as_metric(metric)
    if metric.readout is None:
        raise PatchingError("raw attribution needs a metric that reads one position (e.g. LogitDiff(position=-1))")
    names = [site.hook_name for site in sites]
    pair = torch.tensor([0])
    with torch.inference_mode():
        final, acts = tl_compat.run_until_end_with_cache(model, clean, names)
        m_clean = float(metric(tl_compat.readout(model, final[:, metric.readout]), pair)[0])
    probes: dict[Site, dict[str, Tensor]] = {site: {} for site in sites}

    def add_probe(probe: dict[str, Tensor]) -> Any:
        def fn(x: Tensor) -> Tensor:
            probe["node"] = torch.zeros_like(x, requires_grad=True)
            probe["x"] = x.detach()
            return x + probe["node"]
        return fn

    with tl_compat.hooks(model, [(site.hook_name, add_probe(probes[site])) for site in sites]), \
            frozen_parameters(model), torch.enable_grad():
        logits = tl_compat.forward_logits(model, corrupted)
        m_corrupted = metric(logits[:, metric.readout], pair)
        m_corrupted.sum().backward()
    scores = {site: (acts[site.hook_name][0] - probes[site]["x"][0]) * probes[site]["node"].grad[0] for site in sites}
    return RawAttribution(scores, m_clean - float(m_corrupted[0].detach()))  # a number: no graph (and no warning)
