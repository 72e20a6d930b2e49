"""The model's readout: final norm, unembedding and the final logit soft-cap, on any slice of the final
residual stream. Below both `tl_compat` (which re-exports it) and `tl_generation`, which needs it for the
logits of each generated token."""

from __future__ import annotations

import torch
from torch import Tensor

from patching.model.tl_bridge import TLModel


def readout(model: TLModel, residual: Tensor, columns: Tensor | None = None) -> Tensor:
    """Final norm, unembedding and soft-cap on a slice of the final residual stream.

    With `columns` (token ids) only those logits are computed; every other entry of the full-width
    result is NaN, so that a reader of any other token gets NaN, never a plausible number."""
    import torch.nn.functional as F
    from transformer_lens.utilities import apply_softcap

    if model.cfg.normalization_type is not None:
        residual = model.ln_final(residual)
    if columns is None:
        return apply_softcap(model.unembed(residual), model.cfg.output_logits_soft_cap)
    part = F.linear(residual, model.unembed.W_U.T[columns], model.unembed.b_U[columns])
    out = torch.full((*residual.shape[:-1], model.cfg.d_vocab_out), float("nan"), dtype=part.dtype, device=part.device)
    out[..., columns] = apply_softcap(part, model.cfg.output_logits_soft_cap)
    return out


def frozen_final_readout(model: TLModel, delta: Tensor, base_final: Tensor) -> Tensor:
    """Logits that `delta` (..., d_model) adds at a position whose final residual in the base run is
    `base_final` (..., d_model), with the final norm's scale frozen at the base run's.

    With the scale frozen the readout is linear in the residual stream (the norm's bias and `b_U`
    cancel in differences and are left out), so a component's direct effect is its own readout
    (McGrath et al. 2023, "The Hydra Effect", §2). A final logit soft-cap (Gemma 2) is not linear:
    the logits `delta` adds are then `cap(raw + lin(delta)) - cap(raw)` with `raw` the base run's
    uncapped logits, so a change of a component's write must be read as one `delta`, never as the
    difference of two readouts."""
    from transformer_lens.utilities import apply_softcap

    kind = model.cfg.normalization_type
    if kind in ("LN", "LNPre"):
        centred = base_final - base_final.mean(-1, keepdim=True)
        scale = (centred.pow(2).mean(-1, keepdim=True) + model.cfg.eps).sqrt()
        delta = delta - delta.mean(-1, keepdim=True)
    elif kind in ("RMS", "RMSPre"):
        scale = (base_final.pow(2).mean(-1, keepdim=True) + model.cfg.eps).sqrt()
    else:
        scale = torch.ones_like(base_final[..., :1])
    scaled = delta / scale
    if kind in ("LN", "RMS"):
        scaled = scaled * model.ln_final.w
    added = scaled @ model.W_U
    cap = model.cfg.output_logits_soft_cap
    if cap is None or cap <= 0:
        return added
    raw = model.unembed(model.ln_final(base_final) if kind is not None else base_final)
    return apply_softcap(raw + added, cap) - apply_softcap(raw, cap)
