"""The Bridge's `hook_resid_mid` made a point of the residual stream, as on HookedTransformer.

TransformerBridge's `blocks.{i}.hook_resid_mid` is an alias of `ln2.hook_in`: the hook point at the
input of the norm before the MLP (TransformerLens 3.9 and 4.3 alike). A Hugging Face decoder layer
keeps that tensor as its residual (`residual = hidden_states; hidden_states = norm(hidden_states)`),
so what a hook *returns* there reaches the norm and the MLP only: the residual connection still adds
the MLP's output to the unpatched stream (measured: a vector added at `hook_resid_mid` moved the
logits by up to 0.50 against the same vector added to the residual stream on transformers itself).
On HookedTransformer the patched `resid_mid` is the stream the block goes on with.

`fix_resid_mid` makes the two agree without touching the Bridge's hooks: the hook point's class is
swapped for a subclass that remembers the tensor its hooks handed back when it is not the one they
were given, and a forward hook on the wrapped Hugging Face layer adds the difference to the layer's
output, before the block's `hook_resid_post` fires. Nothing is written in place (autograd sees
`resid_post = layer output + (patched - unpatched)`), and a run without a patch there pays one
identity check per block. Part of the TransformerLens door: `tl_bridge.boot_bridge` calls it.
"""

from __future__ import annotations

from typing import Any

import torch

from patching.model.hook_names import hook_name

_CLASSES: dict[type, type] = {}


def _remembering(base: type) -> type:
    """A subclass of the hook point's class whose call remembers `(given, returned)` when its
    hooks returned another tensor than the one they were given (None otherwise)."""
    if base not in _CLASSES:
        def __call__(self: Any, x: Any, *args: Any, **kwargs: Any) -> Any:
            y = base.__call__(self, x, *args, **kwargs)
            self.__dict__["latentpatch_written"] = None if y is x else (x, y)
            return y

        _CLASSES[base] = type(f"ResidualStream{base.__name__}", (base,), {"__call__": __call__})
    return _CLASSES[base]


def fix_resid_mid(bridge: Any) -> int:
    """Make every block's `hook_resid_mid` (where it is the input of `ln2`) a point of the residual
    stream; the number of blocks changed."""
    changed, points = 0, bridge.hook_dict
    for layer, block in enumerate(bridge.blocks):
        ln2 = getattr(block, "ln2", None)
        point = points.get(hook_name(layer, "resid_mid"))
        if ln2 is None or point is None or point is not getattr(ln2, "hook_in", None):
            continue
        point.__class__ = _remembering(type(point))
        point.__dict__["latentpatch_written"] = None
        layer_module = block.original_component
        layer_module.register_forward_pre_hook(_forget(point))
        layer_module.register_forward_hook(_carry(point))
        changed += 1
    return changed


def _forget(point: Any) -> Any:
    def pre_hook(module: torch.nn.Module, args: Any) -> None:
        point.__dict__["latentpatch_written"] = None  # a run stopped inside the last call leaves nothing behind
    return pre_hook


def _carry(point: Any) -> Any:
    def hook(module: torch.nn.Module, args: Any, output: Any) -> Any:
        written = point.__dict__.get("latentpatch_written")
        if written is None:
            return None
        point.__dict__["latentpatch_written"] = None
        given, returned = written
        if isinstance(output, tuple):
            return (output[0] + (returned - given).to(output[0].dtype), *output[1:])
        return output + (returned - given).to(output.dtype)
    return hook
