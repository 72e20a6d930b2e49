"""Metric formulas shared by training and patching: reconstruction, loss and plain statistics.

Pure functions of tensors (no model, no SAE object), so that the trainer's log and the splice
evaluation compute one quantity one way. Closed-form tests in tests/test_metrics.py.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any

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
    """1 - E||x - x_hat||^2 / E||x - E x||^2 over the tokens (rows), in float64.

    SAELens 6.54's `ExplainedVarianceCalculator` (the figure SAEBench reports), including its
    convention for no variance: 1 if the error is zero too, else 0. The total variance is summed
    over dimensions (not a mean of per-dimension R^2, and not a per-token ratio: SAELens's
    `explained_variance_legacy`). `explained_variance_from_sums` is the same figure streamed.
    """
    x, x_hat = x.double(), x_hat.double()
    error = (x - x_hat).pow(2).sum(-1).mean()
    variance = (x - x.mean(0)).pow(2).sum(-1).mean()
    if variance < 1e-10:
        return (error < 1e-10).double()
    return 1 - error / variance


def explained_variance_from_sums(sse: float, sum_sq: float, sum_x: Tensor, n: int) -> float:
    """`explained_variance` from running sums over batches: SSE = sum ||x - x_hat||^2, sum ||x||^2,
    sum x (float64, `(d_in,)`) and the token count: 1 - (SSE/n) / (E||x||^2 - ||E x||^2), as
    SAELens's `ExplainedVarianceCalculator.compute`. No tokens: NaN."""
    if n == 0:
        return float("nan")
    variance = sum_sq / n - (sum_x.double() / n).pow(2).sum().item()
    if variance < 1e-10:
        return 1.0 if sse / n < 1e-10 else 0.0
    return 1.0 - (sse / n) / variance


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
    """SAELens's `ce_loss_score`: (CE_ablated - CE_spliced) / (CE_ablated - CE_clean)."""
    return (ce_ablated - ce_spliced) / (ce_ablated - ce_clean)


def kl_div_score(kl_spliced: float, kl_ablated: float) -> float:
    """SAELens's `kl_div_score`: (KL_ablated - KL_spliced) / KL_ablated."""
    return (kl_ablated - kl_spliced) / kl_ablated


LEGACY_FIGURE_NAMES = {"ce_loss_recovered": "ce_loss_score", "ce_clean": "ce_loss_without_sae",
                       "ce_spliced": "ce_loss_with_sae", "ce_ablated": "ce_loss_with_ablation",
                       "kl_spliced": "kl_div_with_sae", "dead_fraction": "frac_dead", "dense_fraction": "frac_dense"}
"""Names the splice metrics, the trainer's eval log and the release registry used before the one
evaluator (`patching.splice.evaluate_sae`), mapped to its SAELens names; readable, with a
DeprecationWarning, for one release."""


def warn_legacy_name(owner: str, old: str) -> str:
    """Warn that `owner`'s figure `old` has a new name, and return it."""
    new = LEGACY_FIGURE_NAMES[old]
    warnings.warn(f"{owner} {old!r} is deprecated and will be removed in the next release; use {new!r} "
                  "(SAELens's name for the same figure)", DeprecationWarning, stacklevel=3)
    return new


class LegacyNamedFigures(dict):
    """Figures under SAELens's names (a release registry's held-out figures) whose old names
    (`LEGACY_FIGURE_NAMES`) still read, by `[]` or `.get`, with a DeprecationWarning."""

    def __missing__(self, key: str) -> Any:
        if LEGACY_FIGURE_NAMES.get(key) in self:
            return self[warn_legacy_name("the figure", key)]
        raise KeyError(key)

    def get(self, key: str, default: Any = None) -> Any:
        if key not in self and LEGACY_FIGURE_NAMES.get(key) in self:
            return self[warn_legacy_name("the figure", key)]
        return super().get(key, default)


def median(values: Tensor | Sequence[float], dim: int = 0) -> Tensor:
    """The true median along `dim`: the mean of the two middle values for an even count (torch's
    `median` returns the lower one, so of four pairs it reports the second-lowest). NaN entries
    (e.g. pairs left out of a curve) are skipped; an all-NaN or empty slice gives NaN."""
    values = torch.as_tensor(values)
    values = values if values.is_floating_point() else values.double()
    if values.shape[dim] == 0:
        return torch.full(values.sum(dim).shape, float("nan"), dtype=values.dtype)
    return values.nanquantile(0.5, dim=dim)
