"""Dead-latent resampling (Towards Monosemanticity): new weights and reset Adam moments."""

from __future__ import annotations

import torch

from sae import SAEConfig, SparseAutoencoder
from training.trainer.resample import resample_dead_


def _trained_sae_and_optimizer():
    torch.manual_seed(0)
    sae = SparseAutoencoder(SAEConfig(d_in=6, d_sae=10), generator=torch.Generator().manual_seed(0))
    optimizer = torch.optim.Adam(sae.parameters(), lr=1e-2)
    x = torch.randn(64, 6)
    for _ in range(3):  # give every parameter non-zero moments
        optimizer.zero_grad()
        out = sae(x)
        ((out.reconstruction - x).pow(2).sum(-1).mean() + out.latents.sum(-1).mean()).backward()
        optimizer.step()
    return sae, optimizer, x


def test_resampling_resets_adam_moments_of_exactly_the_resampled_latents():
    sae, optimizer, x = _trained_sae_and_optimizer()
    dead = torch.zeros(10, dtype=torch.bool)
    dead[[1, 4, 7]] = True
    before = {name: {k: v.clone() for k, v in optimizer.state[p].items()} for name, p in sae.named_parameters()}
    params_before = {name: p.detach().clone() for name, p in sae.named_parameters()}
    count = resample_dead_(sae, optimizer, dead, x, generator=torch.Generator().manual_seed(0), encoder_scale=0.2)
    assert count == 3
    state = {name: optimizer.state[p] for name, p in sae.named_parameters()}
    for key in ("exp_avg", "exp_avg_sq"):
        assert before["W_dec"][key][dead].abs().sum() > 0  # the reset is not vacuous
        assert (state["W_dec"][key][dead] == 0).all() and torch.equal(state["W_dec"][key][~dead], before["W_dec"][key][~dead])
        assert (state["W_enc"][key][:, dead] == 0).all()
        assert torch.equal(state["W_enc"][key][:, ~dead], before["W_enc"][key][:, ~dead])
        assert (state["b_enc"][key][dead] == 0).all() and torch.equal(state["b_enc"][key][~dead], before["b_enc"][key][~dead])
        assert torch.equal(state["b_dec"][key], before["b_dec"][key])
    # New weights: unit decoder rows, encoder columns along them at 0.2 x mean alive norm, zero bias.
    assert torch.allclose(sae.W_dec[dead].norm(dim=-1), torch.ones(3))
    alive_norm = params_before["W_enc"][:, ~dead].norm(dim=0).mean()
    assert torch.allclose(sae.W_enc[:, dead].norm(dim=0), torch.full((3,), 0.2 * alive_norm.item()), rtol=1e-5)
    assert torch.allclose(sae.W_enc[:, dead].T, sae.W_dec[dead] * 0.2 * alive_norm, rtol=1e-5)
    assert (sae.b_enc[dead] == 0).all()
    assert torch.equal(sae.W_dec[~dead], params_before["W_dec"][~dead])


def test_resampling_targets_badly_reconstructed_inputs():
    sae, optimizer, x = _trained_sae_and_optimizer()
    x = x.clone()
    x[5] = 100.0  # one input the SAE cannot reconstruct at all
    dead = torch.ones(10, dtype=torch.bool)
    dead[0] = False
    resample_dead_(sae, optimizer, dead, x, generator=torch.Generator().manual_seed(0))
    target = (x[5] - sae.b_dec) / (x[5] - sae.b_dec).norm()
    assert torch.allclose(sae.W_dec[dead], target.expand(9, -1), atol=1e-5)


def test_no_dead_latents_changes_nothing():
    sae, optimizer, x = _trained_sae_and_optimizer()
    params = {k: v.clone() for k, v in sae.state_dict().items()}
    assert resample_dead_(sae, optimizer, torch.zeros(10, dtype=torch.bool), x,
                          generator=torch.Generator().manual_seed(0)) == 0
    assert all(torch.equal(params[k], v) for k, v in sae.state_dict().items())
