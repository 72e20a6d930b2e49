"""Tokenising texts into batches: right padding with the mask of real tokens.

Under causal attention, padding on the right cannot change the earlier, real positions, so a
right-padded batch gives every row the values it would have alone; the mask keeps the padding out
of every statistic.
"""

from __future__ import annotations

from typing import Any

import torch
from jaxtyping import Bool, Int
from torch import Tensor

from patching.model import tl_compat


def padded_tokens(model: Any, texts: list[str]) -> tuple[Int[Tensor, "batch pos"], Bool[Tensor, "batch pos"]]:
    """Texts tokenized one by one (BOS prepended as the model does), right-padded to the longest,
    and the mask of real tokens; the padding repeats each row's last token and is never scored."""
    rows = [tl_compat.to_tokens(model, text)[0] for text in texts]
    length = max(row.shape[0] for row in rows)
    tokens = torch.stack([torch.cat([row, row[-1:].expand(length - row.shape[0])]) for row in rows])
    mask = torch.arange(length)[None, :] < torch.tensor([row.shape[0] for row in rows])[:, None]
    return tokens, mask
