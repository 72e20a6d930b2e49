"""Full rows: the sweep engine's shortcuts as the Bridge can run them.

On `HookedTransformer` the engine starts a patched row at its first patched layer from the base
run's cached residual stream and runs only the positions from the first patched one on, after the
base run's keys and values (`tl_generation.run_blocks_joining`, `cache_before`). TransformerBridge
has neither step: Hugging Face owns the layer loop (no `start_at_layer`) and it takes no
TransformerLens key-value cache. Here every patched row runs the whole prompt from the embedding,
and at its join layer the row's residual stream is *replaced* by the one the engine hands over
(the base run's), so each row enters its first patched layer exactly as on the hooked backend; the
result is the same patch, bought with the layers and positions the shortcuts skip (slower, exact).

The one thing kept: the forward stops after the last block (a hook raises once the final residual
is captured), so only the positions and columns the metric reads are ever unembedded. Part of the
TransformerLens door: `tl_compat` and `tl_generation` dispatch here for a Bridge model.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from patching.model.hook_names import hook_name
from patching.model.tl_bridge import BackendUnsupportedError, attach_forward_hook
from patching.model.tl_readout import readout


@dataclass(frozen=True)
class FullRows:
    """What stands for a prompt's key-value cache on the Bridge: the prompt itself (`(1, n)` token
    ids), whose keys and values each patched row recomputes."""

    tokens: Tensor


class _Stop(Exception):
    """Raised by the capture hook on the last block's output: the unembedding is not needed."""


def _attach(model: Any, name: str, fn: Any, prepend: bool = False) -> Any:
    """A forward hook on the hook point `name` that may replace its output (as `tl_compat.attach_hook`)."""
    return attach_forward_hook(model.hook_dict[name], fn, prepend=prepend)


def _run_to_final(model: Any, tokens: Tensor, hook_names: Sequence[str], replace: Sequence[tuple[str, Any]] = (),
                  attention_mask: Tensor | None = None) -> tuple[Tensor, dict[str, Tensor]]:
    """One forward of `tokens`, stopped after the last block: its output (the final residual stream,
    before the final norm), the activations at `hook_names`, with `replace` hooks (name, fn) put first
    on their hook points. Every hook is removed however the run ends."""
    last = hook_name(model.cfg.n_layers - 1, "resid_post")
    captured: dict[str, Tensor] = {}

    def keep(name: str) -> Any:
        def fn(activation: Tensor) -> None:
            captured[name] = activation
        return fn

    def stop(activation: Tensor) -> None:
        captured[last] = activation
        raise _Stop

    handles = [_attach(model, name, fn, prepend=True) for name, fn in replace]
    handles += [_attach(model, name, keep(name)) for name in dict.fromkeys(hook_names) if name != last]
    handles.append(_attach(model, last, stop))  # the last hook of the last hook point: every other one has fired
    try:
        model(tokens) if attention_mask is None else model(tokens, attention_mask=attention_mask)
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
    return _run_to_final(model, tokens, hook_names)


def run_until_end_with_keys_values(model: Any, tokens: Tensor, hook_names: list[str]) -> tuple[Tensor, dict[str, Tensor], FullRows]:
    """As `run_until_end_with_cache`, and the prompt as the stand-in for its key-value cache."""
    final, acts = _run_to_final(model, tokens, hook_names)
    return final, acts, FullRows(tokens)


def cache_before(rows: FullRows, n_tokens: int, position: int) -> FullRows:
    """The stand-in for the keys and values before `position`: only position 0 (whole rows) exists
    on the Bridge, so a caller that would run a suffix is refused by name."""
    if position != 0 or rows.tokens.shape[-1] != n_tokens:
        raise BackendUnsupportedError("the bridge backend runs whole rows only (it takes no key-value prefix); "
                                      f"asked for the {n_tokens - position} positions after position {position}")
    return rows


def run_rows_joining(model: Any, joins: Sequence[tuple[int, Tensor]], prefix: Any) -> Tensor:
    """`tl_generation.run_blocks_joining` for the Bridge: every row's final residual stream, in join
    order, each row joining at its layer with the residual given (every position of the prompt).

    All rows run the prompt in `prefix` (a `FullRows`) from the start; a hook put first on each join
    layer's `hook_resid_pre` writes the joining rows' residuals there, so what a row computes before
    its layer is discarded and the row enters that layer exactly as given."""
    if not isinstance(prefix, FullRows):
        raise BackendUnsupportedError("the bridge backend runs patched rows from their prompt's tokens; "
                                      f"got no FullRows prompt but {type(prefix).__name__}")
    layers = [layer for layer, _ in joins]
    if not layers or layers != sorted(set(layers)):
        raise ValueError(f"joins must come in strictly increasing layer order, got layers {layers}")
    n_rows, offset, replace = sum(residual.shape[0] for _, residual in joins), 0, []
    for layer, residual in joins:
        if residual.shape[1] != prefix.tokens.shape[-1]:
            raise BackendUnsupportedError(f"the bridge backend joins whole rows ({prefix.tokens.shape[-1]} positions), "
                                          f"got {residual.shape[1]}")
        replace.append((hook_name(layer, "resid_pre"), _writer(slice(offset, offset + residual.shape[0]), residual)))
        offset += residual.shape[0]
    final, _ = _run_to_final(model, prefix.tokens.reshape(1, -1).expand(n_rows, -1), [], replace)
    return final


def _writer(rows: slice, residual: Tensor) -> Any:
    def fn(x: Tensor) -> Tensor:
        x = x.clone()
        x[rows] = residual.to(x.dtype)
        return x
    return fn


def is_full_rows(cache: Any) -> bool:
    return isinstance(cache, FullRows)


def run_blocks(model: Any, residual: Tensor, start_layer: int) -> Tensor:
    """Blocks `start_layer..n_layers-1` on `residual` `(rows, pos, d_model)`; the final residual stream.

    The Bridge cannot start at a layer, but a block reads only the residual stream before it and the
    positions (rotary or none: learned positions are added before block 0), never the tokens: the
    forward runs placeholder tokens (id 0) and a hook put first on `blocks.{start_layer}.hook_resid_pre`
    replaces what reached it with `residual` (gradients flow into it). Exact; the blocks before
    `start_layer` run and are thrown away."""
    placeholder = torch.zeros(residual.shape[:2], dtype=torch.long, device=residual.device)
    final, _ = _run_to_final(model, placeholder, [], [(hook_name(start_layer, "resid_pre"), lambda x: residual.to(x.dtype))])
    return final


def forward_step(model: Any, tokens: Tensor, attention_mask: Tensor, *, last_only: bool) -> Tensor:
    """`tl_generation.forward_step` without a key-value cache on the Bridge: the whole sequence,
    the mask marking left padding (the Bridge derives position ids from it)."""
    if not last_only:
        return model(tokens, attention_mask=attention_mask)
    final, _ = _run_to_final(model, tokens, [], attention_mask=attention_mask)
    return readout(model, final[:, -1:])
