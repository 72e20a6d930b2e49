"""Training metrics: reconstruction statistics of a batch and latent firing statistics.

Definitions (closed-form tests in tests/test_training_metrics.py):
- MSE, explained variance and L0 are `sae.metrics`'s (one definition in the project);
- L1 = mean over tokens of `sum_i z_i ||W_dec[i]||` (the penalty actually optimised);
- a latent is dead when it has not fired (z > 0) on any of the last `window` tokens it saw;
- a latent is dense when it fired on more than `threshold` of the tokens since the last log.
"""

from __future__ import annotations

from typing import Any

import torch
from jaxtyping import Float, Int
from torch import Tensor

from sae.metrics import explained_variance, l0, mse


@torch.no_grad()
def batch_metrics(x: Float[Tensor, "batch d_in"], x_hat: Float[Tensor, "batch d_in"], z: Float[Tensor, "batch d_sae"],
                  decoder_norms: Float[Tensor, " d_sae"], *, scale: float = 1.0) -> dict[str, float]:
    """MSE, explained variance, L0 and decoder-norm-weighted L1 of one batch.

    `x` and `x_hat` are in the trainer's normalized units (the activations divided by `scale`);
    MSE is reported in the activations' own units (times `scale**2`), so that the training log's
    `mse` and the evaluation's `eval/mse` are one quantity. Explained variance does not depend on
    the scale.
    """
    return {"mse": mse(x, x_hat).item() * scale**2, "explained_variance": explained_variance(x, x_hat).item(),
            "l0": l0(z).item(), "l1": (z @ decoder_norms).mean().item()}


class FiringTracker:
    """Per-latent firing counters of one SAE: tokens since each latent last fired, and counts
    since the last log (for the dense fraction)."""

    def __init__(self, d_sae: int) -> None:
        self.tokens_since_fired = torch.zeros(d_sae, dtype=torch.long)
        self.window_counts = torch.zeros(d_sae, dtype=torch.long)
        self.window_tokens = 0

    @torch.no_grad()
    def update_(self, fired_counts: Int[Tensor, " d_sae"], n_tokens: int) -> None:
        """Record a batch of `n_tokens` in which latent i fired on `fired_counts[i]` tokens."""
        self.tokens_since_fired += n_tokens
        self.tokens_since_fired[fired_counts > 0] = 0
        self.window_counts += fired_counts
        self.window_tokens += n_tokens

    def dead_mask(self, window_tokens: int) -> Tensor:
        return self.tokens_since_fired >= window_tokens

    def dead_fraction(self, window_tokens: int) -> float:
        return self.dead_mask(window_tokens).float().mean().item()

    def dense_fraction(self, threshold: float) -> float:
        if self.window_tokens == 0:
            return 0.0
        return (self.window_counts.double() / self.window_tokens > threshold).double().mean().item()

    def reset_window_(self) -> None:
        self.window_counts.zero_()
        self.window_tokens = 0

    def revive_(self, latents: Tensor) -> None:
        """Resampled latents start a fresh dead-window count."""
        self.tokens_since_fired[latents] = 0

    def state_dict(self) -> dict[str, Any]:
        return {"tokens_since_fired": self.tokens_since_fired.clone(), "window_counts": self.window_counts.clone(),
                "window_tokens": self.window_tokens}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.tokens_since_fired = state["tokens_since_fired"].clone()
        self.window_counts = state["window_counts"].clone()
        self.window_tokens = int(state["window_tokens"])
