"""The hand-written TopK / BatchTopK / AuxK step (training/trainer/topk_step.py) against autograd.

The references are independent of the step: the SAE's own `encode`/`decode` (TopK), SAELens's
`BatchTopK` activation and `calculate_topk_aux_acts` (AuxK's dead-latent selection), all in
float64 through autograd.
"""

from __future__ import annotations

import pytest
import torch

from sae import SAEConfig, SparseAutoencoder
from training.trainer.topk_step import TopKGradients

D_IN, D_SAE, K, BATCH = 12, 40, 4, 48
ALPHA = 0.3


def _sae(architecture: str, centred: bool, *, unit_rows: bool, seed: int = 0) -> SparseAutoencoder:
    cfg = SAEConfig(d_in=D_IN, d_sae=D_SAE, dtype="float64", apply_b_dec_to_input=centred,
                    architecture=architecture, k=K if architecture == "topk" else None)
    sae = SparseAutoencoder(cfg, generator=torch.Generator().manual_seed(seed))
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in (sae.W_enc, sae.b_enc, sae.W_dec, sae.b_dec):
            p.add_(0.3 * torch.randn(p.shape, generator=gen, dtype=p.dtype))
        if unit_rows:
            sae.W_dec.div_(sae.W_dec.norm(dim=-1, keepdim=True))
    return sae


def _dead_mask() -> torch.Tensor:
    dead = torch.zeros(D_SAE, dtype=torch.bool)
    dead[::3] = True  # 14 dead latents: more than k_aux = 6, so the AuxK scale is 1 and k_aux binds
    return dead


def _autograd(sae: SparseAutoencoder, x: torch.Tensor, dead: torch.Tensor | None, *, batch_level: bool,
              unit_rows: bool) -> tuple[torch.Tensor, dict[str, torch.Tensor], torch.Tensor]:
    from sae_lens.saes.batchtopk_sae import BatchTopK
    from sae_lens.saes.topk_sae import calculate_topk_aux_acts

    params = {n: p.detach().clone().requires_grad_(True) for n, p in sae.named_parameters() if n != "threshold"}
    W_dec = params["W_dec"] / params["W_dec"].norm(dim=-1, keepdim=True) if unit_rows else params["W_dec"]
    c = params["b_dec"] if sae.cfg.apply_b_dec_to_input else 0.0
    h = (x - c) @ params["W_enc"] + params["b_enc"]
    if batch_level:
        z = BatchTopK(K)(h)
    else:
        top = h.topk(K, dim=-1)
        z = torch.zeros_like(h).scatter(-1, top.indices, top.values.relu())
    x_hat = z @ W_dec + params["b_dec"]
    loss = (x_hat - x).pow(2).sum(-1).mean()
    if dead is not None:
        k_aux = D_IN // 2
        scale = min(int(dead.sum()) / k_aux, 1.0)
        z_aux = calculate_topk_aux_acts(min(k_aux, int(dead.sum())), h.relu(), dead)
        loss = loss + ALPHA * scale * (z_aux @ W_dec - (x - x_hat).detach()).pow(2).sum(-1).mean()
    loss.backward()
    return loss.detach(), {n: p.grad for n, p in params.items()}, z.detach()


@pytest.mark.parametrize("batch_level", [False, True], ids=["topk", "batchtopk"])
@pytest.mark.parametrize("centred", [True, False])
@pytest.mark.parametrize("auxk", [True, False])
@pytest.mark.parametrize("unit_rows", [True, False])
def test_gradients_equal_autograd(batch_level, centred, auxk, unit_rows):
    """With unit rows the reference normalises W_dec inside the loss: its gradient is the projected one."""
    sae = _sae("jumprelu" if batch_level else "topk", centred, unit_rows=unit_rows)
    x = torch.randn(BATCH, D_IN, generator=torch.Generator().manual_seed(7), dtype=torch.float64) + 0.5
    dead = _dead_mask() if auxk else None
    expected_loss, expected, expected_z = _autograd(sae, x, dead, batch_level=batch_level, unit_rows=unit_rows)
    step = TopKGradients(sae, k=K, batch_level=batch_level, auxk_coefficient=ALPHA, unit_norm_decoder=unit_rows)
    for _ in range(2):  # the second call reuses every buffer
        out = step(x, 0.0, dead)
        torch.testing.assert_close(out.mse + out.penalty, expected_loss, rtol=1e-12, atol=0)
        for name, grad in expected.items():
            torch.testing.assert_close(getattr(sae, name).grad, grad, rtol=1e-10, atol=1e-12, msg=name)
    # the same selection; values to rounding ((x - c) @ W_enc is computed as x @ W_enc - c @ W_enc)
    assert torch.equal(out.z > 0, expected_z > 0)
    torch.testing.assert_close(out.z, expected_z, rtol=1e-12, atol=1e-12)
    assert (out.penalty > 0) == auxk
    assert torch.equal(out.fired, torch.count_nonzero(out.z, dim=0))
    if batch_level:
        assert int((out.z > 0).sum()) == K * BATCH
    else:
        assert (torch.count_nonzero(out.z, dim=-1) <= K).all()


def test_small_dead_count_scales_auxk():
    """Fewer dead latents than k_aux: k_aux shrinks to n_dead and the loss is scaled by n_dead / k_aux."""
    sae = _sae("topk", True, unit_rows=True)
    x = torch.randn(BATCH, D_IN, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    dead = torch.zeros(D_SAE, dtype=torch.bool)
    dead[[2, 9]] = True
    loss, expected, _ = _autograd(sae, x, dead, batch_level=False, unit_rows=True)
    out = TopKGradients(sae, k=K, batch_level=False, auxk_coefficient=ALPHA)(x, 0.0, dead)
    torch.testing.assert_close(out.mse + out.penalty, loss, rtol=1e-12, atol=0)
    for name, grad in expected.items():
        torch.testing.assert_close(getattr(sae, name).grad, grad, rtol=1e-10, atol=1e-12, msg=name)


def test_batchtopk_threshold_reproduces_the_training_selection():
    """The JumpReLU SAELens saves a BatchTopK as, with this batch's threshold, gives the batch's z exactly."""
    sae = _sae("jumprelu", True, unit_rows=True)
    x = torch.randn(BATCH, D_IN, generator=torch.Generator().manual_seed(11), dtype=torch.float64)
    step = TopKGradients(sae, k=K, batch_level=True, auxk_coefficient=ALPHA)
    out = step(x, 0.0, None)
    with torch.no_grad():
        sae.threshold.fill_(float(out.threshold))
        encoded = sae.encode(x)
    assert torch.equal(encoded > 0, out.z > 0)  # the same latents on every token
    torch.testing.assert_close(encoded, out.z, rtol=1e-12, atol=1e-12)  # values to the rounding of h
    # after_step_ with step 1 takes this batch's threshold as the running one
    step.after_step_(1)
    assert torch.equal(sae.threshold, torch.full((D_SAE,), float(out.threshold), dtype=torch.float64))
    assert torch.allclose(sae.W_dec.norm(dim=-1), torch.ones(D_SAE, dtype=torch.float64))


@pytest.mark.parametrize("crowded", [False, True], ids=["row_candidates", "flat_fallback"])
def test_batchtopk_selection_equals_saelens_on_either_candidate_path(crowded):
    """The selection comes from each row's top 4k unless one row holds more of the batch's top kB
    than that (`crowded`: one row outshines every other), when the flat top is taken."""
    from sae_lens.saes.batchtopk_sae import BatchTopK

    sae = _sae("jumprelu", False, unit_rows=True)
    x = torch.randn(BATCH, D_IN, generator=torch.Generator().manual_seed(13), dtype=torch.float64)
    step = TopKGradients(sae, k=K, batch_level=True, auxk_coefficient=0.0)
    if crowded:
        x[0] *= 1000.0  # row 0 is positive on about half of its 40 latents, each above any other row's
    out = step(x, 0.0, None)
    with torch.no_grad():
        h = sae.pre_activations(x)
        rows = h.relu().topk(4 * K, dim=-1).values
        n_keep = K * BATCH
        pool_min = rows.flatten().topk(n_keep + 1).values[-1]
        assert (rows.min(-1).values.max() > pool_min) == crowded  # the path this case means to take
        expected = BatchTopK(K)(h)
    assert torch.equal(out.z > 0, expected > 0)
    torch.testing.assert_close(out.z, expected, rtol=1e-12, atol=1e-12)


def test_running_threshold_is_a_mean_then_an_ema():
    sae = _sae("jumprelu", True, unit_rows=True)
    step = TopKGradients(sae, k=K, batch_level=True, auxk_coefficient=0.0, threshold_lr=0.25)
    gen = torch.Generator().manual_seed(5)
    seen, expected = [], 0.0
    for t in range(1, 9):
        out = step(torch.randn(BATCH, D_IN, generator=gen, dtype=torch.float64), 0.0, None)
        seen.append(float(out.threshold))
        rate = max(0.25, 1 / t)
        expected += rate * (seen[-1] - expected)
        step.after_step_(t)
        if t == 4:
            assert sae.threshold[0].item() == pytest.approx(sum(seen) / 4, rel=1e-12)
    assert sae.threshold[0].item() == pytest.approx(expected, rel=1e-12)


def test_rejects_mismatched_saes():
    with pytest.raises(ValueError, match="'topk'"):
        TopKGradients(SparseAutoencoder(SAEConfig(d_in=4, d_sae=8)), k=2, batch_level=False, auxk_coefficient=0.0)
    with pytest.raises(ValueError, match="k=3"):
        TopKGradients(SparseAutoencoder(SAEConfig(d_in=4, d_sae=8, architecture="topk", k=2)), k=3,
                      batch_level=False, auxk_coefficient=0.0)
    with pytest.raises(ValueError, match="'jumprelu'"):
        TopKGradients(SparseAutoencoder(SAEConfig(d_in=4, d_sae=8, architecture="topk", k=2)), k=2,
                      batch_level=True, auxk_coefficient=0.0)
