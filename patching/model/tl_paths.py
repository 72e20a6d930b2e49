"""TransformerLens access for path patching and edge attribution: the per-head input hooks.

A head's query, key and value read the residual stream through `ln1`; an MLP reads it through
`ln2`. Path patching sets one receiver's *input* (the residual stream it reads, before its norm)
while its neighbours read the real stream, and edge attribution needs the gradient with respect to
that input. TransformerLens exposes both as `hook_{q,k,v}_input` (one copy of the stream per head,
`(batch, pos, head, d_model)`; key/value heads under grouped-query attention) and `hook_mlp_in`,
which fire only while `use_split_qkv_input` / `use_hook_mlp_in` are set. `node_inputs` sets them for
a block and restores them however it is left (STYLE.md 20); these hook names are built here
because `Site` names only sites that exist in every forward pass.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Literal

from transformer_lens import HookedTransformer
from transformer_lens.utilities.architectures import POST_NORM_ARCHITECTURES

InputKind = Literal["q", "k", "v", "mlp"]


def input_hook_name(layer: int, kind: InputKind) -> str:
    """The hook carrying a node's residual input at block `layer` (inside `node_inputs` only)."""
    return f"blocks.{layer}.hook_mlp_in" if kind == "mlp" else f"blocks.{layer}.hook_{kind}_input"


def resid_hook_name(layer: int, kind: Literal["resid_pre", "resid_mid"]) -> str:
    """`hook_resid_pre` / `hook_resid_mid` of block `layer` (as `Site(layer, kind).hook_name`)."""
    return f"blocks.{layer}.hook_{kind}"


@contextlib.contextmanager
def node_inputs(model: HookedTransformer, *, mlp: bool = True) -> Iterator[None]:
    """Inside, `hook_{q,k,v}_input` fire in every block (and `hook_mlp_in` with `mlp`, when the
    model has MLPs); the flags are restored on exit."""
    cfg = model.cfg
    saved = (cfg.use_split_qkv_input, cfg.use_hook_mlp_in)
    try:
        cfg.use_split_qkv_input = True
        cfg.use_hook_mlp_in = bool(mlp and not cfg.attn_only)
        yield
    finally:
        cfg.use_split_qkv_input, cfg.use_hook_mlp_in = saved


def unsupported_for_paths(model: HookedTransformer) -> str | None:
    """Why head outputs are not additive terms of the residual stream in this model, or None.

    Path patching and edge attribution treat the stream as the sum of the embedding and every
    head's and MLP's output (Elhage et al. 2021); a norm after the attention (Gemma 2's `ln1_post`,
    post-norm blocks) or the shortformer's positional embedding added to every query and key breaks
    that, and such models are refused rather than answered approximately."""
    cfg = model.cfg
    if cfg.use_normalization_before_and_after or cfg.original_architecture in POST_NORM_ARCHITECTURES:
        return "a norm follows each attention/MLP output, so head outputs are not additive residual terms"
    if cfg.positional_embedding_type == "shortformer":
        return "shortformer positional embeddings enter every query and key outside the residual stream"
    return None


def parallel_blocks(model: HookedTransformer) -> bool:
    """Whether each block's MLP reads `resid_pre` beside the attention (GPT-J, GPT-NeoX)."""
    return bool(model.cfg.parallel_attn_mlp)


def has_mlps(model: HookedTransformer) -> bool:
    return not model.cfg.attn_only

