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
