"""The forward passes behind one batch of `evaluate_saes`: one clean run shared by every SAE, and
each SAE's spliced and zero-ablated runs.

Three runs per SAE (clean, spliced, ablated) is what SAELens's `get_recons_loss` does, and what this
module falls back to on a backend that runs whole rows (the Bridge). On `HookedTransformer` two things
are shared or skipped, without changing a number:

- the clean run is one forward for all SAEs, caching the residual stream at each SAE's site;
- an SAE at `blocks.L.hook_resid_pre` changes nothing before block L, so its spliced and ablated runs
  start at block L from the clean run's cached residual (`tl_compat.run_blocks`, TransformerLens's
  `start_at_layer`), and the site's hook still fires, as the block's first. Blocks 0..L-1 would
  recompute the same residual: at SmolLM2's layer 15 this halves the two runs, at layer 27 it leaves a
  tenth of them. SAEs sharing a site share its ablated run.

Tests compare the shared runs with the three full forwards on tiny models (`tests/test_evaluation_shared.py`).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any, NamedTuple

import torch
from torch import Tensor

from patching.model import tl_compat
from patching.model.sites import Site
from patching.splice.splicer import SpliceChecks, splice

__all__ = ["Run", "batch_runs", "starts_at_block"]


class Run(NamedTuple):
    """One forward pass of a batch: `clean` (index None), `ablated` (index: the site) or `spliced`
    (index: the SAE's position in the list, with its splice record)."""

    kind: str
    index: int | Site | None
    logits: Tensor
    record: Any = None


def starts_at_block(model: Any, sites: Sequence[Site]) -> bool:
    """Whether the spliced and ablated runs can start at each site's block from the clean residual:
    every site is a block's `resid_pre` and the backend runs blocks from a layer (not the Bridge)."""
    return not tl_compat.full_rows(model) and all(site.kind == "resid_pre" for site in sites)


@torch.inference_mode()
def batch_runs(model: Any, saes: Sequence[tuple[Site, Any]], tokens: Tensor, keep: Tensor,
               checks: SpliceChecks | None, *, shared: bool) -> Iterator[Run]:
    """The runs of one batch, one at a time (each run's logits are `batch x pos x vocab`: the caller
    reduces one before the next is made): `clean` first, then `ablated` for each site, then
    `spliced` for each SAE with its splice record (inputs, latents, error)."""
    sites = list(dict.fromkeys(site for site, _ in saes))
    if shared:
        final, cache = tl_compat.run_until_end_with_cache(model, tokens, [site.hook_name for site in sites])
        yield Run("clean", None, tl_compat.readout(model, final))
        del final

        def run(site: Site) -> Tensor:
            return tl_compat.readout(model, tl_compat.run_blocks(model, cache[site.hook_name], site.layer))
    else:
        yield Run("clean", None, tl_compat.forward_logits(model, tokens))

        def run(site: Site) -> Tensor:
            return tl_compat.forward_logits(model, tokens)

    for site in sites:
        with tl_compat.hooks(model, [(site.hook_name, torch.zeros_like)]):
            ablated = run(site)
        yield Run("ablated", site, ablated)
    for index, (site, sae) in enumerate(saes):
        with splice(model, {site: sae}, error_term=False, cache=True, checks=checks) as state:
            # SAELens keeps the original activation at ignored positions: torch.where(mask, sae_out, x)
            restore = [(site.hook_name, lambda out: torch.where(keep[..., None], out, state.records[site].inputs))]
            with tl_compat.hooks(model, restore):
                logits = run(site)
        yield Run("spliced", index, logits, state.records[site])
