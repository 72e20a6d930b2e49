"""Quality of trained SAEs on held-out real text: `splice_metrics` over fixed held-out rows.

The rows are the first `n_rows` token rows (BOS + `context_size - 1` tokens, packed as for
training) of a corpus's held-out split, which no SAE trains on: the same rows on every machine,
so figures from different runs compare. `splice_metrics` runs one small batch at a time (its
full-vocabulary logits are large); the batch figures are combined by token count: cross-entropies
are averaged and CE loss recovered is recomputed from the averages; KL, explained variance, MSE
and L0 are token-weighted means of the batches' values (explained variance about each batch's
mean, which is at most the figure about the global mean).
"""

from __future__ import annotations

from typing import Any

import torch
from jaxtyping import Int
from torch import Tensor

from training.errors import DataSourceError


def heldout_tokens(model: Any, *, corpus: str = "real", n_rows: int = 32,
                   context_size: int = 128) -> Int[Tensor, "row pos"]:
    """The first `n_rows` packed rows of `corpus`'s held-out split."""
    from training.mix import corpus_texts
    from training.text import TokenRows

    rows = TokenRows(model, corpus_texts(corpus, "heldout"), context_size=context_size,
                     description=f"{corpus} corpus (held-out split)")
    tokens = rows.next_rows(n_rows)
    if rows.epoch:
        raise DataSourceError(f"{corpus} held-out split holds fewer than {n_rows} rows of {context_size} tokens")
    return tokens


def evaluate_heldout(model: Any, sae: Any, tokens: Int[Tensor, "row pos"], *,
                     batch_rows: int = 4) -> dict[str, float]:
    """`splice_metrics` of `sae` on `tokens`, `batch_rows` rows at a time, combined (module docstring)."""
    from patching.splice.quality import ce_loss_recovered, splice_metrics

    if batch_rows <= 0:
        raise DataSourceError(f"batch_rows must be positive, got {batch_rows}")
    parts = [splice_metrics(model, sae, tokens[start : start + batch_rows])
             for start in range(0, tokens.shape[0], batch_rows)]
    n = sum(p.n_tokens for p in parts)
    weighted = {key: sum(getattr(p, key) * p.n_tokens for p in parts) / n
                for key in ("kl_spliced", "explained_variance", "mse", "l0")}
    ces = {key: sum(getattr(p, key) * p.n_tokens for p in parts) / n
           for key in ("ce_clean", "ce_spliced", "ce_ablated")}
    return {**ces, "ce_loss_recovered": ce_loss_recovered(ces["ce_clean"], ces["ce_spliced"], ces["ce_ablated"]),
            **weighted, "n_tokens": n}


@torch.inference_mode()
def dead_fraction(sae: Any, activations: Tensor, *, batch: int = 4096) -> float:
    """Fraction of latents that never fire on `activations` (held-out activations at the SAE's site)."""
    fired = None
    for start in range(0, activations.shape[0], batch):
        z = sae.encode(activations[start : start + batch])
        hit = (z > 0).any(0)
        fired = hit if fired is None else fired | hit
    return 1.0 - fired.float().mean().item() if fired is not None else float("nan")
