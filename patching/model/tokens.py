"""Tokenising texts into batches: right padding with the mask of real tokens, and long texts in
bounded windows.

Under causal attention, padding on the right cannot change the earlier, real positions, so a
right-padded batch gives every row the values it would have alone; the mask keeps the padding out
of every statistic.

A fast tokenizer handed one long text holds every token's offsets and pre-tokens at once: a 20 MB
line cost 4 GB (issue 30, item 10). Long texts are therefore handed over in windows of at most
`WINDOW_CHARS` characters, cut just before a space that follows a non-space. A byte-level BPE
with GPT-2's pre-tokenizer (GPT-2, SmolLM2, Llama 3) never joins such a pair into one pre-token,
so the windows' tokens, concatenated, are the whole text's tokens exactly; a window with no such
space (a 64K-character "word") is cut where it ends, and only the tokens at that cut may differ.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from jaxtyping import Bool, Int
from torch import Tensor

from patching.model import tl_compat

WINDOW_CHARS = 1 << 16
"""Most characters handed to the tokenizer in one call (64K: a few MB of tokenizer memory)."""
_WORD_END = re.compile(r"\S(?= )")
"""A non-space followed by a space: the pre-token boundary windows are cut at."""


def right_pad(rows: Sequence[Int[Tensor, " _pos"]]) -> tuple[Int[Tensor, "batch pos"], Bool[Tensor, "batch pos"]]:
    """Token rows right-padded to the longest, and the mask of real tokens. The padding repeats
    each row's last token (any id would do: causal attention keeps it out of real positions, and
    the mask keeps it out of every statistic). The one padding helper of the package."""
    length = max(row.shape[0] for row in rows)
    tokens = torch.stack([torch.cat([row, row[-1:].expand(length - row.shape[0])]) for row in rows])
    mask = torch.arange(length)[None, :] < torch.tensor([row.shape[0] for row in rows])[:, None]
    return tokens, mask


def padded_tokens(model: Any, texts: list[str], *, truncate: bool = False) -> tuple[Int[Tensor, "batch pos"], Bool[Tensor, "batch pos"]]:
    """Texts tokenized one by one (BOS prepended as the model does), right-padded to the longest
    (`right_pad`), and the mask of real tokens. A text longer than the model's context is refused
    (`tl_compat.to_tokens`) unless `truncate` asks to keep its first `n_ctx` tokens."""
    return right_pad([tl_compat.to_tokens(model, text, truncate=truncate)[0] for text in texts])


def text_windows(text: str, window_chars: int | None = None) -> Iterator[str]:
    """`text` in consecutive pieces of at most `window_chars` (default `WINDOW_CHARS`) characters,
    each cut just before the window's last space that follows a non-space (where it has one)."""
    window_chars = WINDOW_CHARS if window_chars is None else window_chars
    start = 0
    while len(text) - start > window_chars:
        stop = start + window_chars
        ends = [m.start() for m in _WORD_END.finditer(text, start, stop)]
        cut = ends[-1] + 1 if ends else stop
        yield text[start:cut]
        start = cut
    if start < len(text):
        yield text[start:]


def encode_windows(model: Any, text: str, window_chars: int | None = None) -> Iterator[list[int]]:
    """The token ids of `text` (no BOS), one list per window (`text_windows`): bounded memory for any length."""
    for piece in text_windows(text, window_chars):
        yield tl_compat.encode_text(model, piece)


def leading_text(model: Any, text: str, n_tokens: int) -> str:
    """A prefix of `text`, cut where `text_windows` cuts, whose tokens are the whole text's first
    `n_tokens` or more (the whole text when it has fewer): what a caller that keeps only the first
    `n_tokens` tokens needs to tokenize. The prefix doubles until it holds enough tokens, so the
    tokenizer never sees more than about twice the characters it needs."""
    chars = 8 * n_tokens + 64
    while chars < len(text):
        head = next(text_windows(text, chars))
        if len(tl_compat.encode_text(model, head)) >= n_tokens:
            return head
        chars *= 2
    return text
