"""Dead-latent resampling, as in Anthropic's "Towards Monosemanticity" (2023), appendix
"Neuron Resampling".

For each dead latent: draw an input with probability proportional to the square of the SAE's
reconstruction loss on it, so that revived latents go where the SAE is worst; set the decoder
row to that input's unit direction, the encoder column to the same direction scaled to
`encoder_scale` times the mean encoder norm of alive latents, the encoder bias to zero; and
reset Adam's moments for exactly those rows, columns and biases (stale moments would push the
new weights back at once). The paper samples from 819,200 inputs; we sample from the current
batch, which keeps resampling free of extra data reads and of extra resume state.
"""

from __future__ import annotations

import torch
from jaxtyping import Bool, Float
from torch import Tensor

from sae.model import SparseAutoencoder


@torch.no_grad()
def resample_dead_(sae: SparseAutoencoder, optimizer: torch.optim.Optimizer, dead: Bool[Tensor, " d_sae"],
                   x: Float[Tensor, "batch d_in"], *, generator: torch.Generator, encoder_scale: float = 0.2) -> int:
    """Re-initialise the dead latents of `sae` from the (normalized) inputs `x`; return how many."""
    index = dead.nonzero().squeeze(-1)
    n_dead = index.numel()
    if n_dead == 0:
        return 0
    centred = x - sae.b_dec if sae.cfg.apply_b_dec_to_input else x
    z = (centred @ sae.W_enc + sae.b_enc).relu()
    losses = (z @ sae.W_dec + sae.b_dec - x).pow(2).sum(-1)  # (batch,)
    weights = losses.pow(2)
    if not torch.isfinite(weights).all() or weights.sum() <= 0:
        weights = torch.ones_like(losses)
    chosen = torch.multinomial(weights, n_dead, replacement=True, generator=generator)
    # Directions relative to b_dec: what the decoder must add to the bias to reach the input.
    directions = x[chosen] - sae.b_dec
    directions = directions / directions.norm(dim=-1, keepdim=True).clamp_min(1e-8)  # (n_dead, d_in)
    alive = ~dead
    enc_norm = sae.W_enc[:, alive].norm(dim=0).mean() if alive.any() else torch.tensor(1.0)
    sae.W_dec[index] = directions
    sae.W_enc[:, index] = directions.T * enc_norm * encoder_scale
    sae.b_enc[index] = 0.0
    _reset_moments_(optimizer, sae.W_dec, index, dim=0)
    _reset_moments_(optimizer, sae.W_enc, index, dim=1)
    _reset_moments_(optimizer, sae.b_enc, index, dim=0)
    return n_dead


def _reset_moments_(optimizer: torch.optim.Optimizer, param: Tensor, index: Tensor, *, dim: int) -> None:
    state = optimizer.state.get(param, {})
    for key in ("exp_avg", "exp_avg_sq"):
        if key in state:
            state[key].index_fill_(dim, index, 0.0)
