"""How well an SAE stands in for its site: reconstruction statistics and spliced-model losses.

The formulas live in `sae.metrics` (training logs the same ones); their definitions, each with a
closed-form test:
- cross-entropy: mean next-token negative log-likelihood over positions 0..n-2 predicting 1..n-1;
- CE loss recovered = (CE_ablated - CE_spliced) / (CE_ablated - CE_clean), with the site
  zero-ablated for CE_ablated: 1 means the bottleneck loses nothing, 0 means it is as bad as
  deleting the site;
- KL(model || spliced) = sum_v p(v) (log p(v) - log q(v)), averaged over positions;
- explained variance = 1 - sum ||x - x_hat||^2 / sum ||x - mean(x)||^2 (mean over tokens);
- MSE = mean squared error per element; L0 = mean number of non-zero latents per token.

Batches of texts of unequal length are right-padded (`padded_tokens`); the `mask` of real tokens
keeps padding out of every statistic. With right padding the logits at real positions do not
depend on the padding (attention is causal), so masking is exact.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch
from jaxtyping import Bool, Int
from torch import Tensor

from patching.model import tl_compat
from patching.model.sites import Site
from patching.model.tokens import padded_tokens  # noqa: F401  (re-exported: quality's callers pad with it)
from patching.splice.splicer import SpliceChecks, splice
from sae.metrics import ce_loss_recovered, cross_entropy, explained_variance, kl_divergence, l0, mse

__all__ = ["SpliceMetrics", "ce_loss_recovered", "cross_entropy", "explained_variance", "kl_divergence", "l0", "mse",
           "padded_tokens", "splice_metrics"]


@dataclass(frozen=True)
class SpliceMetrics:
    """How an SAE does at its site on a batch of tokens."""

    ce_clean: float
    """Cross-entropy of the unmodified model."""
    ce_spliced: float
    """Cross-entropy with the SAE spliced as a bottleneck (the model runs on x_hat)."""
    ce_ablated: float
    """Cross-entropy with the site's activation set to zero."""
    ce_loss_recovered: float
    """(ce_ablated - ce_spliced) / (ce_ablated - ce_clean)."""
    kl_spliced: float
    """KL(model || bottleneck-spliced model), mean over positions, in nats."""
    explained_variance: float
    """1 - SSE / total sum of squares about the mean."""
    mse: float
    """Mean squared reconstruction error per element."""
    l0: float
    """Mean number of active latents per token."""
    n_tokens: int
    """Tokens the reconstruction statistics were measured on."""

    def to_dict(self) -> dict[str, float]:
        return asdict(self)


@torch.inference_mode()
def splice_metrics(model: Any, sae: Any, tokens: Int[Tensor, "batch pos"], *, mask: Bool[Tensor, "batch pos"] | None = None,
                   site: Site | None = None, exclude_first_position: bool = True,
                   checks: SpliceChecks | None = None) -> SpliceMetrics:
    """Measure `sae` at its site (or `site`) on `tokens`.

    `mask` marks the real tokens of a right-padded batch (`padded_tokens` gives both); padding is
    left out of every statistic. `exclude_first_position` leaves position 0 (BOS, whose residual
    norm is an outlier in most models) out of the reconstruction statistics; the losses use every
    real position.
    """
    if mask is not None and (mask.shape != tokens.shape or mask.dtype != torch.bool or not mask[:, 0].all()
                             or (mask[:, 1:] & ~mask[:, :-1]).any()):
        raise ValueError(f"mask must be a bool tensor of the tokens' shape {tuple(tokens.shape)} marking a "
                         "non-empty prefix of each row (right padding)")
    saes = {site: sae} if site is not None else sae
    logits_clean = tl_compat.forward_logits(model, tokens)
    with splice(model, saes, error_term=False, cache=True, checks=checks) as state:
        logits_spliced = tl_compat.forward_logits(model, tokens)
    (site_used, record), = state.records.items()
    with tl_compat.hooks(model, [(site_used.hook_name, torch.zeros_like)]):
        logits_ablated = tl_compat.forward_logits(model, tokens)
    start = 1 if exclude_first_position and tokens.shape[1] > 1 else 0
    keep = torch.ones_like(tokens, dtype=torch.bool) if mask is None else mask.to(tokens.device)
    scored = keep.clone()
    scored[:, :start] = False
    x = record.inputs[scored]  # (token, d_in)
    x_hat = x - record.error[scored]
    z = record.latents[scored]
    ce_clean = cross_entropy(logits_clean, tokens, keep).item()
    ce_spliced = cross_entropy(logits_spliced, tokens, keep).item()
    ce_ablated = cross_entropy(logits_ablated, tokens, keep).item()
    return SpliceMetrics(
        ce_clean=ce_clean, ce_spliced=ce_spliced, ce_ablated=ce_ablated,
        ce_loss_recovered=ce_loss_recovered(ce_clean, ce_spliced, ce_ablated),
        kl_spliced=kl_divergence(logits_clean, logits_spliced, keep).item(),
        explained_variance=explained_variance(x, x_hat).item(),
        mse=mse(x, x_hat).item(), l0=l0(z).item(), n_tokens=z.shape[0],
    )
