"""A prompt prefix computed once on the Bridge: its keys and values (`prefix_keys_values`, what
`tl_generation.prefix_cache` is on HookedTransformer) and every forward pass run after them
(`bound_prefix`, the safety experiments' shared few-shot context).

Inside `bound_prefix` the Bridge's `forward` is replaced, as HookedTransformer's is there: the
tokens passed are the positions after the prefix. They are embedded by the Hugging Face model at
their absolute positions (its `position_ids`, which learned position embeddings read), stopped
before its first layer; the blocks then run from layer 0 after the prefix's keys and values
(`tl_bridge_blocks.run_layers`, which every other run of the door's inside the binding also
follows), and only the final norm and unembedding remain. Hooks see only the positions after the
prefix. Part of the TransformerLens door: `tl_generation` dispatches here for a Bridge model.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor

from patching.model.tl_bridge import BackendUnsupportedError
from patching.model.tl_bridge_blocks import BOUND, BridgeKeysValues, bound_keys_values, run_layers
from patching.model.tl_bridge_rows import run_until_end_with_keys_values
from patching.model.tl_readout import readout


def prefix_keys_values(model: Any, prefix_tokens: Tensor) -> BridgeKeysValues:
    """Keys and values of a prompt prefix at every layer (one row per row of `prefix_tokens`;
    hooks attached by the caller act on the prefix run)."""
    return run_until_end_with_keys_values(model, prefix_tokens, [])[2]


class _Embedded(Exception):
    """Raised before the first layer: the Hugging Face model has embedded the tokens."""

    def __init__(self, residual: Tensor) -> None:
        self.residual = residual


def embedded_after(model: Any, tokens: Tensor, start: int) -> Tensor:
    """Block 0's input for `tokens` at positions `start..`: the Hugging Face model's embedding
    (with its learned positions, where it has them, at those positions), stopped before its first
    layer (the Bridge's embedding hooks fire; none inside a block does)."""

    def stop(module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        raise _Embedded(args[0] if args else kwargs["hidden_states"])

    positions = torch.arange(start, start + tokens.shape[1], device=tokens.device)[None].expand(tokens.shape[0], -1)
    handle = model.blocks[0].register_forward_pre_hook(stop, with_kwargs=True)
    try:
        model.original_model.base_model(input_ids=tokens, position_ids=positions, use_cache=False)
    except _Embedded as embedded:
        return embedded.residual
    finally:
        handle.remove()
    raise BackendUnsupportedError("the Hugging Face model ran no decoder layer")


def _forward_after(model: Any, past: BridgeKeysValues) -> Any:
    """The Bridge's `forward` inside a binding: tokens after `past` (the positions after the
    prefix), returning logits, nothing (`return_type=None`) or, with `stop_at_layer`, the residual
    stream before that block, as the Bridge's own forward does."""

    def forward(input: Any, return_type: str | None = "logits", attention_mask: Tensor | None = None,
                stop_at_layer: int | None = None, **kwargs: Any) -> Any:
        tokens = model.to_tokens(input) if isinstance(input, (str, list)) else input
        unknown = {k: v for k, v in kwargs.items() if v is not None and k not in ("prepend_bos", "padding_side")}
        if tokens.is_floating_point() or unknown or return_type not in ("logits", None):
            raise BackendUnsupportedError(f"a Bridge forward after a bound prefix takes token ids and returns logits; got "
                                          f"{tokens.dtype} input, return_type={return_type!r}, {sorted(unknown)}")
        if attention_mask is not None and not bool(attention_mask.bool().all()):
            raise BackendUnsupportedError("a padded batch after a bound prefix on the bridge backend (left padding "
                                          "needs its own positions); run the rows one at a time or use backend='hooked'")
        residual = embedded_after(model, tokens, past.length)
        final = run_layers(model, [(0, residual)], past, stop=stop_at_layer)
        if stop_at_layer is not None:
            return final
        return readout(model, final) if return_type == "logits" else None

    return forward


@contextlib.contextmanager
def bound_prefix(model: Any, prefix_tokens: Tensor) -> Iterator[None]:
    """`tl_generation.bound_prefix` for the Bridge: every forward pass of `model` (and every run of
    its blocks through the door) inside runs after `prefix_tokens` `(1, length)`, whose keys and
    values are computed once on entry (without inference mode: gradients flow through the positions
    after it). Bindings do not nest."""
    if bound_keys_values(model) is not None:
        raise BackendUnsupportedError("a bound prefix inside another on the bridge backend")
    with torch.no_grad():
        past = prefix_keys_values(model, prefix_tokens.reshape(1, -1))
    model.__dict__[BOUND] = past
    model.__dict__["forward"] = _forward_after(model, past)  # the Bridge's __setattr__ would hand it to a module
    try:
        yield
    finally:
        model.__dict__.pop("forward", None)
        model.__dict__.pop(BOUND, None)
