"""The second backend: TransformerLens's `TransformerBridge`, which wraps a Hugging Face model
through an architecture adapter instead of converting it into a `HookedTransformer` (removed in
TransformerLens 4). Part of the TransformerLens door: only `loading` imports this module.

The Bridge is booted from the same local Hugging Face folder (and the same checked `transformers`
model) as the `hooked` backend, then put in compatibility mode, which exposes the canonical hook
names (`blocks.{i}.hook_resid_pre`, `...attn.hook_z`, ...) and applies the weight processing that
`ModelFlags` states. No hub access: the tokenizer and the weights are handed to it.
"""

from __future__ import annotations

import contextlib
import io
from typing import Any

import torch

from patching.errors import ModelLoadError
from patching.model.tl_bridge_residual import fix_resid_mid
from sae.errors import LatentpatchError

BACKENDS = ("hooked", "bridge")
"""`load_model`'s backends: TransformerLens's `HookedTransformer` and `TransformerBridge`."""


def check_backend(backend: Any) -> str:
    """A typed error for an unknown backend, before any model is read."""
    if backend not in BACKENDS:
        raise ModelLoadError(f"backend must be one of {BACKENDS}, got {backend!r}")
    return backend


def is_bridge(model: Any) -> bool:
    """True for a TransformerBridge (any TransformerLens version that has one)."""
    try:
        from transformer_lens.model_bridge import TransformerBridge
    except ImportError:  # a TransformerLens without the Bridge cannot have built one
        return False
    return isinstance(model, TransformerBridge)


def truncate_hf_model(hf_model: torch.nn.Module, n_layers: int) -> None:
    """Keep only the first `n_layers` decoder layers of a `transformers` causal LM, in place.

    The Bridge has no `first_n_layers` (HookedTransformer's truncation), so the model it wraps is
    cut instead: the layer list is the one `nn.ModuleList` as long as the config's layer count,
    and the config (with its per-layer `layer_types`, where it has one) is cut to match."""
    config = hf_model.config
    total = config.num_hidden_layers
    lists = [m for m in hf_model.modules() if isinstance(m, torch.nn.ModuleList) and len(m) == total]
    if len(lists) != 1:
        raise ModelLoadError(f"cannot find the one layer list of {type(hf_model).__name__} to keep {n_layers} layers")
    del lists[0][n_layers:]
    config.num_hidden_layers = n_layers
    if isinstance(getattr(config, "layer_types", None), list):
        config.layer_types = config.layer_types[:n_layers]


def refused_flags(bridge: Any, flags: dict[str, bool]) -> list[str]:
    """The requested processing steps this Bridge would silently skip or change; each is refused.

    - `center_unembed` with logit softcapping: the Bridge logs a warning and drops it (tanh is not
      shift-invariant), where HookedTransformer would center anyway.
    - `fold_ln` on an adapter that declares it unsupported: the Bridge warns and skips it.
    """
    cfg = bridge.cfg
    refused = []
    if flags["center_unembed"] and (getattr(cfg, "output_logits_soft_cap", None) or 0) > 0:
        refused.append("center_unembed (the model softcaps its logits; the Bridge would drop the step)")
    if flags["fold_ln"] and not getattr(bridge.adapter, "supports_fold_ln", True):
        refused.append(f"fold_ln ({type(bridge.adapter).__name__} cannot fold its norms)")
    return refused


def boot_bridge(hf_model: torch.nn.Module, tokenizer: Any, *, model_name: str, flags: dict[str, bool],
                n_layers: int | None, n_ctx: int, device: Any, dtype: torch.dtype) -> Any:
    """A TransformerBridge in compatibility mode around `hf_model` (already loaded and checked),
    processed as `flags` state (`fold_ln`, `center_writing_weights`, `center_unembed`,
    `fold_value_biases`: the same four steps as HookedTransformer's, by the same names).

    `n_ctx` caps the context latentpatch accepts (`cfg.n_ctx`), as the hooked backend's does; the
    wrapped model's own position limit is left alone (changing it after load changes nothing)."""
    from transformer_lens.model_bridge import TransformerBridge

    if n_layers is not None:
        truncate_hf_model(hf_model, n_layers)
    hf_model = hf_model.to(device=device, dtype=dtype)
    with contextlib.redirect_stdout(io.StringIO()):
        bridge = TransformerBridge.boot_transformers(model_name, hf_model=hf_model, tokenizer=tokenizer,
                                                     device=device, dtype=dtype)
    refused = refused_flags(bridge, flags)
    if refused:
        raise ModelLoadError(f"the bridge backend cannot apply {'; '.join(refused)}; load with backend='hooked' "
                             f"or without these flags")
    with contextlib.redirect_stdout(io.StringIO()):  # no_processing: not even the adapter's own preprocessing
        bridge.enable_compatibility_mode(disable_warnings=True, no_processing=not any(flags.values()), **flags)
    bridge.cfg.model_name = model_name
    bridge.cfg.n_ctx = min(n_ctx, bridge.cfg.n_ctx) if bridge.cfg.n_ctx else n_ctx
    fix_resid_mid(bridge)  # a patch at hook_resid_mid reaches the residual stream, as on HookedTransformer
    return bridge


class BackendUnsupportedError(LatentpatchError, NotImplementedError):
    """A step the engine needs that the bridge backend does not have yet (named in the message)."""


MISSING = {
    "attention_internals": "TransformerBridge's attention wraps Hugging Face's and lacks HookedTransformer's "
                           "attn_scale and per-head weights, which the QK fix recomputes the softmax with",
}
"""What some steps need and the Bridge lacks; the functions that need them refuse a Bridge model.
(Rows joining at a layer after a prefix's keys and values, the sweep engine's shortcuts, are built
for it in `tl_bridge_blocks`.)"""


def refuse_bridge(model: Any, what: str, need: str) -> None:
    """Refuse a Bridge model before any forward pass, naming `what` and the step it lacks (a key of
    `MISSING`); callers outside the model room reach it through `tl_compat`."""
    if is_bridge(model):
        raise BackendUnsupportedError(f"{what} on the bridge backend: {MISSING[need]}; load the model with backend='hooked'")


def require_hooked(model: Any, need: str) -> None:
    """Refuse a Bridge model, naming the missing step, before any forward pass runs."""
    if is_bridge(model):
        raise BackendUnsupportedError(f"the bridge backend cannot do this yet: {MISSING[need]}; "
                                      f"load the model with backend='hooked'")


def attach_forward_hook(module: torch.nn.Module, fn: Any, *, prepend: bool = False) -> Any:
    """`module.register_forward_hook` calling `fn(output)`, whose non-None result replaces the output.

    On the Bridge a hook point may carry a `hook_conversion` (attention's `hook_z`, `hook_q`, ...
    hold flat heads underneath): `fn` then sees the converted tensor, `(batch, pos, head, d_head)`,
    as TransformerLens's own hooks do, and its result is reverted before the model goes on."""
    conversion = getattr(module, "hook_conversion", None)

    def forward_hook(module: torch.nn.Module, inputs: Any, output: torch.Tensor) -> Any:
        if conversion is None:
            return fn(output)
        result = fn(conversion.convert(output))
        return None if result is None else conversion.revert(result)

    return module.register_forward_hook(forward_hook, prepend=prepend)


def hook_points(model: Any) -> dict[str, torch.nn.Module]:
    """The model's hook points by name (read, never write). The Bridge builds its `hook_dict` anew,
    aliases resolved, on every read (6 ms on the default model, 37 ms under cProfile: 8% of a
    63-head sweep when read once per run): on the Bridge the mapping is kept while its registry of
    hook points keeps its size. HookedTransformer's `hook_dict` is a plain attribute."""
    registry = getattr(model, "_hook_registry", None)
    if registry is None:
        return model.hook_dict
    kept = model.__dict__.get("_latentpatch_hook_points")
    if kept is None or kept[0] != len(registry):
        kept = (len(registry), dict(model.hook_dict))
        model.__dict__["_latentpatch_hook_points"] = kept
    return kept[1]


def has_hooked_transformer() -> bool:
    """Whether this TransformerLens still has `HookedTransformer` (3.x; 4.0 removed it).

    TransformerLens 4 answers `getattr(transformer_lens, "HookedTransformer", None)` with an
    ImportError (its migration pointer), not None, so the name is asked for inside a try."""
    try:
        from transformer_lens import HookedTransformer  # noqa: F401
    except ImportError:
        return False
    return True


def require_hooked_transformer(what: str) -> None:
    """Refuse, naming `what`, where only `HookedTransformer` can do it and this TransformerLens
    (4.x) has none."""
    if not has_hooked_transformer():
        raise BackendUnsupportedError(f"{what} needs TransformerLens 3.x's HookedTransformer, which the installed "
                                      f"TransformerLens removed; load the model with backend='bridge'")


def _model_types() -> Any:
    """`HookedTransformer | TransformerBridge`, or whichever of the two this TransformerLens has:
    the door's functions are annotated with it, and the test suite checks annotations at run time."""
    types = []
    if has_hooked_transformer():
        from transformer_lens import HookedTransformer
        types.append(HookedTransformer)
    try:
        from transformer_lens.model_bridge import TransformerBridge
        types.append(TransformerBridge)
    except ImportError:
        pass
    union = types[0]
    for extra in types[1:]:
        union = union | extra
    return union


TLModel = _model_types()
"""The models the door accepts: either backend."""
