"""Which tokens the evaluator (`patching.splice.evaluation.evaluate_sae`) reads and which it scores.

It reads token rows as given (with a mask of the real tokens of right-padded rows) or texts,
tokenized with BOS, truncated and right-padded. It scores, as SAELens's evaluation does, the real
tokens whose ids are not the tokenizer's structural special ids (`get_special_token_ids` in
sae_lens/util.py: BOS, EOS, PAD, SEP and decoder-start; not chat-template tokens), wherever they sit.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Iterator
from typing import Any

import torch
from jaxtyping import Bool, Int
from torch import Tensor

from patching.model import tl_compat
from patching.model.tokens import leading_text, padded_tokens

STRUCTURAL_SPECIAL_TOKENS = ("bos_token_id", "eos_token_id", "pad_token_id", "sep_token_id", "decoder_start_token_id")
"""The tokenizer attributes SAELens's `get_special_token_ids` reads (sae_lens/util.py)."""


def ignored_token_ids(model: Any, ignore_tokens: tuple[int, ...] | None) -> tuple[int, ...]:
    """`ignore_tokens` when given, else the tokenizer's structural special ids (SAELens's rule;
    none for a model without a tokenizer)."""
    if ignore_tokens is not None:
        return tuple(ignore_tokens)
    tokenizer = tl_compat.tokenizer(model)
    found = {getattr(tokenizer, name, None) for name in STRUCTURAL_SPECIAL_TOKENS} if tokenizer is not None else set()
    return tuple(sorted(i for i in found if i is not None))


def check_right_padding(tokens: Tensor, mask: Tensor | None) -> None:
    """`mask` (real tokens of right-padded rows) must be a bool tensor of the tokens' shape that
    marks a non-empty prefix of each row."""
    if mask is not None and (mask.shape != tokens.shape or mask.dtype != torch.bool or not mask[:, 0].all()
                             or (mask[:, 1:] & ~mask[:, :-1]).any()):
        raise ValueError(f"mask must be a bool tensor of the tokens' shape {tuple(tokens.shape)} marking a "
                         "non-empty prefix of each row (right padding)")


def token_batches(model: Any, corpus: Iterable[str] | Int[Tensor, "rows pos"], *, batch_size: int, context_size: int,
                  mask: Bool[Tensor, "rows pos"] | None = None) -> Iterator[tuple[Tensor, Bool[Tensor, "batch pos"]]]:
    """Batches of (tokens, real-token mask): token rows as given (with `mask`, right-padded rows
    whose padding is not real), or texts tokenized with BOS, truncated to `context_size` and
    right-padded."""
    if isinstance(corpus, Tensor):
        if corpus.ndim != 2 or corpus.is_floating_point() or corpus.shape[1] < 2:
            raise ValueError(f"a token corpus must be an integer tensor (rows, pos >= 2); got {corpus.dtype} "
                             f"{tuple(corpus.shape)}")
        check_right_padding(corpus, mask)
        real = torch.ones_like(corpus, dtype=torch.bool) if mask is None else mask
        for start in range(0, corpus.shape[0], batch_size):
            rows = slice(start, start + batch_size)
            yield corpus[rows, :context_size], real[rows, :context_size].to(corpus.device)
        return
    if mask is not None:
        raise TypeError("mask marks the real tokens of a token tensor; texts are padded here")
    if isinstance(corpus, str):
        raise TypeError("corpus must be an iterable of texts or a token tensor, not one string; wrap it in a list")
    texts = iter(corpus)
    while batch := list(itertools.islice(texts, batch_size)):
        if not all(isinstance(text, str) and text for text in batch):
            raise ValueError("every text in the corpus must be a non-empty string")
        # Only each text's first context_size tokens are read: tokenize no more of it (a 20 MB line
        # tokenized whole cost 4 GB); cut to context_size below: the cut is asked for.
        heads = [leading_text(model, text, context_size) for text in batch]
        tokens, real = padded_tokens(model, heads, truncate=True)
        yield tokens[:, :context_size], real[:, :context_size]
