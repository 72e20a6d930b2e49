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

import torch

from patching.model import tl_bridge
from patching.model.hook_names import hook_name, internal_hook_name


from patching.model.tl_bridge import TLModel
from transformer_lens.utilities.architectures import POST_NORM_ARCHITECTURES

InputKind = Literal["q", "k", "v", "mlp"]


def input_hook_name(layer: int, kind: InputKind) -> str:
    """The hook carrying a node's residual input at block `layer` (inside `node_inputs` only)."""
    return internal_hook_name(layer, "hook_mlp_in" if kind == "mlp" else f"hook_{kind}_input")


def resid_hook_name(layer: int, kind: Literal["resid_pre", "resid_mid"]) -> str:
    """`hook_resid_pre` / `hook_resid_mid` of block `layer` (as `Site(layer, kind).hook_name`)."""
    return hook_name(layer, kind)


@contextlib.contextmanager
def node_inputs(model: TLModel, *, mlp: bool = True) -> Iterator[None]:
    """Inside, `hook_{q,k,v}_input` fire in every block (and `hook_mlp_in` with `mlp`, when the
    model has MLPs); the flags are restored on exit."""
    cfg = model.cfg
    saved = (cfg.use_split_qkv_input, cfg.use_hook_mlp_in)
    handles = [block.hook_mlp_in.register_forward_pre_hook(_own_copy) for block in model.blocks] \
        if mlp and tl_bridge.is_bridge(model) and not cfg.attn_only else []
    try:
        cfg.use_split_qkv_input = True
        cfg.use_hook_mlp_in = bool(mlp and not cfg.attn_only)
        yield
    finally:
        cfg.use_split_qkv_input, cfg.use_hook_mlp_in = saved
        for handle in handles:
            handle.remove()


def _own_copy(module: torch.nn.Module, args: tuple) -> tuple:
    """The Bridge's `hook_mlp_in` is handed the residual stream tensor itself (the input of `ln2`,
    the same object the block's residual connection adds the MLP's output to), where
    HookedTransformer hands it `resid_mid.clone()`: its gradient was then the whole residual's
    (every later reader's, not only the MLP's: EAP's edges into MLPs moved by up to 0.02) and an
    in-place write would reach the residual stream. A copy makes it the MLP's own input."""
    return (args[0].clone(), *args[1:])


def unsupported_for_paths(model: TLModel) -> str | None:
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


def parallel_blocks(model: TLModel) -> bool:
    """Whether each block's MLP reads `resid_pre` beside the attention (GPT-J, GPT-NeoX)."""
    return bool(model.cfg.parallel_attn_mlp)


def has_mlps(model: TLModel) -> bool:
    return not model.cfg.attn_only



def attention_hook_names(model: TLModel, layer: int) -> dict[str, str]:
    """Block `layer`'s attention internals the QK fix reads: the queries and keys as they enter the
    scores (`rot_q` / `rot_k` after rotary embeddings, else `q` / `k`), the masked scaled scores
    (`-inf` where masked) and the pattern."""
    rotary = model.cfg.positional_embedding_type == "rotary"
    return {"q": internal_hook_name(layer, "attn.hook_rot_q" if rotary else "attn.hook_q"),
            "k": internal_hook_name(layer, "attn.hook_rot_k" if rotary else "attn.hook_k"),
            "scores": internal_hook_name(layer, "attn.hook_attn_scores"),
            "pattern": internal_hook_name(layer, "attn.hook_pattern")}


def attention_scale(model: TLModel, layer: int) -> float:
    """What block `layer` divides `q · k` by before the softmax. The Bridge's attention multiplies
    by the wrapped Hugging Face attention's `scaling` (`d_head ** -0.5` where it has none), as
    its reimplemented forward does."""
    attn = model.blocks[layer].attn
    if not tl_bridge.is_bridge(model):
        return float(attn.attn_scale)
    scaling = getattr(attn.original_component, "scaling", None)
    return float(model.cfg.d_head) ** 0.5 if scaling is None else 1.0 / float(scaling)


def _bridge_attention_extras(model: TLModel) -> str | None:
    """What the Bridge's attention does to the scores besides `q · k * scaling` and the mask, read
    off its modules (the Bridge's config does not carry every architecture's)."""
    for block in model.blocks:
        attn, hf_attn = block.attn, block.attn.original_component
        if "q_norm" in (attn.submodules or {}) or "k_norm" in (attn.submodules or {}):
            return "queries and keys are normalised after hook_q / hook_k (QK-norm)"
        if getattr(hf_attn, "attn_logit_softcapping", None):
            return "attention scores are soft-capped"
        if getattr(hf_attn, "sinks", None) is not None:
            return "attention sinks join the softmax"
    return None


def unsupported_for_qk_fix(model: TLModel) -> str | None:
    """Why the scores are not `rot_q · rot_k / scale` plus a mask in this model, or None."""
    cfg = model.cfg
    if tl_bridge.is_bridge(model) and _bridge_attention_extras(model):
        return _bridge_attention_extras(model)
    if cfg.use_qk_norm:
        return "queries and keys are normalised after hook_q / hook_k (QK-norm)"
    if cfg.attn_scores_soft_cap and cfg.attn_scores_soft_cap > 0:
        return "attention scores are soft-capped"
    if cfg.positional_embedding_type in ("alibi", "relative_positional_bias", "shortformer"):
        return f"{cfg.positional_embedding_type} positions add to the scores or queries outside q · k"
    if getattr(cfg, "use_attention_sinks", False):
        return "attention sinks join the softmax"
    return None
