"""The units behind refusal, compared on the same pairs with the same curve code: SAE latents
(one curve per SAE site), MLP neurons (`mlp_post`, one layer and every layer ranked together:
the unit of Chen et al. 2024, "Finding Safety Neurons in Large Language Models"), residual
dimensions, and the refusal direction (Arditi et al. 2024), whose one unit per position is a
single point.

For each pair, units are ranked by attribution (AtP, harmful → harmless denoising with the
refusal score) and the top n are patched jointly and exactly from the harmful run into the
harmless one (`patching.attribution.restoration`). Active units: latents non-zero in the harmful
run from the query on; for raw units every (position, unit) from the query on."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from patching.attribution.restoration import latent_restoration, raw_attribution_sites, raw_restoration
from patching.model import tl_compat
from patching.model.sites import Site
from patching.safety.curves import UnitCurve, counts_for, empty_curve
from patching.safety.score import RefusalScore
from patching.splice.splicer import splice


def active_latents(model: Any, site: Site, sae: Any, tokens: Tensor, start: int) -> int:
    """(position, latent) elements non-zero in `tokens`' run from `start` on."""
    with torch.inference_mode(), splice(model, {site: sae}, cache=True) as state:
        tl_compat.forward_logits(model, tokens)
    return int((state.records[site].latents[0, start:] != 0).sum())


def pair_curves(model: Any, saes: dict[Site, Any], harmful: Tensor, harmless: Tensor, metric: RefusalScore,
                start: int, layer: int, percents: Sequence[float], direction: Tensor) -> dict[str, tuple[Tensor, int]]:
    """One pair's restored fractions per unit kind: `{kind: (fraction (percents,), n_active)}`."""
    out: dict[str, tuple[Tensor, int]] = {}
    positions = harmful.shape[1] - start
    for site, sae in saes.items():
        active = active_latents(model, site, sae, harmful, start)
        counts = counts_for(percents, max(active, 1))
        curve = latent_restoration(model, sae, harmful, harmless, metric, counts, start, site=site)
        out[f"latents@{site.hook_name}"] = (curve.fraction, active)
    n_layers = tl_compat.n_layers(model)
    raw_kinds = {f"mlp_post@layer {layer}": [Site(layer, "mlp_post")],
                 "mlp_post@all layers": [Site(i, "mlp_post") for i in range(n_layers)],
                 f"resid_pre@layer {layer}": [Site(layer, "resid_pre")]}
    every_site = list(dict.fromkeys(s for sites in raw_kinds.values() for s in sites))
    attribution = raw_attribution_sites(model, every_site, harmful, harmless, metric)  # one pass for all kinds
    for kind, sites in raw_kinds.items():
        active = positions * sum(s.width(model) for s in sites)
        out[kind] = (raw_restoration(model, sites, harmful, harmless, metric, counts_for(percents, active), start,
                                     attribution=attribution).fraction, active)
    out[f"direction@layer {layer}"] = (direction_restoration(model, harmful, harmless, metric, start, layer, direction),
                                      positions * tl_compat.d_model(model))
    return out


def direction_restoration(model: Any, harmful: Tensor, harmless: Tensor, metric: RefusalScore, start: int,
                          layer: int, direction: Tensor) -> Tensor:
    """The fraction restored by patching only the refusal direction's component at `layer`
    (every position from `start`), as a one-point curve `(1,)`."""
    site = Site(layer, "resid_pre")
    unit = direction / direction.norm()
    with torch.inference_mode():
        source = tl_compat.run_to_hook(model, harmful, site.hook_name, layer)[0]  # (pos, d_model)
        scores = [metric(tl_compat.forward_logits(model, t)[:, metric.readout], torch.zeros(1, dtype=torch.long))
                  for t in (harmful, harmless)]

    def patch(x: Tensor) -> Tensor:  # the same positions as `source`: one whole forward pass each
        out = x.clone()
        delta = (source[start:] - x[0, start:]) @ unit.to(x.dtype)
        out[0, start:] = x[0, start:] + delta[:, None] * unit.to(x.dtype)
        return out

    with torch.inference_mode(), tl_compat.hooks(model, [(site.hook_name, patch)]):
        patched = metric(tl_compat.forward_logits(model, harmless)[:, metric.readout], torch.zeros(1, dtype=torch.long))
    return ((patched - scores[1]) / (scores[0] - scores[1])).reshape(1).cpu()


def collect_curves(per_pair: list[dict[str, tuple[Tensor, int]]], pairs: list[int], percents: Sequence[float],
                   d_model: int) -> list[UnitCurve]:
    """Stack the pairs' results into one `UnitCurve` per kind (the direction's percent is one
    unit per position of `d_model`)."""
    if not per_pair:
        return [empty_curve("none", percents)]
    curves = []
    for kind in per_pair[0]:
        rows = [row[kind] for row in per_pair]
        axis = [100.0 / d_model] if kind.startswith("direction") else list(percents)
        curves.append(UnitCurve(kind, axis, torch.stack([r[0].float() for r in rows]), [r[1] for r in rows], pairs))
    return curves


def neuron_ranking(model: Any, pairs: list[tuple[Tensor, Tensor]], metric: RefusalScore, start: int) -> Tensor:
    """MLP neurons of every layer ranked by AtP (signed as shares of each pair's span, as
    `raw_restoration` ranks) summed over pairs and positions from `start`: `(n_layers * d_mlp,)`
    flat indices (layer * d_mlp + neuron), best first."""
    sites = [Site(i, "mlp_post") for i in range(tl_compat.n_layers(model))]
    total = torch.zeros(len(sites), sites[0].width(model))
    for harmful, harmless in pairs:
        attribution = raw_attribution_sites(model, sites, harmful, harmless, metric)
        total += torch.stack([attribution.oriented(s)[start:].sum(0).float().cpu() for s in sites])
    return torch.argsort(total.flatten(), descending=True, stable=True)


def latent_ranking(model: Any, site: Site, sae: Any, pairs: list[tuple[Tensor, Tensor]], metric: RefusalScore,
                   start: int) -> Tensor:
    """The SAE's latents ranked by AtP summed over pairs and positions from `start`, best first."""
    total = torch.zeros(sae.d_sae)
    for harmful, harmless in pairs:
        total += latent_restoration(model, sae, harmful, harmless, metric, [1], start, site=site).scores
    return torch.argsort(total, descending=True, stable=True)
