"""Building TransformerLens models: from a local Hugging Face folder, from an official name, and
the weight layout every loaded model gets. Part of the TransformerLens door (`tl_compat`
re-exports it; nothing else imports this module). `HookedTransformer` is imported where a model is
built, never at import: TransformerLens 4 removed it, and the door must import there (issue 27)."""

from __future__ import annotations

import contextlib
import io
from pathlib import Path
from typing import Any

import torch

from patching.model import tl_bridge


def build_from_local_folder(
    folder: Path,
    hf_model: torch.nn.Module,
    tokenizer: Any,
    *,
    model_name: str,
    flags: dict[str, bool],
    official_name: str | None = None,
    n_layers: int | None,
    n_ctx: int,
    device: str | torch.device,
    dtype: torch.dtype,
) -> Any:
    """Build a HookedTransformer from a local HF folder the way `from_pretrained` does inside.

    `from_pretrained` refuses names outside TransformerLens's official list, so we run its
    three steps ourselves: config from the folder, converted state dict, then weight processing.
    With `official_name` the config is TransformerLens's own for that name (no hub access: the
    weights are `hf_model`'s): TransformerLens configures some architectures (Gemma 3) by name only
    and cannot build them from a folder's config.json.
    """
    tl_bridge.require_hooked_transformer("backend='hooked'")
    from transformer_lens import HookedTransformer
    from transformer_lens import loading_from_pretrained as tl_loading

    source = official_name or str(folder)
    cfg = tl_loading.get_pretrained_model_config(
        source, hf_cfg=hf_model.config.to_dict(), fold_ln=flags["fold_ln"], device=device,
        dtype=dtype, first_n_layers=n_layers, n_ctx=n_ctx,
    )
    state_dict = tl_loading.get_pretrained_state_dict(source, cfg, hf_model, dtype=dtype)
    model = HookedTransformer(cfg, tokenizer, move_to_device=False)
    model.load_and_process_state_dict(state_dict, **flags)
    model.cfg.model_name = model_name
    with contextlib.redirect_stdout(io.StringIO()):  # TransformerLens prints "Moving model to device"
        return model.to(device)


def load_official(name: str, *, flags: dict[str, bool], n_layers: int | None, device: Any, dtype: torch.dtype) -> Any:
    """Any official TransformerLens name, through its own loader (needs the hub)."""
    tl_bridge.require_hooked_transformer(f"loading {name!r} by its TransformerLens name")
    from transformer_lens import HookedTransformer

    return HookedTransformer.from_pretrained_no_processing(
        name, device=device, dtype=dtype, first_n_layers=n_layers, **flags
    )


def transpose_layout(model: Any) -> None:
    """Store weights in the memory order TransformerLens 3.9 reshapes them to in every forward pass
    (same values, same shapes), so that its per-call copies become views.

    - Unembedding and gated-MLP weights: TransformerLens calls `F.linear(x, W.T.contiguous())` (to
      match Hugging Face's layout), a full copy of each weight per call, 113 MB for SmolLM2's
      unembedding. Stored as transposes of contiguous tensors, `W.T` is already contiguous.
    - Attention: `W_Q`, `W_K`, `W_V` (and the grouped-query `_W_K`, `_W_V`), `(head, d_model, d_head)`,
      are rearranged to `(head * d_head, d_model)` and `W_O`, `(head, d_head, d_model)`, to
      `(d_model, head * d_head)` before each product: a copy per layer per call unless the storage
      already has that order.

    The products run on the same bytes as before (bit-identical logits, and the reshapes are views:
    tested). Measured: the MLP and unembedding copies were 45% of a 30 x 11 residual trace (one
    thread, cProfile)."""
    from transformer_lens.components import Unembed
    from transformer_lens.components.abstract_attention import AbstractAttention
    from transformer_lens.components.mlps.gated_mlp import GatedMLP

    for module in model.modules():
        names = ("W_U",) if isinstance(module, Unembed) else ("W_gate", "W_in", "W_out") if isinstance(module, GatedMLP) else ()
        for name in names:
            weight = module._parameters.get(name)
            if weight is not None and weight.ndim == 2 and weight.is_contiguous():
                weight.data = weight.data.T.contiguous().T
        if isinstance(module, AbstractAttention):
            for name in ("W_Q", "W_K", "W_V", "_W_K", "_W_V"):  # (head, d_model, d_head) read as ((head d_head), d_model)
                weight = module._parameters.get(name)
                if weight is not None and weight.ndim == 3 and weight.is_contiguous():
                    weight.data = weight.data.permute(0, 2, 1).contiguous().permute(0, 2, 1)
            weight = module._parameters.get("W_O")  # (head, d_head, d_model) read as (d_model, (head d_head))
            if weight is not None and weight.ndim == 3 and weight.is_contiguous():
                weight.data = weight.data.permute(2, 0, 1).contiguous().permute(1, 2, 0)
