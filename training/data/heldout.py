"""The fixed held-out rows every quality figure of a trained SAE is measured on.

The rows are the first `n_rows` token rows (BOS + `context_size - 1` tokens, packed as for
training) of a corpus's held-out split, which no SAE trains on: the same rows on every machine,
so figures from different runs compare. The trainer's periodic evaluation (`latentpatch train
--eval-every`), `latentpatch eval --heldout-rows` and the release registry (`latentpatch.release.evaluate`)
all run the one evaluator, `patching.splice.evaluate_sae`, on them.
"""

from __future__ import annotations

from typing import Any

from jaxtyping import Int
from torch import Tensor

from training.errors import DataSourceError

HELDOUT_ROWS = 32
"""Held-out rows the trainer's periodic evaluation reads by default (`latentpatch train --eval-rows`);
the release registry reads 160 (`latentpatch.release.EVAL_ROWS`)."""


def heldout_tokens(model: Any, *, corpus: str = "real", n_rows: int = HELDOUT_ROWS,
                   context_size: int = 128) -> Int[Tensor, "row pos"]:
    """The first `n_rows` packed rows of `corpus`'s held-out split."""
    from training.data.mix import corpus_texts
    from training.data.text import TokenRows

    rows = TokenRows(model, corpus_texts(corpus, "heldout"), context_size=context_size,
                     description=f"{corpus} corpus (held-out split)")
    tokens = rows.next_rows(n_rows)
    if rows.epoch:
        raise DataSourceError(f"{corpus} held-out split holds fewer than {n_rows} rows of {context_size} tokens")
    return tokens
