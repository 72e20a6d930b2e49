"""TransformerLens calls for generation and key-value caches: prefix caches and their slices, rows
that join a batch at different layers after a cached prefix, one cached forward step, sampling,
left padding, running every forward pass after a shared prefix (`bound_prefix`), and
TransformerLens's own `generate` (kept for its tests and for models whose
learned positions its cache gets wrong). Part of the model room's TransformerLens door: callers
reach these through `tl_compat`, which re-exports them."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch import Tensor
from torch.utils.hooks import RemovableHandle

from patching.model.tl_bridge import TLModel

from patching.errors import PatchingError
from patching.model import tl_bridge, tl_bridge_decode, tl_bridge_prefix, tl_bridge_rows
from patching.model.checks import check_context
from patching.model.tl_readout import readout


def prefix_cache(model: TLModel, prefix_tokens: Tensor) -> Any:
    """Keys and values of a prompt prefix at every layer, frozen for reuse by many suffix runs
    (one cache row per row of `prefix_tokens`; hooks attached by the caller act on the prefix run).
    On the Bridge, its `BridgeKeysValues` (`tl_bridge_prefix`)."""
    if tl_bridge.is_bridge(model):
        return tl_bridge_prefix.prefix_keys_values(model, prefix_tokens)
    from transformer_lens.cache.key_value_cache import TransformerLensKeyValueCache

    cache = TransformerLensKeyValueCache.init_cache(model.cfg, model.cfg.device, batch_size=prefix_tokens.shape[0])
    mask = torch.ones_like(prefix_tokens)  # no padding: every prefix token is attended
    model(prefix_tokens, past_kv_cache=cache, attention_mask=mask, stop_at_layer=model.cfg.n_layers)
    cache.freeze()
    return cache


def expand_cache(cache: Any, rows: int) -> Any:
    """A frozen view of a batch-1 cache broadcast to `rows` rows (no copy)."""
    if tl_bridge_rows.is_bridge_keys_values(cache):
        return cache.expanded(rows)
    from transformer_lens.cache.key_value_cache import TransformerLensKeyValueCache
    from transformer_lens.cache.key_value_cache_entry import TransformerLensKeyValueCacheEntry

    entries = [TransformerLensKeyValueCacheEntry(e.past_keys.expand(rows, -1, -1, -1), e.past_values.expand(rows, -1, -1, -1),
                                                 frozen=True) for e in cache.entries]
    return TransformerLensKeyValueCache(entries, cache.previous_attention_mask.expand(rows, -1), frozen=True)


def select_cache_rows(cache: Any, index: Tensor) -> Any:
    """A frozen cache whose row i is row `index[i]` of `cache` (a copy: rows may repeat)."""
    if tl_bridge_rows.is_bridge_keys_values(cache):
        return cache.select(index)
    from transformer_lens.cache.key_value_cache import TransformerLensKeyValueCache
    from transformer_lens.cache.key_value_cache_entry import TransformerLensKeyValueCacheEntry

    entries = [TransformerLensKeyValueCacheEntry(e.past_keys[index], e.past_values[index], frozen=True) for e in cache.entries]
    return TransformerLensKeyValueCache(entries, cache.previous_attention_mask[index], frozen=True)


def slice_cache(cache: Any, length: int) -> Any:
    """A frozen view of the first `length` positions of `cache` (no copy). A prompt's keys and
    values before a position depend on nothing after it, so one cache of a whole prompt serves as
    the prefix cache of every position."""
    if tl_bridge_rows.is_bridge_keys_values(cache):
        return cache.sliced(length)
    from transformer_lens.cache.key_value_cache import TransformerLensKeyValueCache
    from transformer_lens.cache.key_value_cache_entry import TransformerLensKeyValueCacheEntry

    entries = [TransformerLensKeyValueCacheEntry(e.past_keys[:, :length], e.past_values[:, :length], frozen=True)
               for e in cache.entries]
    return TransformerLensKeyValueCache(entries, cache.previous_attention_mask[:, :length], frozen=True)


def run_until_end_with_keys_values(model: TLModel, tokens: Tensor,
                                   hook_names: list[str]) -> tuple[Tensor, dict[str, Tensor], Any]:
    """As `run_until_end_with_cache`, and the same forward's frozen key-value cache (what
    `prefix_cache` makes of the whole prompt)."""
    from transformer_lens.cache.key_value_cache import TransformerLensKeyValueCache

    if tl_bridge.is_bridge(model):  # the prompt stands for its keys and values: rows rerun it whole
        return tl_bridge_rows.run_until_end_with_keys_values(model, tokens, hook_names)
    kv = TransformerLensKeyValueCache.init_cache(model.cfg, model.cfg.device, batch_size=tokens.shape[0])
    final, cache = model.run_with_cache(tokens, names_filter=hook_names, stop_at_layer=model.cfg.n_layers,
                                        past_kv_cache=kv, attention_mask=torch.ones_like(tokens))
    kv.freeze()
    return final, {name: cache[name] for name in hook_names}, kv


def run_blocks_joining(model: TLModel, joins: Sequence[tuple[int, Tensor]], past_kv_cache: Any = None) -> Tensor:
    """Run rows that enter at different layers; return every row's residual before the final
    norm, in join order.

    `joins` holds `(layer, residual rows)` in increasing layer order; the rows joining at a layer
    are appended to the batch before that block runs. A row thus pays only for the blocks from its
    own layer on, while rows of many start layers share each block's matrix products (a trace's
    one row per layer would otherwise run as thirty small batches). `past_kv_cache` (frozen, or
    None) holds the positions before the residual's: one row shared by every row, or one row per
    output row. On the Bridge its blocks are driven alike (`tl_bridge_blocks.run_layers`)."""
    if tl_bridge.is_bridge(model):
        return tl_bridge_rows.run_rows_joining(model, joins, past_kv_cache)
    layers = [layer for layer, _ in joins]
    if not layers or layers != sorted(set(layers)):
        raise ValueError(f"joins must come in strictly increasing layer order, got layers {layers}")
    pending = dict(joins)
    residual = pending.pop(layers[0]).contiguous()
    for layer in range(layers[0], model.cfg.n_layers):
        if layer in pending:
            residual = torch.cat([residual, pending.pop(layer)])
        entry = None if past_kv_cache is None else _rows_entry(past_kv_cache.entries[layer], residual.shape[0])
        residual = model.blocks[layer](residual, past_kv_cache_entry=entry)
    return residual


def _rows_entry(entry: Any, rows: int) -> Any:
    """A frozen cache entry for the first `rows` rows (a one-row entry broadcast)."""
    from transformer_lens.cache.key_value_cache_entry import TransformerLensKeyValueCacheEntry

    keys, values = entry.past_keys, entry.past_values
    keys, values = (keys.expand(rows, -1, -1, -1), values.expand(rows, -1, -1, -1)) if keys.shape[0] == 1 else (
        keys[:rows], values[:rows])
    return TransformerLensKeyValueCacheEntry(keys, values, frozen=True)


def cache_before(cache: Any, n_tokens: int, position: int) -> Any:
    """The keys and values before `position` of a prompt of `n_tokens` tokens, from its whole
    cache; None when that is nothing. Whatever the cache holds before the prompt itself (the
    context of an enclosing `bound_prefix`) is kept, so rows run after it as every forward there does.
    On the Bridge the cache is a `BridgeKeysValues`, sliced alike."""
    if tl_bridge_rows.is_bridge_keys_values(cache):
        return tl_bridge_rows.cache_before(cache, n_tokens, position)
    length = cache_length(cache) - n_tokens + position
    return slice_cache(cache, length) if length > 0 else None


@contextlib.contextmanager
def bound_prefix(model: TLModel, prefix_tokens: Tensor) -> Iterator[None]:
    """Inside, every forward pass of `model` runs after `prefix_tokens` (`(1, length)`), whose keys
    and values are computed once on entry: the tokens or residual a caller passes are the positions
    *after* the prefix, and hooks see only those. Several experiments on prompts that share a long
    context (a few-shot chat preamble) then pay for the context once instead of on every forward
    and backward pass.

    A call that brings its own empty cache (`prefix_cache`, `new_kv_cache`) has it filled with the
    prefix first; a call with a non-empty cache (made inside, so already holding the prefix) runs
    as given. The prefix cache is built without inference mode, so gradients flow through
    the positions after it (they cannot reach the prefix, which no caller's input changes)."""
    if prefix_tokens.dim() not in (1, 2) or (prefix_tokens.dim() == 2 and prefix_tokens.shape[0] != 1) \
            or prefix_tokens.numel() == 0 or prefix_tokens.is_floating_point():
        raise PatchingError(f"bound_prefix needs one row of token ids, (1, length) or (length,), got "
                            f"{prefix_tokens.dtype} {tuple(prefix_tokens.shape)}")
    check_context(prefix_tokens.shape[-1], model.cfg.n_ctx, "the bound prefix")
    if tl_bridge.is_bridge(model):
        with tl_bridge_prefix.bound_prefix(model, prefix_tokens):
            yield
        return
    with torch.no_grad():
        cache = prefix_cache(model, prefix_tokens.reshape(1, -1))
    plain = model.__dict__.get("forward")  # an enclosing binding's, or None for the class's own
    inner = plain if plain is not None else type(model).forward.__get__(model)

    def forward(*args: Any, **kwargs: Any) -> Any:
        inputs = args[0] if args else kwargs["input"]
        rows = inputs.shape[0]
        past = kwargs.get("past_kv_cache")
        if past is None:
            kwargs["past_kv_cache"] = expand_cache(cache, rows)
            if not inputs.is_floating_point() and kwargs.get("attention_mask") is None:
                kwargs["attention_mask"] = torch.ones_like(inputs)
        elif cache_length(past) == 0:
            for entry, source in zip(past.entries, cache.entries, strict=True):
                entry.past_keys = source.past_keys.expand(rows, -1, -1, -1).clone()
                entry.past_values = source.past_values.expand(rows, -1, -1, -1).clone()
            mask = kwargs.get("attention_mask")
            past.previous_attention_mask = cache.previous_attention_mask.expand(rows, -1).clone().to(
                past.previous_attention_mask.dtype if mask is None else mask.dtype)
        held = cache_length(kwargs["past_kv_cache"])
        check_context(held + inputs.shape[1], model.cfg.n_ctx, f"a run after the bound prefix and cache ({held} "
                      f"positions) of {inputs.shape[1]} more positions")
        return inner(*args, **kwargs)

    model.forward = forward  # type: ignore[method-assign]
    try:
        yield
    finally:
        if plain is None:
            del model.forward
        else:
            model.forward = plain  # type: ignore[method-assign]


def attach_block_pre_hook(model: TLModel, layer: int, fn: Callable[[int, int], None]) -> RemovableHandle:
    """Call `fn(n_positions, past_positions)` before block `layer` runs.

    `past_positions` is the length of the block's key-value cache entry (0 without a cache):
    under `generate` with the cache each step feeds only the new positions, so this offset is
    what turns call-relative positions into absolute ones. Blocks are called as modules even by
    `generate` (which calls `forward` directly), so the hook fires on every path.
    """

    bridge = tl_bridge.is_bridge(model)

    def pre_hook(module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        entry = kwargs.get("past_kv_cache_entry")
        past = tl_bridge_decode.decoding_past(model) if bridge else 0 if entry is None else int(entry.past_keys.shape[1])
        residual = args[0] if args else kwargs["hidden_states"]
        fn(int(residual.shape[1]), past)

    return model.blocks[layer].register_forward_pre_hook(pre_hook, with_kwargs=True)


def generate(model: TLModel, inputs: Tensor | str | list[str], *, max_new_tokens: int, use_past_kv_cache: bool = True,
             do_sample: bool = False, temperature: float = 1.0, top_p: float | None = None,
             stop_at_eos: bool = False) -> Tensor:
    """Token ids of prompt + continuation, `(batch, pos + new)`.

    A string or a list of strings is tokenized with BOS (a list is left-padded and TransformerLens
    masks the padding); a tensor is used as given. `stop_at_eos=False` gives every row exactly
    `max_new_tokens` new tokens. `generate` runs under inference mode; the clone is an ordinary
    tensor that later forward passes with autograd can take.

    Models with learned absolute positions run without the cache whatever `use_past_kv_cache`
    says: TransformerLens 3.9's cached loop embeds the whole sequence at offset = cache length
    and keeps the last row, so (measured on a tokenizer-less model, where it passes no attention
    mask) each new token at position p after the first gets W_pos[2p], and past n_ctx / 2 the
    slice runs out. Uncached is slower, never wrong.
    """
    if isinstance(inputs, Tensor):
        check_context(inputs.shape[-1] + max_new_tokens, model.cfg.n_ctx, f"the prompt ({inputs.shape[-1]} tokens) plus "
                      f"max_new_tokens={max_new_tokens}")
    else:
        left_padded_tokens(model, inputs, max_new_tokens=max_new_tokens)  # refuses what cannot fit; TL tokenizes again
    if model.cfg.positional_embedding_type in ("standard", "shortformer"):
        use_past_kv_cache = False
    # TransformerLens's generate calls `self.eval()` and never restores the mode (R5): put back every
    # module's `training` flag, however generation ends.
    modes = [(module, module.training) for module in model.modules()]
    try:
        tokens = model.generate(inputs, max_new_tokens=max_new_tokens, use_past_kv_cache=use_past_kv_cache,
                                do_sample=do_sample, temperature=temperature, top_p=top_p, stop_at_eos=stop_at_eos,
                                return_type="tokens", verbose=False)
    finally:
        for module, training in modes:
            module.training = training
    return tokens.clone()


def new_kv_cache(model: TLModel, rows: int, prefix: Any = None) -> Any:
    """An empty, growing key-value cache for `rows` rows; with `prefix` (a frozen batch-1 cache
    from `prefix_cache`), a growing copy of it broadcast to `rows` rows. Inside `bound_prefix` it
    holds the bound prefix before anything else on both backends (the hooked binding fills an empty
    cache on the first forward; the Bridge's starts from it)."""
    from transformer_lens.cache.key_value_cache import TransformerLensKeyValueCache
    from transformer_lens.cache.key_value_cache_entry import TransformerLensKeyValueCacheEntry

    if tl_bridge.is_bridge(model):  # a transformers cache carried through the Bridge's blocks (a bound prefix's first)
        return tl_bridge_decode.new_decoding_cache(model, rows, prefix)
    if prefix is None:
        return TransformerLensKeyValueCache.init_cache(model.cfg, model.cfg.device, batch_size=rows)
    entries = [TransformerLensKeyValueCacheEntry(e.past_keys.expand(rows, -1, -1, -1).clone(),
                                                 e.past_values.expand(rows, -1, -1, -1).clone(), frozen=False)
               for e in prefix.entries]
    return TransformerLensKeyValueCache(entries, prefix.previous_attention_mask.expand(rows, -1).clone(), frozen=False)


def cache_length(cache: Any) -> int:
    """Positions a key-value cache holds."""
    if tl_bridge_rows.is_bridge_keys_values(cache) or isinstance(cache, tl_bridge_decode.BridgeDecodingCache):
        return cache.length
    return int(cache.previous_attention_mask.shape[1])


def forward_step(model: TLModel, tokens: Tensor, attention_mask: Tensor, cache: Any = None, *,
                 last_only: bool = False) -> Tensor:
    """Logits of `tokens` (the positions after what `cache` holds, or a whole sequence without a
    cache); `attention_mask` covers exactly `tokens` (0 marks left padding). `last_only`: only the
    last position's, `(batch, 1, vocab)`, so that a prompt pass does not unembed every position
    (the unembedding is a fifth of the default model's multiply-adds per token). On the Bridge the
    cache is `new_kv_cache`'s `BridgeDecodingCache` (`tl_bridge_decode`)."""
    if tl_bridge.is_bridge(model):
        if cache is not None:
            return tl_bridge_decode.forward_step(model, tokens, attention_mask, cache, last_only=last_only)
        return tl_bridge_rows.forward_step(model, tokens, attention_mask, last_only=last_only)
    if not last_only:
        return model(tokens, return_type="logits", attention_mask=attention_mask, past_kv_cache=cache)
    final = model(tokens, attention_mask=attention_mask, past_kv_cache=cache, stop_at_layer=model.cfg.n_layers)

    return readout(model, final[:, -1:])


def sample_logits(logits: Tensor, *, temperature: float, top_p: float | None,
                  generator: torch.Generator | None = None) -> Tensor:
    """TransformerLens's sampler (temperature, nucleus) on last-position logits, `(batch,)`, drawing
    from `generator` (None: torch's global RNG).

    The filtering is `transformer_lens.utilities.sample_logits`'s, step for step; only the draw
    differs, because its `Categorical(...).sample()` takes no generator: `torch.multinomial` over
    the same probabilities with replacement is what that `sample()` runs, so under the same seed
    both draw the same tokens (tests/test_generate.py, tests/test_caller_state.py)."""
    logits = logits / temperature
    if top_p is not None:
        ordered, order = torch.sort(logits, descending=True)
        drop = ordered.softmax(dim=-1).cumsum(dim=-1) > top_p
        drop[..., 1:] = drop[..., :-1].clone()  # keep the token that crosses top_p
        drop[..., 0] = False
        logits = logits.masked_fill(drop.scatter(-1, order, drop), -float("inf"))
    probs = torch.distributions.Categorical(logits=logits.to(torch.float32)).probs
    return torch.multinomial(probs.reshape(-1, probs.shape[-1]), 1, True, generator=generator)[:, 0]


def seeded_generator(model: TLModel, seed: int) -> torch.Generator:
    """A `torch.Generator` on the model's device seeded with `seed`: sampling with it reproduces
    without reseeding torch's global RNG, whose stream belongs to the caller (STYLE.md rule 20)."""
    return torch.Generator(device=next(model.parameters()).device).manual_seed(seed)


def left_padded_tokens(model: TLModel, prompts: str | list[str] | Tensor, *,
                       max_new_tokens: int = 0) -> tuple[Tensor, Tensor | None]:
    """Token ids for generation and the mask of real tokens (None: no padding).

    A string is tokenized with BOS; a list of strings is left-padded, so that every row's last
    position is real, as TransformerLens's `generate` does; a tensor is used as given. Prompts
    are never cut: one whose tokens plus `max_new_tokens` exceed the context is refused."""
    if isinstance(prompts, Tensor):
        return prompts, None
    single = isinstance(prompts, str) or len(prompts) == 1
    tokens = model.to_tokens(prompts, prepend_bos=True, truncate=False, **({} if single else {"padding_side": "left"}))
    check_context(tokens.shape[-1] + max_new_tokens, model.cfg.n_ctx,
                  f"the prompt ({tokens.shape[-1]} tokens{', the longest of the list' if not single else ''}) "
                  f"plus max_new_tokens={max_new_tokens}")
    if single:
        return tokens, None
    from transformer_lens.utilities import get_attention_mask

    side = model.tokenizer.padding_side
    model.tokenizer.padding_side = "left"  # get_attention_mask scans for pads on the tokenizer's side
    try:
        mask = get_attention_mask(model.tokenizer, tokens, True)
    finally:
        model.tokenizer.padding_side = side
    return tokens, mask
