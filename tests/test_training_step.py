"""The hand-written L1 step (training/step.py) against autograd on the SAE's own encode/decode."""

from __future__ import annotations

import pytest
import torch

from sae import SAEConfig, SparseAutoencoder
from training.trainer.step import L1Gradients


def _sae(centred: bool, seed: int = 0) -> SparseAutoencoder:
    cfg = SAEConfig(d_in=12, d_sae=40, dtype="float64", apply_b_dec_to_input=centred)
    sae = SparseAutoencoder(cfg, generator=torch.Generator().manual_seed(seed))
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in sae.parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=gen, dtype=p.dtype))
        sae.b_enc[:10] = -50.0  # ten latents that never fire: their gradients must be exactly the L1-free ones
        sae.W_dec[3] = 0.0  # a zero decoder row: autograd's norm gradient is 0 there
    return sae


def _autograd(sae: SparseAutoencoder, x: torch.Tensor, lam: float) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    sae.zero_grad(set_to_none=True)
    z = sae.encode(x)
    loss = (sae.decode(z) - x).pow(2).sum(-1).mean() + lam * (z @ sae.W_dec.norm(dim=-1)).mean()
    loss.backward()
    grads = {name: p.grad.clone() for name, p in sae.named_parameters()}
    sae.zero_grad(set_to_none=True)
    return loss.detach(), grads


@pytest.mark.parametrize("centred", [True, False])
def test_gradients_equal_autograd(centred: bool) -> None:
    sae = _sae(centred)
    x = torch.randn(64, 12, generator=torch.Generator().manual_seed(7), dtype=torch.float64) + 0.5
    lam = 0.7
    expected_loss, expected = _autograd(sae, x, lam)
    step = L1Gradients(sae)
    for _ in range(2):  # the second call reuses every buffer
        out = step(x, lam)
        assert torch.allclose(out.mse + lam * out.l1, expected_loss, rtol=1e-12, atol=0)
        for name, p in sae.named_parameters():
            assert torch.allclose(p.grad, expected[name], rtol=1e-10, atol=1e-12), name
    with torch.no_grad():
        z = sae.encode(x)
    assert torch.allclose(out.z, z, rtol=1e-12, atol=1e-12)
    assert torch.allclose(out.x_hat, sae.decode(z), rtol=1e-12, atol=1e-12)
    assert torch.equal(out.fired, torch.count_nonzero(out.z, dim=0))
    assert (out.fired[:10] == 0).all() and out.fired.sum() > 0


def test_gradient_buffers_are_reused_across_steps() -> None:
    sae = _sae(True)
    step = L1Gradients(sae)
    x = torch.randn(32, 12, dtype=torch.float64)
    step(x, 1.0)
    before = {name: p.grad for name, p in sae.named_parameters()}
    z_before = step(x, 1.0).z
    assert all(p.grad is before[name] for name, p in sae.named_parameters())
    assert step(x, 1.0).z.data_ptr() == z_before.data_ptr()
    # a different batch size gets new (B, d_sae) buffers and the same gradient tensors
    assert step(x[:5], 1.0).z.shape == (5, 40)


def test_rejects_other_architectures() -> None:
    with pytest.raises(ValueError, match="standard"):
        L1Gradients(SparseAutoencoder(SAEConfig(d_in=4, d_sae=8, architecture="topk", k=2)))
