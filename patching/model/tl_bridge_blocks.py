"""Running the Bridge's blocks from a layer, after a prefix's keys and values: the sweep engine's two
shortcuts (`start_at_layer`, key/value prefixes) built for TransformerBridge, which has neither
(Hugging Face's model owns the layer loop, and the Bridge's reimplemented attention ignores the
`cache=` that transformers 5 hands its layers).

The Bridge's blocks (`BlockBridge`, each wrapping one Hugging Face decoder layer) are called here one
after another, as Hugging Face's loop calls them, so every hook point inside them fires on the same
tensors as in a full forward pass. What a layer needs besides the residual stream is what Hugging
Face's model computes once before its loop: the rotary position embeddings (per layer type where
the model has several, Gemma 3), the causal mask (per layer type: sliding windows), the position
ids. `layer_arguments` takes them from the model itself: it runs the Hugging Face base model on a
zero embedding of the whole length with every decoder layer's `forward` replaced by a recorder, and
slices what each layer was handed to the positions the rows hold (a causal mask's rows and columns,
the positions of the rest), so no architecture's conventions are rewritten here.

Keys and values: the Bridge's attention asks its `past_key_values` keyword (or `layer_past`) to
`update(keys, values, layer_idx)` once the keys are rotated, and attends over what it returns. A
pre-hook on every block's attention hands it an `AttentionCaches`, which records the keys and values of a
base run (`BridgeKeysValues`) or puts a prefix's before the new positions'. Part of the
TransformerLens door: `tl_bridge_rows`, `tl_generation` and `tl_compat` dispatch here.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from patching.model.tl_bridge import BackendUnsupportedError

CACHE_ARGUMENTS = ("cache", "past_key_values", "past_key_value", "layer_past")
"""The names under which Hugging Face layers take a key-value cache: always handed None here (the
keys and values reach the attention through `AttentionCaches`)."""


@dataclass(frozen=True)
class BridgeKeysValues:
    """Every layer's keys and values after rotation, `(rows, kv_heads, length, d_head)`, as the
    Bridge's attention handed them to its cache: what `TransformerLensKeyValueCache` is on the
    hooked backend (frozen; rows and positions are sliced, never written)."""

    keys: tuple[Tensor, ...]
    values: tuple[Tensor, ...]

    @property
    def length(self) -> int:
        return int(self.keys[0].shape[-2])

    @property
    def rows(self) -> int:
        return int(self.keys[0].shape[0])

    def sliced(self, length: int) -> BridgeKeysValues:
        """The first `length` positions (a prompt's keys and values before a position depend on
        nothing after it)."""
        return BridgeKeysValues(tuple(k[:, :, :length] for k in self.keys), tuple(v[:, :, :length] for v in self.values))

    def select(self, index: Tensor) -> BridgeKeysValues:
        """Row i is row `index[i]` (a copy: rows may repeat)."""
        return BridgeKeysValues(tuple(k[index] for k in self.keys), tuple(v[index] for v in self.values))

    def expanded(self, rows: int) -> BridgeKeysValues:
        """A one-row prefix broadcast to `rows` rows (no copy)."""
        return BridgeKeysValues(tuple(k.expand(rows, -1, -1, -1) for k in self.keys),
                                tuple(v.expand(rows, -1, -1, -1) for v in self.values))


class AttentionCaches:
    """What the Bridge's attention calls `past_key_values`: `update` puts the prefix's keys and values
    (its first rows, or its one row broadcast) before the new ones, and records what it returns."""

    def __init__(self, past: BridgeKeysValues | None) -> None:
        self.past = past
        self.recorded: dict[int, tuple[Tensor, Tensor]] = {}

    def update(self, keys: Tensor, values: Tensor, layer_idx: int, *args: Any, **kwargs: Any) -> tuple[Tensor, Tensor]:
        if self.past is not None:
            rows = keys.shape[0]
            past_k, past_v = self.past.keys[layer_idx], self.past.values[layer_idx]
            past_k, past_v = (past_k.expand(rows, -1, -1, -1), past_v.expand(rows, -1, -1, -1)) if past_k.shape[0] == 1 \
                else (past_k[:rows], past_v[:rows])
            keys = torch.cat([past_k.to(keys.dtype), keys], dim=-2)
            values = torch.cat([past_v.to(values.dtype), values], dim=-2)
        self.recorded[layer_idx] = (keys, values)
        return keys, values

    def keys_values(self, n_layers: int) -> BridgeKeysValues:
        missing = [layer for layer in range(n_layers) if layer not in self.recorded]
        if missing:
            raise BackendUnsupportedError(f"the Bridge's attention in layers {missing} handed no keys and values to "
                                          f"its cache (an attention without a layer index)")
        return BridgeKeysValues(tuple(self.recorded[layer][0] for layer in range(n_layers)),
                                tuple(self.recorded[layer][1] for layer in range(n_layers)))


ACTIVE = "_latentpatch_attention_caches"
"""Where a Bridge keeps the caches its attention is handed now (innermost last)."""
BOUND = "_latentpatch_bound_prefix"
"""Where a Bridge keeps the keys and values of the prefix `bound_prefix` binds (one row)."""


def bound_keys_values(model: Any) -> BridgeKeysValues | None:
    """The keys and values every run follows inside `tl_bridge_prefix.bound_prefix`, or None."""
    return model.__dict__.get(BOUND)


def active_caches(model: Any) -> AttentionCaches | None:
    stack = model.__dict__.get(ACTIVE)
    return stack[-1] if stack else None


@contextlib.contextmanager
def attention_caches(model: Any, caches: Any) -> Iterator[Any]:
    """Hand `caches` (an `AttentionCaches`, or a `transformers` cache while decoding) to every
    block's attention as its `past_key_values`, for the block (nested blocks: the innermost's)."""
    stack = model.__dict__.setdefault(ACTIVE, [])

    def pre_hook(module: torch.nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        return args, {**kwargs, "past_key_values": stack[-1]}

    handles = [] if stack else [block.attn.register_forward_pre_hook(pre_hook, with_kwargs=True) for block in model.blocks]
    stack.append(caches)
    try:
        yield caches
    finally:
        stack.pop()
        for handle in handles:
            handle.remove()


class _Recorded(Exception):
    """Raised by the last layer's recorder: the base model's loop has handed out every argument."""


def _recorded_arguments(model: Any, length: int) -> list[dict[str, Any]]:
    """Each decoder layer's arguments as Hugging Face's base model hands them out for one row of
    `length` positions from position 0, by name (the layers' `forward` replaced by recorders)."""
    blocks = list(model.blocks)
    recorded: list[dict[str, Any]] = []

    def recorder(index: int) -> Any:
        def forward(*args: Any, **kwargs: Any) -> Any:
            layer = blocks[index].original_component
            bound = inspect.signature(layer.forward).bind(*args, **kwargs).arguments
            extra = [name for name, p in inspect.signature(layer.forward).parameters.items() if p.kind is p.VAR_KEYWORD]
            named = {**{k: v for k, v in bound.items() if k not in extra}, **{k: v for e in extra for k, v in bound.get(e, {}).items()}}
            recorded.append(named)
            if index == len(blocks) - 1:
                raise _Recorded
            return args[0] if args else kwargs["hidden_states"]
        return forward

    cfg = model.cfg
    with torch.inference_mode(False):
        embedding = torch.zeros(1, length, cfg.d_model, dtype=cfg.dtype, device=next(model.parameters()).device)
    for index, block in enumerate(blocks):
        block.__dict__["forward"] = recorder(index)  # the Bridge's __setattr__ would hand it to the wrapped layer
    try:
        with torch.inference_mode(False), torch.no_grad():  # ordinary tensors: kept for later runs with autograd
            model.original_model.base_model(inputs_embeds=embedding, use_cache=False)
    except _Recorded:
        pass
    finally:
        for block in blocks:
            block.__dict__.pop("forward", None)
    if len(recorded) != len(blocks):
        raise BackendUnsupportedError(f"the Hugging Face model called {len(recorded)} of its {len(blocks)} layers")
    return recorded


def _sliced(name: str, value: Any, start: int, end: int) -> Any:
    """A recorded argument of positions `0..end` cut to the positions `start..end` (a mask keeps its
    columns `0..end`: the new positions attend to the prefix)."""
    if name == "hidden_states" or name in CACHE_ARGUMENTS:
        return None
    if name == "use_cache":
        return False
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if name == "position_embeddings" and isinstance(value, tuple):
        return tuple(t[:, start:end] for t in value)
    if name in ("position_ids", "cache_position") and isinstance(value, Tensor):
        return value[..., start:end]
    if name == "attention_mask" and isinstance(value, Tensor) and value.dim() == 4:
        return value[:, :, start:end, :end]
    raise BackendUnsupportedError(f"running the Bridge's layers from a position: unknown layer argument {name!r} "
                                  f"({type(value).__name__}) from the Hugging Face model")


def layer_arguments(model: Any, start: int, end: int) -> list[dict[str, Any]]:
    """For each layer, the keyword arguments (besides the residual stream) that run positions
    `start..end` of a row after the keys and values of positions `0..start`."""
    memo = model.__dict__.setdefault("_latentpatch_layer_arguments", {})
    key = (end, model.cfg.dtype, str(next(model.parameters()).device))
    if key not in memo:
        memo.clear()  # one length kept: a sweep asks for one prompt's many times
        memo[key] = _recorded_arguments(model, end)
    return [{name: _sliced(name, value, start, end) for name, value in named.items() if name != "hidden_states"}
            for named in memo[key]]


def run_layers(model: Any, joins: Sequence[tuple[int, Tensor]], past: BridgeKeysValues | None = None, *,
               stop: int | None = None) -> Tensor:
    """Rows entering at different layers (`joins`: `(layer, residual rows)` in increasing layer order,
    each residual `(rows, pos, d_model)`), after `past`'s positions (None: the bound prefix's, if
    any); every row's residual stream after the last block (before the final norm; with `stop`,
    before block `stop`), in join order. Rows joining at a layer are appended to the batch before
    its block, as `tl_generation.run_blocks_joining` does. Inside a recording of these keys and
    values (`tl_bridge_rows.run_until_end_with_keys_values`) the recorder is the cache."""
    layers = [layer for layer, _ in joins]
    if not layers or layers != sorted(set(layers)):
        raise ValueError(f"joins must come in strictly increasing layer order, got layers {layers}")
    past = bound_keys_values(model) if past is None else past
    outer = active_caches(model)
    caches = outer if isinstance(outer, AttentionCaches) and outer.past is past else AttentionCaches(past)
    start = 0 if past is None else past.length
    arguments = layer_arguments(model, start, start + joins[0][1].shape[1])
    pending = dict(joins)
    residual = pending.pop(layers[0])
    with attention_caches(model, caches):
        for layer in range(layers[0], model.cfg.n_layers if stop is None else stop):
            if layer in pending:
                residual = torch.cat([residual, pending.pop(layer).to(residual.dtype)])
            output = model.blocks[layer](residual, **arguments[layer])
            residual = output[0] if isinstance(output, tuple) else output
    return residual
