"""Harvesting: a model's activations at one `Site` over a token stream, as training chunks.

The forward pass stops at the site (DESIGN.md, performance principles): blocks after the
site's layer never run, and the hook aborts the pass as soon as it has fired. BOS and other
special tokens are dropped by default: their residual norms are outliers (often 10-100x the
typical token's) that would dominate the reconstruction loss.
"""

from __future__ import annotations

from typing import Any

import torch
from jaxtyping import Float, Int
from torch import Tensor

from patching.model import tl_compat
from patching.model.loading import model_flags
from patching.model.sites import Site
from training.errors import DataSourceError
from training.activations.sources import ShuffleBuffer, filtered
from training.data.text import TextOpener, TokenRows


@torch.inference_mode()
def harvest(model: Any, site: Site, tokens: Int[Tensor, "batch pos"], *,
            drop_tokens: Int[Tensor, " n_drop"] | None = None) -> Float[Tensor, "token d_in"]:
    """Activations at `site` for every position whose token is not in `drop_tokens`."""
    site.check(model)
    acts = tl_compat.run_to_hook(model, tokens, site.hook_name, site.layer)  # (batch, pos, d_in)
    acts = acts.reshape(-1, acts.shape[-1])
    if drop_tokens is not None and drop_tokens.numel():
        keep = ~torch.isin(tokens.reshape(-1), drop_tokens)
        acts = acts[keep]
    return acts.float()


class HarvestChunks:
    """A `ChunkSource`: each chunk is the activations of `rows_per_chunk` token rows."""

    def __init__(self, model: Any, site: Site, rows: TokenRows, *, rows_per_chunk: int = 8,
                 drop_special_tokens: bool = True) -> None:
        site.check(model)
        if rows_per_chunk <= 0:
            raise DataSourceError(f"rows_per_chunk must be positive, got {rows_per_chunk}")
        self.model = model
        self.site = site
        self.rows = rows
        self.rows_per_chunk = rows_per_chunk
        self.d_in = site.width(model)
        special = tl_compat.special_token_ids(model) if drop_special_tokens else []
        self.drop_tokens = torch.tensor(special, dtype=torch.long)

    def next_chunk(self) -> Float[Tensor, "token d_in"]:
        tokens = self.rows.next_rows(self.rows_per_chunk)
        return harvest(self.model, self.site, tokens, drop_tokens=self.drop_tokens)

    def state_dict(self) -> dict[str, Any]:
        return {"rows": self.rows.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.rows.load_state_dict(state["rows"])

    def describe(self) -> dict[str, Any]:
        return {"source": "harvest", "model": tl_compat.model_name(self.model), "hook_name": self.site.hook_name,
                "flags": model_flags(self.model), "rows_per_chunk": self.rows_per_chunk,
                "dropped_tokens": self.drop_tokens.tolist(), **self.rows.describe()}


def harvested_batches(model: Any, site: Site, open_texts: TextOpener, *, batch_size: int, context_size: int = 128,
                      buffer_tokens: int = 65536, rows_per_chunk: int = 8, drop_special_tokens: bool = True,
                      seed: int = 0, description: str = "texts", rank: int = 0,
                      world_size: int = 1, max_norm_ratio: float | None = None) -> ShuffleBuffer:
    """Shuffled `(batch_size, d_in)` activation batches harvested from `open_texts` on the fly.

    With `world_size` > 1, this rank harvests only its stripe of the token rows (data parallelism).
    Activations over `max_norm_ratio` x their chunk's median norm are left out (`MassiveActivationFilter`;
    None keeps them).
    """
    rows = TokenRows(model, open_texts, context_size=context_size, description=description, rank=rank,
                     world_size=world_size)
    chunks = HarvestChunks(model, site, rows, rows_per_chunk=rows_per_chunk, drop_special_tokens=drop_special_tokens)
    return ShuffleBuffer(filtered(chunks, max_norm_ratio), batch_size, capacity=max(buffer_tokens, 2 * batch_size),
                         seed=seed + rank)


class MultiSiteChunks:
    """Activations at several sites from one forward pass per chunk of rows.

    The pass runs blocks 0..deepest site's layer and stops as soon as the last hook has fired, so
    harvesting layers 5, 15 and 25 together costs one pass to layer 25, not three passes.
    """

    def __init__(self, model: Any, sites: list[Site], rows: Any, *, rows_per_chunk: int = 8,
                 drop_special_tokens: bool = True) -> None:
        # `rows`: a `TokenRows`, or anything with its `next_rows(n)` and `describe()`.
        if not sites or len({site.hook_name for site in sites}) != len(sites):
            raise DataSourceError(f"MultiSiteChunks needs distinct sites, got {[s.hook_name for s in sites]}")
        widths = {site.check(model).width(model) for site in sites}
        if len(widths) != 1:
            raise DataSourceError(f"sites {[s.hook_name for s in sites]} have different widths {sorted(widths)}")
        if rows_per_chunk <= 0:
            raise DataSourceError(f"rows_per_chunk must be positive, got {rows_per_chunk}")
        self.model, self.sites, self.rows, self.rows_per_chunk = model, sites, rows, rows_per_chunk
        self.hook_names = [site.hook_name for site in sites]
        self.d_in = widths.pop()
        special = tl_compat.special_token_ids(model) if drop_special_tokens else []
        self.drop_tokens = torch.tensor(special, dtype=torch.long)

    @torch.inference_mode()
    def next_chunks(self) -> dict[str, Float[Tensor, "token d_in"]]:
        tokens = self.rows.next_rows(self.rows_per_chunk)  # (row, pos)
        deepest = max(site.layer for site in self.sites)
        acts = tl_compat.run_to_hooks(self.model, tokens, self.hook_names, deepest)
        keep = ~torch.isin(tokens.reshape(-1), self.drop_tokens) if self.drop_tokens.numel() else None
        out = {}
        for hook, act in acts.items():
            flat = act.reshape(-1, act.shape[-1])
            out[hook] = (flat if keep is None else flat[keep]).float()
        return out

    def describe(self, hook_name: str) -> dict[str, Any]:
        return {"source": "harvest", "model": tl_compat.model_name(self.model), "hook_name": hook_name,
                "harvested_with": self.hook_names, "flags": model_flags(self.model),
                "rows_per_chunk": self.rows_per_chunk, "dropped_tokens": self.drop_tokens.tolist(),
                **self.rows.describe()}
