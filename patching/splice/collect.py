"""Running a corpus through the model to a site and collecting what an SAE (or any function of
the site's activations) reads there, row by row, with the model stopped at the site's block.

Inspection, steering and safety all harvest this way; the SAE is resolved against the model with
the same checks a splice makes.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Any, NamedTuple

import torch
from jaxtyping import Float, Int
from torch import Tensor

from patching.errors import PatchingError
from patching.model import tl_compat
from patching.model.checks import check_token_batch
from patching.model.sites import Site
from patching.model.tokens import right_pad
from patching.splice.splicer import SpliceChecks, resolve_saes
from sae.protocol import SAELike

Corpus = Sequence[str] | Int[Tensor, "_rows _pos"]  # dims unchecked: two corpora may differ


def resolve_site(model: Any, sae: Any, site: Site | None, *, checks: SpliceChecks | None = None) -> tuple[Site, SAELike]:
    """The SAE's site (its recorded hook, or `site`), checked against the model like a splice."""
    ((found, adapted),) = resolve_saes(model, {site: sae} if site is not None else sae,
                                       checks=checks).items()
    return found, adapted


class RowLatents(NamedTuple):
    """One corpus row's latents at the site."""

    row: int
    """Index of the row in the corpus."""
    tokens: Int[Tensor, " pos"]
    """The row's token ids (no padding)."""
    latents: Float[Tensor, "pos n"]
    """Activations of the requested latents (all `d_sae` when none were named)."""
    keep: Tensor
    """Bool `(pos,)`: positions counted (special tokens such as BOS left out when asked)."""


def _token_rows(model: Any, corpus: Corpus) -> list[Tensor]:
    if isinstance(corpus, Tensor):
        if corpus.dim() != 2:
            raise PatchingError(f"a token corpus must be a (batch, pos) integer tensor, got {tuple(corpus.shape)} {corpus.dtype}")
        return [row.long() for row in check_token_batch(corpus, "corpus", tl_compat.d_vocab(model), n_ctx=tl_compat.n_ctx(model))]
    texts = [corpus] if isinstance(corpus, str) else list(corpus)
    if not texts or not all(isinstance(t, str) and t for t in texts):
        raise PatchingError(f"a text corpus must be a non-empty list of non-empty strings, got {corpus!r:.80}")
    if not tl_compat.has_tokenizer(model):
        raise PatchingError("the model has no tokenizer: pass the corpus as a (batch, pos) token tensor")
    return [tl_compat.to_tokens(model, text)[0] for text in texts]


def iter_site_latents(model: Any, sae: SAELike, site: Site, corpus: Corpus, *, latents: Sequence[int] | None = None,
                      batch_rows: int = 8, exclude_special: bool = True) -> Iterator[RowLatents]:
    """Yield each row's latents at `site`, running the model only up to that site."""
    index = None if latents is None else torch.tensor(list(latents), dtype=torch.long)

    def encode(acts: dict[str, Tensor]) -> Tensor:
        z = sae.encode(acts[site.hook_name]).float()  # (rows, pos, d_sae)
        return z if index is None else z[..., index]

    return iter_site_values(model, [site], corpus, encode, batch_rows=batch_rows, exclude_special=exclude_special)


def iter_site_values(model: Any, sites: Sequence[Site], corpus: Corpus, values: Callable[[dict[str, Tensor]], Tensor], *,
                     batch_rows: int = 8, exclude_special: bool = True) -> Iterator[RowLatents]:
    """Yield each row's `values(activations)` (`(rows, pos, n)` from `{hook_name: activation}` at
    `sites`), running the model only up to the last site's block.

    Texts are tokenized one by one (with BOS) and right-padded into batches: under causal
    attention padding on the right cannot change earlier positions, so each row's values equal
    those of the row run alone.
    """
    rows = _token_rows(model, corpus)
    special = torch.tensor(tl_compat.special_token_ids(model) if tl_compat.has_tokenizer(model) else [], dtype=torch.long)
    hooks, layer = [site.hook_name for site in sites], max(site.layer for site in sites)
    for start in range(0, len(rows), batch_rows):
        chunk = rows[start:start + batch_rows]
        batch, _ = right_pad(chunk)
        # Inside the loop, not as a decorator: a generator runs its body after the call returns.
        with torch.inference_mode():
            acts = tl_compat.run_to_hooks(model, batch.to(tl_compat.model_device(model)), hooks, layer)
            out = values(acts).float().cpu()  # (rows, pos, n)
        for i, row in enumerate(chunk):
            keep = ~torch.isin(row, special) if exclude_special else torch.ones(len(row), dtype=torch.bool)
            yield RowLatents(start + i, row, out[i, : len(row)], keep)
