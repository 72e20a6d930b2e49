"""Tokenising texts into batches: right padding with the mask of real tokens.

Under causal attention, padding on the right cannot change the earlier, real positions, so a
right-padded batch gives every row the values it would have alone; the mask keeps the padding out
of every statistic.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from jaxtyping import Bool, Int
from torch import Tensor

from patching.model import tl_compat


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
