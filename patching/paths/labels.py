"""Labels for latent nodes: each latent's top activating tokens over a corpus (held-out text, ideally).

Attribution-graph viewers label a feature by what makes it fire (circuit-tracer's and Neuronpedia's
"top activations"); here a label is the distinct tokens at a latent's `k` largest activations over the
corpus, joined by `|`, e.g. `" Paris| France| Seine"`. An error node is labelled `error`. A latent that never
fires on the corpus is labelled `(silent)`, so the viewer never shows a label the data did not support.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from patching.errors import PatchingError
from patching.model import tl_compat
from patching.splice.collect import Corpus, iter_site_latents
from patching.splice.splicer import SpliceChecks, resolve_saes


def latent_labels(model: Any, saes: Any, corpus: Corpus, nodes: Sequence[Any], *, k: int = 3,
                  checks: SpliceChecks | None = None) -> dict[Any, str]:
    """`{node: label}` for every `LatentNode` in `nodes` whose site has an SAE in `saes`."""
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise PatchingError(f"k must be a positive int, got {k!r}")
    resolved = resolve_saes(model, saes, checks=checks)
    stray = [node.label() for node in nodes if node.site not in resolved]
    if stray:
        raise PatchingError(f"no SAE given for the sites of {stray[:3]}; SAEs are at {[str(s) for s in resolved]}")
    labels: dict[Any, str] = {node: "error" for node in nodes if node.latent is None}
    for site, sae in resolved.items():
        latents = sorted({node.latent for node in nodes if node.site == site and node.latent is not None})
        if not latents:
            continue
        best_values = torch.full((k, len(latents)), -torch.inf)
        best_tokens = torch.zeros((k, len(latents)), dtype=torch.long)
        for row in iter_site_latents(model, sae, site, corpus, latents=latents):
            values = torch.where(row.keep[:, None], row.latents, torch.tensor(-torch.inf))  # (pos, n)
            tokens = row.tokens[:, None].expand_as(values)
            merged_values, order = torch.cat([best_values, values]).topk(min(k, k + len(values)), dim=0)
            best_tokens = torch.cat([best_tokens, tokens]).gather(0, order)
            best_values = merged_values
        for j, latent in enumerate(latents):
            fired = [int(t) for v, t in zip(best_values[:, j], best_tokens[:, j]) if float(v) > 0]
            words = list(dict.fromkeys(tl_compat.to_string(model, torch.tensor([t])) for t in fired))
            text = "|".join(words) if words else "(silent)"
            for node in nodes:
                if node.site == site and node.latent == latent:
                    labels[node] = text
    return labels
