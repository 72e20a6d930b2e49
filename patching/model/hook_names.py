"""TransformerLens hook names, built in this one module (STYLE.md rule 8): the suffix of each site kind,
and the hooks the engine reads or sets that no site kind names. It imports nothing of the model room, so
every module of the door can name a hook without importing `Site` (which imports the door)."""

from __future__ import annotations

from patching.errors import SiteError

HOOK_SUFFIX = {
    "resid_pre": "hook_resid_pre",
    "resid_mid": "hook_resid_mid",
    "resid_post": "hook_resid_post",
    "attn_out": "hook_attn_out",
    "mlp_out": "hook_mlp_out",
    "mlp_pre": "mlp.hook_pre",
    "mlp_post": "mlp.hook_post",
    "z": "attn.hook_z",
    "q": "attn.hook_q",
    "k": "attn.hook_k",
    "v": "attn.hook_v",
    "pattern": "attn.hook_pattern",
    # A head's write to the residual stream is z @ W_O[head], linear in z with W_O fixed, so it
    # is read and patched through hook_z: TransformerLens's hook_result needs `use_attn_result`,
    # which materialises (batch, pos, head, d_model) in every forward pass.
    "head_out": "attn.hook_z",
}


def hook_name(layer: int, kind: str) -> str:
    """`blocks.{layer}.<suffix>` of a site kind (`Site.hook_name` is the typed way in)."""
    return f"blocks.{layer}.{HOOK_SUFFIX[kind]}"


INTERNAL_HOOKS: tuple[str, ...] = ("hook_q_input", "hook_k_input", "hook_v_input", "hook_mlp_in", "attn.hook_q",
                                   "attn.hook_k", "attn.hook_rot_q", "attn.hook_rot_k", "attn.hook_attn_scores",
                                   "attn.hook_pattern")
"""Hooks the engine reads or sets that no `Site` kind names: a block's split inputs (path patching, edge
attribution) and attention internals (AtP*'s QK fix)."""


def internal_hook_name(layer: int, hook: str) -> str:
    """`blocks.{layer}.{hook}` for one of `INTERNAL_HOOKS`: the one place besides `Site` that builds a hook name."""
    if hook not in INTERNAL_HOOKS:
        raise SiteError(f"unknown internal hook {hook!r}; known: {', '.join(INTERNAL_HOOKS)}")
    if isinstance(layer, bool) or not isinstance(layer, int) or layer < 0:
        raise SiteError(f"layer must be an int >= 0, got {layer!r}")
    return f"blocks.{layer}.{hook}"
