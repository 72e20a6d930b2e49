"""Input validators every entry point shares, kept in the lowest room so that no two rooms carry
their own copy (STYLE.md 15, 17): token batches, latent indices, values that must stay finite in
the model's dtype, and generation settings. Each raises the caller's typed error before any forward
pass, naming the argument, what was expected and what was given.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from patching.errors import PatchingError


def check_context(n_tokens: int, n_ctx: int, name: str, *, error: type[Exception] = PatchingError) -> None:
    """Refuse an input of `n_tokens` positions that does not fit the model's context of `n_ctx`.

    TransformerLens's `to_tokens` cuts a longer text to its first `n_ctx` tokens without a word,
    and a longer token tensor or generation fails deep inside the model (or, with a cache, reads
    positions it never computed); either way the answer would belong to another input. Callers
    that want the cut ask for it (`to_tokens(..., truncate=True)`)."""
    if n_tokens > n_ctx:
        raise error(f"{name} is {n_tokens} tokens but the model's context holds {n_ctx} (n_ctx): shorten it, "
                    f"or tokenize with truncate=True to keep its first {n_ctx} tokens")


def check_token_batch(tokens: Tensor, name: str, vocab: int, *, error: type[Exception] = PatchingError,
                      n_ctx: int | None = None) -> Tensor:
    """A `(batch, pos)` integer tensor with at least one row and one position, ids in `[0, vocab)`,
    and (given `n_ctx`) no more positions than the model's context holds.

    A zero-row or zero-position batch is refused here: it would otherwise fail deep inside a
    reduction (`max()` of nothing) or after a forward pass."""
    if tokens.dim() == 1:
        tokens = tokens[None]
    if tokens.dim() != 2 or tokens.dtype not in (torch.int64, torch.int32):
        raise error(f"{name} tokens must be a (batch, pos) integer tensor, got {tuple(tokens.shape)} {tokens.dtype}")
    if tokens.shape[0] == 0 or tokens.shape[1] == 0:
        raise error(f"{name} tokens need at least one row and one position, got shape {tuple(tokens.shape)}")
    if int(tokens.min()) < 0 or int(tokens.max()) >= vocab:
        raise error(f"{name} tokens must lie in [0, {vocab}), got range [{int(tokens.min())}, {int(tokens.max())}]")
    if n_ctx is not None:
        check_context(tokens.shape[1], n_ctx, f"{name} tokens", error=error)
    return tokens


def check_latent_indices(latents: Any, d_sae: int, *, name: str = "latent indices",
                         error: type[Exception] = PatchingError) -> tuple[int, ...]:
    """Non-empty non-negative ints below `d_sae`; bools, floats (1.9 is not latent 1), strings and
    negative indices refused."""
    ok = isinstance(latents, Sequence) and not isinstance(latents, str)
    items = tuple(latents) if ok else ()
    bad = [i for i in items if isinstance(i, bool) or not _is_int(i) or not 0 <= operator.index(i) < d_sae]
    if not ok or not items or bad:
        raise error(f"{name} must be a non-empty list of ints in 0..{d_sae - 1} (d_sae={d_sae}); got {latents!r:.80}")
    return tuple(operator.index(i) for i in items)


def _is_int(value: Any) -> bool:
    try:
        operator.index(value)
    except TypeError:
        return False
    return True


def check_finite_in(values: Tensor | float, dtype: torch.dtype, name: str, *,
                    error: type[Exception] = PatchingError) -> Tensor:
    """`values` cast to `dtype`, refused unless every element is finite there.

    A Python float such as 1e39 is finite but overflows float32 (and 1e5 overflows float16), so
    the check is made on the value the model will actually add."""
    tensor = torch.as_tensor(values).detach()
    cast = tensor.to(dtype)
    if not torch.isfinite(cast).all():
        wide = tensor.double()
        given = "NaN" if wide.isnan().any() else f"max |value| {wide.abs().max().item():.3g}"
        raise error(f"{name} must be finite in the model's dtype {dtype} (|value| <= {torch.finfo(dtype).max:.3g}); "
                    f"got {given} ({int((~torch.isfinite(cast)).sum())} of {cast.numel()} elements non-finite)")
    return cast


def check_generation(prompts: Any, *, max_new_tokens: Any, temperature: Any, top_p: Any,
                     error: type[Exception] = PatchingError) -> None:
    """Settings of a generation call: prompts non-empty, a positive token count, a positive finite
    temperature and `top_p` in (0, 1]."""
    empty = (isinstance(prompts, Tensor) and (prompts.numel() == 0)) or (
        not isinstance(prompts, (str, Tensor)) and (not isinstance(prompts, Sequence) or len(prompts) == 0))
    if empty or (isinstance(prompts, Sequence) and not isinstance(prompts, str)
                 and not all(isinstance(p, str) for p in prompts)):
        raise error(f"prompts must be a string, a non-empty list of strings or a non-empty token tensor; "
                    f"got {prompts!r:.80}")
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise error(f"max_new_tokens must be a positive int, got {max_new_tokens!r}")
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not (
            math.isfinite(temperature) and temperature > 0):
        raise error(f"temperature must be a positive finite number, got {temperature!r}")
    if top_p is not None and (isinstance(top_p, bool) or not isinstance(top_p, (int, float)) or not 0 < top_p <= 1):
        raise error(f"top_p must be in (0, 1] or None, got {top_p!r}")
