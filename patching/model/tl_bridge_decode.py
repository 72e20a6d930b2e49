"""KV-cached decoding on the Bridge: the decoding loop's `new_kv_cache` and `forward_step` with a
cache, so that a generated token costs one position's forward instead of the whole sequence's, and
generation after a `SharedPrefix` runs the prefix once and never intervenes on it.

Hugging Face's model keeps a `transformers` cache (`DynamicCache`) for its own decoding: it builds
the causal mask (sliding windows included) and the position ids of the new positions from what the
cache holds, then hands the cache to every decoder layer. transformers 5 hands it as `cache=`,
which the Bridge's reimplemented attention ignores (it asks `past_key_values` or `layer_past` to
`update` its keys): the same cache object is therefore also handed to every block's attention as
`past_key_values` (`tl_bridge_blocks.attention_caches`), so the attention appends the new keys and
values and attends over all of them, while the Bridge's forward runs as usual and every hook point
fires on the new positions' tensors. A block pre-hook reads the positions already held from
`decoding_past` (`tl_generation.attach_block_pre_hook`), so interventions edit the same absolute
positions with and without the cache.

Inside `bound_prefix` the cache starts from the bound prefix's keys and values (a `SharedPrefix`
made there already holds them), and each step runs the Bridge's own forward with that cache, not
the binding's (`tl_bridge_prefix`), which would rerun every position after the prefix: the cache
is the prefix. Part of the TransformerLens door: `tl_generation` dispatches here for a Bridge model.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from patching.model.tl_bridge import BackendUnsupportedError
from patching.model.tl_bridge_blocks import AttentionCaches, BridgeKeysValues, active_caches, attention_caches, bound_keys_values
from patching.model.tl_bridge_rows import run_to_final
from patching.model.tl_readout import readout

PAST = "_latentpatch_decoding_past"
"""Where a Bridge keeps the positions its decoding cache held before the forward now running."""


@dataclass
class BridgeDecodingCache:
    """One batch's growing key-value cache on the Bridge: a `transformers` cache that the Bridge's
    attention appends to, and the attention mask of every position it holds (0: left padding),
    which the next step's mask extends. Mutable: each `forward_step` grows both."""

    cache: Any
    """The `transformers` `DynamicCache` (per-layer keys and values after rotation)."""
    mask: Tensor
    """`(rows, positions held)`, the attention mask of the positions the cache holds."""

    @property
    def length(self) -> int:
        return int(self.mask.shape[1])


def new_decoding_cache(model: Any, rows: int, prefix: BridgeKeysValues | None = None) -> BridgeDecodingCache:
    """An empty cache for `rows` rows or, with `prefix` (one row's keys and values, `SharedPrefix`),
    a growing copy of it broadcast to `rows` rows (the prefix's tokens are all attended). Inside
    `bound_prefix` a cache without `prefix` starts from the bound prefix's keys and values (a
    `SharedPrefix` made inside holds them already, before its own), as the hooked backend's binding
    fills an empty cache with them."""
    from transformers import DynamicCache

    prefix = bound_keys_values(model) if prefix is None else prefix
    cache = DynamicCache(config=model.original_model.config)
    device = next(model.parameters()).device
    length = 0 if prefix is None else prefix.length
    if prefix is not None:
        for layer, (keys, values) in enumerate(zip(prefix.keys, prefix.values, strict=True)):
            cache.update(keys.expand(rows, -1, -1, -1).clone(), values.expand(rows, -1, -1, -1).clone(), layer)
    return BridgeDecodingCache(cache, torch.ones(rows, length, dtype=torch.long, device=device))


def decoding_past(model: Any) -> int:
    """Positions before the first one the running forward runs: what a cached decoding step's cache
    held before it; outside one, the keys and values the blocks run after (a bound prefix's, a sweep
    row's prefix); else 0. The hooked backend reads the same off its cache entry."""
    if PAST in model.__dict__:
        return int(model.__dict__[PAST])
    caches = active_caches(model)
    return caches.past.length if isinstance(caches, AttentionCaches) and caches.past is not None else 0


@contextlib.contextmanager
def _decoding_step(model: Any, past: int) -> Iterator[None]:
    """Record `past` for the step's block pre-hooks and, inside `bound_prefix`, set the binding's
    forward aside (the Bridge's own forward runs after the cache, which holds the bound prefix)."""
    bound = model.__dict__.pop("forward", None)
    model.__dict__[PAST] = past
    try:
        yield
    finally:
        model.__dict__.pop(PAST, None)
        if bound is not None:
            model.__dict__["forward"] = bound


def _cache_keyword(model: Any) -> str:
    """The name under which the wrapped Hugging Face model takes its cache: `cache` in transformers 5
    (which still maps `past_key_values` onto it), `past_key_values` before."""
    parameters = inspect.signature(model.original_model.forward).parameters
    return "cache" if "cache" in parameters else "past_key_values"


def forward_step(model: Any, tokens: Tensor, attention_mask: Tensor, cache: BridgeDecodingCache, *,
                 last_only: bool) -> Tensor:
    """Logits of `tokens`, the positions after what `cache` holds (`attention_mask` covers exactly
    them), the cache grown by them. The Bridge's forward gets the mask of every position (so left
    padding shifts the positions as in an uncached run) and Hugging Face's model the cache, which
    its attention also gets as `past_key_values`; the run stops after the last block, and only
    the last position is unembedded with `last_only`."""
    if bound_keys_values(model) is not None and not bool(attention_mask.bool().all()):
        raise BackendUnsupportedError("a padded batch after a bound prefix on the bridge backend (left padding "
                                      "needs its own positions); run the rows one at a time or use backend='hooked'")
    mask = torch.cat([cache.mask, attention_mask.to(cache.mask.dtype)], dim=1)
    with attention_caches(model, cache.cache), _decoding_step(model, cache.length):
        final, _ = run_to_final(model, tokens, [], attention_mask=mask,
                                forward_kwargs={_cache_keyword(model): cache.cache, "use_cache": True})
    cache.mask = mask
    return readout(model, final[:, -1:] if last_only else final)
