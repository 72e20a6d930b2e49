"""The sweep engine's shortcuts on the Bridge: rows joining at a layer from a cached residual, after
the base run's keys and values, and forwards stopped after the last block.

On `HookedTransformer` the engine starts a patched row at its first patched layer from the base
run's cached residual stream and runs only the positions from the first patched one on, after the
base run's keys and values (`tl_generation.run_blocks_joining`, `cache_before`). TransformerBridge
has neither step itself (Hugging Face owns the layer loop); `tl_bridge_blocks` builds both by
calling the Bridge's blocks one after another, so the same rows run here: the base run records its
keys and values (`BridgeKeysValues`), and a patched row enters its layer with the given residual
after the prefix's keys and values, its hooks firing inside the blocks as in a full forward.

The forward of a prompt stops after the last block (a hook raises once the final residual is
captured), so only the positions and columns the metric reads are ever unembedded. Part of the
TransformerLens door: `tl_compat` and `tl_generation` dispatch here for a Bridge model.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from torch import Tensor

from patching.model.hook_names import hook_name
from patching.model.tl_bridge import BackendUnsupportedError, attach_forward_hook, hook_points
from patching.model.tl_bridge_blocks import AttentionCaches, BridgeKeysValues, attention_caches, bound_keys_values, run_layers
from patching.model.tl_readout import readout


class _Stop(Exception):
    """Raised by the capture hook on the last block's output: the unembedding is not needed."""


def run_to_final(model: Any, tokens: Tensor, hook_names: Sequence[str], replace: Sequence[tuple[str, Any]] = (),
                 attention_mask: Tensor | None = None,
                 forward_kwargs: dict[str, Any] | None = None) -> tuple[Tensor, dict[str, Tensor]]:
    """One forward of `tokens`, stopped after the last block: its output (the final residual stream,
    before the final norm), the activations at `hook_names`, with `replace` hooks (name, fn) put first
    on their hook points (`forward_kwargs`: more keywords for the Bridge's forward, e.g. a decoding
    cache). Every hook is removed however the run ends."""
    last = hook_name(model.cfg.n_layers - 1, "resid_post")
    captured: dict[str, Tensor] = {}

    def keep(name: str) -> Any:
        def fn(activation: Tensor) -> None:
            captured[name] = activation
        return fn

    def stop(activation: Tensor) -> None:
        captured[last] = activation
        raise _Stop

    points = hook_points(model)  # the Bridge builds its hook_dict anew on every read: kept
    handles = [attach_forward_hook(points[name], fn, prepend=True) for name, fn in replace]
    handles += [attach_forward_hook(points[name], keep(name)) for name in dict.fromkeys(hook_names) if name != last]
    handles.append(attach_forward_hook(points[last], stop))  # the last hook of the last hook point: every other one has fired
    try:
        model(tokens, **({} if attention_mask is None else {"attention_mask": attention_mask}), **(forward_kwargs or {}))
    except _Stop:
        pass
    finally:
        for handle in handles:
            handle.remove()
    missing = [name for name in [*hook_names, last] if name not in captured]
    if missing:
        raise RuntimeError(f"hooks {missing} did not fire in the Bridge's forward pass")
    return captured[last], {name: captured[name] for name in hook_names}


def run_until_end_with_cache(model: Any, tokens: Tensor, hook_names: list[str]) -> tuple[Tensor, dict[str, Tensor]]:
    """The final residual stream (before the final norm) and the named activations; the Bridge's
    unembedding never runs (`stop_at_layer=n_layers` would return logits there instead)."""
    return run_to_final(model, tokens, hook_names)


def run_until_end_with_keys_values(model: Any, tokens: Tensor, hook_names: list[str]) -> tuple[Tensor, dict[str, Tensor], BridgeKeysValues]:
    """As `run_until_end_with_cache`, and the keys and values every layer's attention used."""
    with attention_caches(model, AttentionCaches(bound_keys_values(model))) as caches:  # after a bound prefix's
        final, acts = run_to_final(model, tokens, hook_names)
    return final, acts, caches.keys_values(model.cfg.n_layers)


def cache_before(keys_values: BridgeKeysValues, n_tokens: int, position: int) -> BridgeKeysValues | None:
    """The keys and values before `position` of a prompt of `n_tokens` tokens, from its whole
    record (with whatever it holds before the prompt); None when that is nothing."""
    length = keys_values.length - n_tokens + position
    return keys_values.sliced(length) if length > 0 else None


def run_rows_joining(model: Any, joins: Sequence[tuple[int, Tensor]], prefix: BridgeKeysValues | None) -> Tensor:
    """`tl_generation.run_blocks_joining` for the Bridge: every row's final residual stream, in join
    order, each row joining at its layer with the residual given, after `prefix`'s positions."""
    if prefix is not None and not isinstance(prefix, BridgeKeysValues):
        raise BackendUnsupportedError(f"the bridge backend runs rows after its own keys and values (BridgeKeysValues), "
                                      f"got {type(prefix).__name__}")
    return run_layers(model, joins, prefix)


def is_bridge_keys_values(cache: Any) -> bool:
    return isinstance(cache, BridgeKeysValues)


def run_blocks(model: Any, residual: Tensor, start_layer: int, past: BridgeKeysValues | None = None) -> Tensor:
    """Blocks `start_layer..n_layers-1` on `residual` `(rows, pos, d_model)` (after `past`'s
    positions); the final residual stream. Gradients flow into `residual`."""
    return run_layers(model, [(start_layer, residual)], past)


def forward_step(model: Any, tokens: Tensor, attention_mask: Tensor, *, last_only: bool) -> Tensor:
    """`tl_generation.forward_step` without a key-value cache on the Bridge: the whole sequence,
    the mask marking left padding (the Bridge derives position ids from it)."""
    if not last_only:
        return model(tokens, attention_mask=attention_mask)
    final, _ = run_to_final(model, tokens, [], attention_mask=attention_mask)
    return readout(model, final[:, -1:])
