"""SparseAutoencoder maths against naive computations."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from sae import SAEConfig, SAEConfigError, SparseAutoencoder
from tests.conftest import construct_unchecked, make_sae


def naive_encode(sae: SparseAutoencoder, x: torch.Tensor) -> torch.Tensor:
    """Per-token, per-latent loops: the DESIGN.md formula written out."""
    s = sae.cfg.normalization_scale or 1.0
    out = torch.zeros(x.shape[0], sae.d_sae, dtype=torch.float64)
    W_enc, b_enc, b_dec = sae.W_enc.double(), sae.b_enc.double(), sae.b_dec.double()
    for t in range(x.shape[0]):
        centred = x[t].double() / s - (b_dec if sae.cfg.apply_b_dec_to_input else 0)
        h = torch.stack([centred @ W_enc[:, i] + b_enc[i] for i in range(sae.d_sae)])
        if sae.cfg.architecture == "standard":
            out[t] = h.clamp(min=0)
        elif sae.cfg.architecture == "jumprelu":
            out[t] = torch.where(h > sae.threshold.double(), h.clamp(min=0), torch.zeros_like(h))
        else:
            keep = sorted(range(sae.d_sae), key=lambda i: -h[i].item())[: sae.cfg.k]
            for i in keep:
                out[t, i] = max(h[i].item(), 0.0)
    return out


def naive_decode(sae: SparseAutoencoder, z: torch.Tensor) -> torch.Tensor:
    s = sae.cfg.normalization_scale or 1.0
    return torch.stack([(sum(z[t, i].double() * sae.W_dec[i].double() for i in range(sae.d_sae)) + sae.b_dec.double()) * s
                        for t in range(z.shape[0])])


@pytest.mark.parametrize("architecture,k", [("standard", None), ("topk", 5), ("jumprelu", None)])
@pytest.mark.parametrize("scale", [None, 3.0])
def test_encode_decode_match_naive(architecture, k, scale):
    sae = make_sae(8, 20, hook_name=None, model_name=None, architecture=architecture, k=k, normalization_scale=scale)
    x = torch.randn(6, 8, generator=torch.Generator().manual_seed(3)) * 2
    z = sae.encode(x)
    torch.testing.assert_close(z.double(), naive_encode(sae, x), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(sae.decode(z).double(), naive_decode(sae, z), atol=1e-5, rtol=1e-5)
    if architecture == "topk":
        assert ((z != 0).sum(-1) <= k).all()
        # Fewer than k positive pre-activations: the ReLU on the k kept values must act too.
        with torch.no_grad():
            sae.b_enc.sub_(6.0)
        assert ((sae.pre_activations(x) > 0).sum(-1) < k).any()
        torch.testing.assert_close(sae.encode(x).double(), naive_encode(sae, x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("architecture,k", [("standard", None), ("topk", 4), ("jumprelu", None)])
def test_forward_is_decode_of_encode(architecture, k):
    sae = make_sae(8, 16, hook_name=None, model_name=None, architecture=architecture, k=k)
    x = torch.randn(2, 5, 8)
    out = sae(x)
    assert torch.equal(out.latents, sae.encode(x))
    assert torch.equal(out.reconstruction, sae.decode(sae.encode(x)))
    assert torch.equal(out.latents, sae.activation(out.pre_activations))


def test_decode_delta_is_exact_difference_and_zero_where_equal():
    sae = make_sae(8, 16, hook_name=None, model_name=None)
    z = sae.encode(torch.randn(4, 8))
    z2 = z.clone()
    z2[1, 3] += 2.5
    delta = sae.decode_delta(z2, z)
    assert torch.equal(delta[[0, 2, 3]], torch.zeros(3, 8))
    torch.testing.assert_close(delta, sae.decode(z2) - sae.decode(z), atol=1e-6, rtol=0)


def test_l1_penalty_weights_by_decoder_norm_and_is_rescale_invariant():
    sae = make_sae(6, 10, hook_name=None, model_name=None)
    x = torch.randn(5, 6)
    z = sae.encode(x)
    expected = torch.stack([sum(z[t, i] * sae.W_dec[i].norm() for i in range(10)) for t in range(5)])
    torch.testing.assert_close(sae.l1_penalty(z), expected)
    # Scale latent 0's encoder by c and its decoder row by 1/c: same output, same penalty.
    other = make_sae(6, 10, hook_name=None, model_name=None)
    with torch.no_grad():
        other.W_enc[:, 0] *= 4.0
        other.b_enc[0] *= 4.0
        other.W_dec[0] /= 4.0
    torch.testing.assert_close(other.l1_penalty(other.encode(x)), sae.l1_penalty(other.encode(x) * torch.tensor([0.25] + [1.0] * 9)))
    torch.testing.assert_close(other(x).reconstruction, sae(x).reconstruction, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("architecture,k", [("standard", None), ("topk", 4), ("jumprelu", None)])
def test_folding_the_normalization_scale_keeps_outputs(architecture, k):
    sae = make_sae(8, 16, hook_name=None, model_name=None, architecture=architecture, k=k, normalization_scale=7.5)
    folded = sae.folded()
    x = torch.randn(10, 8) * 7.5
    assert folded.cfg.normalization_scale is None
    assert folded.cfg.extra_metadata["folded_normalization_scale"] == 7.5
    torch.testing.assert_close(folded.encode(x), sae.encode(x), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(folded(x).reconstruction, sae(x).reconstruction, atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("bad", [
    dict(d_in=0), dict(d_sae=-3), dict(d_in=True), dict(architecture="gated"), dict(architecture="topk"),
    dict(architecture="topk", k=99), dict(k=3), dict(dtype="int8"), dict(normalization_scale=-1.0),
])
def test_config_rejects_inconsistent_fields(bad):
    with pytest.raises(SAEConfigError):
        construct_unchecked(SAEConfig, **{"d_in": 8, "d_sae": 16, **bad})


def test_config_is_frozen_and_copies_mappings():
    kwargs = {"fold_ln": True}
    cfg = SAEConfig(d_in=4, d_sae=8, model_from_pretrained_kwargs=kwargs)
    kwargs["fold_ln"] = False
    assert cfg.model_from_pretrained_kwargs == {"fold_ln": True}
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.d_in = 5  # type: ignore[misc]
