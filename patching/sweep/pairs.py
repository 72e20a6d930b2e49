"""Prompt pairs for patching: tokenisation, validation and position alignment.

A pair is a clean prompt (shows the behaviour) and a corrupted one (does not). Patching moves
activations between them position by position, so their token lengths must match unless the
caller names an alignment: `align="end"` pairs the final positions, a dict maps base-run
positions to source-run positions explicitly.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal, Union

import torch
from torch import Tensor

from patching.model import tl_compat
from patching.model.checks import check_token_batch
from patching.errors import PatchingError

Direction = Literal["denoise", "noise"]
Align = Union[None, Literal["end"], Mapping[int, int]]
Prompts = Union[str, Sequence[str], Tensor]


@dataclass(frozen=True)
class PromptPair:
    """One clean/corrupted pair, oriented for a direction: patches go from source into base."""

    base: Tensor
    """Tokens of the run that is patched, (1, pos_base): corrupted for denoise, clean for noise."""
    source: Tensor
    """Tokens of the run patched values come from, (1, pos_source)."""
    source_position: Tensor
    """For each base position, the source position aligned with it, or -1 where none is."""

    @property
    def n_base(self) -> int:
        return self.base.shape[1]

    @property
    def mapped(self) -> Tensor:
        """(pos_base,) bool: base positions that have an aligned source position."""
        return self.source_position >= 0

    def source_minus_base(self, source: Tensor, base: Tensor) -> Tensor:
        """`source[aligned] - base` per base position, `(pos_base, ...)`; zero where no source
        position is aligned. The one way every module lines the two runs up."""
        aligned = source[self.source_position.clamp(min=0)]
        mapped = self.mapped.reshape(-1, *([1] * (base.dim() - 1)))
        return torch.where(mapped, aligned - base, torch.zeros((), dtype=base.dtype))


def tokenize(model: Any, prompts: Prompts, name: str) -> list[Tensor]:
    """Token rows, one per prompt; strings get the model's BOS."""
    if isinstance(prompts, str):
        prompts = [prompts]
    if isinstance(prompts, Tensor):
        return [row[None].long() for row in check_token_batch(prompts, name, tl_compat.d_vocab(model),
                                                                n_ctx=tl_compat.n_ctx(model))]
    if not isinstance(prompts, Sequence) or not prompts or not all(isinstance(p, str) for p in prompts):
        raise PatchingError(f"{name} must be a string, a non-empty list of strings or a token tensor")
    return [tl_compat.to_tokens(model, text) for text in prompts]


def make_pairs(model: Any, clean: Prompts, corrupted: Prompts, *, direction: str, align: Align) -> list[PromptPair]:
    """Validate and orient the pairs; raise `PatchingError` before any forward pass."""
    if direction not in ("denoise", "noise"):
        raise PatchingError(f"direction must be 'denoise' or 'noise', got {direction!r}")
    clean_rows, corrupted_rows = tokenize(model, clean, "clean"), tokenize(model, corrupted, "corrupted")
    if len(clean_rows) != len(corrupted_rows):
        raise PatchingError(
            f"{len(clean_rows)} clean prompts but {len(corrupted_rows)} corrupted ones: pairs must match one to one "
            "(no broadcasting)"
        )
    pairs = []
    for i, (c, r) in enumerate(zip(clean_rows, corrupted_rows)):
        base, source = (r, c) if direction == "denoise" else (c, r)
        if align is None and c.shape[1] != r.shape[1]:
            raise PatchingError(
                f"pair {i}: prompts of different token lengths (clean has {c.shape[1]} tokens, corrupted {r.shape[1]}); "
                "make them equal, or pass align='end' or an explicit {base_position: source_position} map"
            )
        pairs.append(PromptPair(base, source, _alignment(i, base.shape[1], source.shape[1], align)))
    return pairs


def _alignment(i: int, n_base: int, n_source: int, align: Align) -> Tensor:
    if align is None:
        return torch.arange(n_base)
    if align == "end":
        offset = n_source - n_base
        positions = torch.arange(n_base) + offset
        return torch.where(positions >= 0, positions, torch.full_like(positions, -1))
    if isinstance(align, Mapping):
        out = torch.full((n_base,), -1, dtype=torch.long)
        for b, s in align.items():
            if not (isinstance(b, int) and isinstance(s, int) and 0 <= b < n_base and 0 <= s < n_source):
                raise PatchingError(f"pair {i}: align entry {b!r}: {s!r} out of range (base length {n_base}, source length {n_source})")
            out[b] = s
        return out
    raise PatchingError(f"align must be None, 'end' or a dict of positions, got {align!r}")


def check_positions(pairs: list[PromptPair], positions: Sequence[int] | None) -> tuple[int, ...] | None:
    """Base-run positions to consider; every one must exist in every pair (no negatives)."""
    if positions is None:
        return None
    items = tuple(positions) if not isinstance(positions, int) else (positions,)
    shortest = min(pair.n_base for pair in pairs)
    if not items or any(isinstance(p, bool) or not isinstance(p, int) or not 0 <= p < shortest for p in items):
        raise PatchingError(f"positions must be ints in [0, {shortest}) (the shortest base prompt), got {positions!r}")
    return tuple(sorted(set(items)))
