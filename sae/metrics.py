"""Metric formulas shared by training and patching: reconstruction, loss and plain statistics.

Pure functions of tensors (no model, no SAE object), so that the trainer's log and the splice
evaluation compute one quantity one way. Closed-form tests in tests/test_metrics.py.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor


def cross_entropy(logits: Float[Tensor, "batch pos vocab"], tokens: Int[Tensor, "batch pos"],
                  mask: Bool[Tensor, "batch pos"] | None = None) -> Float[Tensor, ""]:
    """Mean next-token NLL; with `mask`, only over targets that are real tokens."""
    nll = -logits[:, :-1].float().log_softmax(-1).gather(-1, tokens[:, 1:, None]).squeeze(-1)
    return nll.mean() if mask is None else nll[mask[:, 1:]].mean()


def kl_divergence(logits_p: Float[Tensor, "... vocab"], logits_q: Float[Tensor, "... vocab"],
                  mask: Bool[Tensor, "..."] | None = None) -> Float[Tensor, ""]:
    """KL(p || q) per position, averaged over the positions (those in `mask`, when given)."""
    log_p, log_q = logits_p.float().log_softmax(-1), logits_q.float().log_softmax(-1)
    kl = (log_p.exp() * (log_p - log_q)).sum(-1)
    return kl.mean() if mask is None else kl[mask].mean()


def explained_variance(x: Float[Tensor, "token d_in"], x_hat: Float[Tensor, "token d_in"]) -> Float[Tensor, ""]:
    x, x_hat = x.float(), x_hat.float()
    residual = (x - x_hat).pow(2).sum()
    total = (x - x.mean(0)).pow(2).sum()
    return 1 - residual / total


MASSIVE_NORM_RATIO = 10.0
"""An activation whose norm exceeds this multiple of the median norm around it counts as massive."""


def massive(x: Float[Tensor, "token d_in"], ratio: float = MASSIVE_NORM_RATIO) -> Tensor:
    """Which rows are massive activations (Sun et al. 2024): L2 norm over `ratio` x the median
    norm of the rows given, `(token,)` bool. At SmolLM2-135M's layer 15 they sit near 100x the
    median, with hardly any rows between 2x and 5x, so the exact ratio matters little."""
    norms = x.float().norm(dim=-1)
    return norms > ratio * norms.median()


def mse(x: Float[Tensor, "token d_in"], x_hat: Float[Tensor, "token d_in"]) -> Float[Tensor, ""]:
    return (x.float() - x_hat.float()).pow(2).mean()


def l0(z: Float[Tensor, "token d_sae"]) -> Float[Tensor, ""]:
    return (z != 0).float().sum(-1).mean()


def ce_loss_recovered(ce_clean: float, ce_spliced: float, ce_ablated: float) -> float:
    return (ce_ablated - ce_spliced) / (ce_ablated - ce_clean)


def median(values: Tensor | Sequence[float], dim: int = 0) -> Tensor:
    """The true median along `dim`: the mean of the two middle values for an even count (torch's
    `median` returns the lower one, so of four pairs it reports the second-lowest). NaN entries
    (e.g. pairs left out of a curve) are skipped; an all-NaN or empty slice gives NaN."""
    values = torch.as_tensor(values)
    values = values if values.is_floating_point() else values.double()
    if values.shape[dim] == 0:
        return torch.full(values.sum(dim).shape, float("nan"), dtype=values.dtype)
    return values.nanquantile(0.5, dim=dim)
