"""`error_share`: the latents' and the error node's shares of a pair's denoising effect at an SAE
site, checked against a hand computation on an affine toy and against plain TransformerLens hooks."""

from __future__ import annotations

import pytest
import torch

from conftest import construct_unchecked, make_sae, unchecked
from patching import ErrorShare, ErrorShareConfig, LogitDiff, error_share
from patching.errors import PatchingError
from patching.model import tl_compat

METRIC = LogitDiff(answer=2, wrong=3)
SITE = "blocks.1.hook_resid_pre"


@pytest.fixture(scope="module")
def affine():
    """Layer 1 writes nothing and there is no final norm, so the logits are an affine function of
    `blocks.1.hook_resid_pre`: effects of patches at that site add."""
    model = tl_compat.random_model(n_layers=2, d_model=16, d_head=4, n_heads=4, d_mlp=32, d_vocab=50,
                                   normalization_type=None, seed=3)
    with torch.no_grad():
        block = model.blocks[1]
        for param in (block.attn.W_O, block.attn.b_O, block.mlp.W_out, block.mlp.b_out):
            param.zero_()
        model.unembed.W_U.mul_(20.0)  # spans of a few logits, well above the engine's tolerance
    sae = make_sae(16, 24, hook_name=SITE, model_name=model.cfg.model_name, seed=5)
    return model.eval(), sae


def pair_tokens(seed: int, n: int = 2, length: int = 9) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, 50, (n, length), generator=gen), torch.randint(0, 50, (n, length), generator=gen)


def site_value(model, tokens):
    _, cache = model.run_with_cache(tokens, names_filter=SITE)
    return cache[SITE]


def test_affine_toy_shares_add_and_match_the_hand_computation(affine):
    model, sae = affine
    clean, corrupted = pair_tokens(4)
    result = error_share(model, sae, clean, corrupted, METRIC)
    with torch.no_grad():
        x_clean, x_corr = site_value(model, clean), site_value(model, corrupted)
        d_clean, d_corr = sae.decode(sae.encode(x_clean)), sae.decode(sae.encode(x_corr))
        readout = model.W_U[:, 2] - model.W_U[:, 3]  # the metric's direction in the residual
        span = (x_clean - x_corr)[:, -1] @ readout
        latents = (d_clean - d_corr)[:, -1] @ readout / span
        error = ((x_clean - d_clean) - (x_corr - d_corr))[:, -1] @ readout / span
    assert result.sites == [SITE] and result.latents.shape == (2, 1) and (span.abs() > 0.5).all()
    torch.testing.assert_close(result.latents[:, 0], latents, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(result.error[:, 0], error, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(result.latents + result.error, result.total, atol=1e-4, rtol=0)
    torch.testing.assert_close(result.total, torch.ones(2, 1), atol=1e-4, rtol=0)
    assert (result.error.abs() > 1e-2).all(), "a toy whose error node carries nothing checks nothing"


def hooked_metric(model, corrupted, value):
    """The metric on the corrupted prompt with the site's activation set to `value` by a plain hook."""
    logits = model.run_with_hooks(corrupted, fwd_hooks=[(SITE, lambda act, hook: value)])
    return logits[:, -1, 2] - logits[:, -1, 3]


def test_random_model_matches_plain_hooks(tiny_model, tiny_sae):
    """Non-linear model: each share is the effect of setting the site to decode(z_clean) + e_corr
    (latents) or decode(z_corr) + e_clean (error), computed here without the engine or the splice."""
    clean, corrupted = pair_tokens(0, n=3, length=10)
    result = error_share(tiny_model, tiny_sae, clean, corrupted, METRIC, batch_size=2)
    with torch.no_grad():
        x_clean, x_corr = site_value(tiny_model, clean), site_value(tiny_model, corrupted)
        d_clean, d_corr = tiny_sae.decode(tiny_sae.encode(x_clean)), tiny_sae.decode(tiny_sae.encode(x_corr))
        m_clean, m_corr = hooked_metric(tiny_model, clean, x_clean), hooked_metric(tiny_model, corrupted, x_corr)
        span = m_clean - m_corr
        latents = (hooked_metric(tiny_model, corrupted, d_clean + (x_corr - d_corr)) - m_corr) / span
        error = (hooked_metric(tiny_model, corrupted, d_corr + (x_clean - d_clean)) - m_corr) / span
    torch.testing.assert_close(result.metric_clean, m_clean, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(result.latents[:, 0], latents, atol=1e-3, rtol=1e-3)
    torch.testing.assert_close(result.error[:, 0], error, atol=1e-3, rtol=1e-3)
    torch.testing.assert_close(result.total, torch.ones(3, 1), atol=1e-3, rtol=0)
    assert (result.latents + result.error - result.total).abs().max() > 1e-3, "non-linear: the shares need not add"


def test_saved_result_round_trips(affine, tmp_path):
    model, sae = affine
    clean, corrupted = pair_tokens(5)
    result = error_share(model, sae, clean, corrupted, METRIC)
    loaded = ErrorShare.load(result.save(tmp_path / "share"))
    for name in ("latents", "error", "total", "metric_clean", "metric_corrupted"):
        torch.testing.assert_close(getattr(loaded, name), getattr(result, name))
    assert loaded.provenance["unit"] == "error_share" and loaded.provenance["prompts"]["base"]
    frame = loaded.to_dataframe()
    assert list(frame["site"]) == [SITE, SITE] and frame["latents"].tolist() == result.latents[:, 0].tolist()
    assert (tmp_path / "share" / "plot.png").stat().st_size > 0


def test_bad_settings_are_refused_before_any_forward(affine):
    model, sae = affine
    clean, corrupted = pair_tokens(3)
    calls = []
    handle = model.blocks[0].register_forward_hook(lambda *args: calls.append(1))
    try:
        with pytest.raises(PatchingError, match="unknown ErrorShareConfig fields"):
            error_share(model, sae, clean, corrupted, METRIC, direction="noise")
        with pytest.raises(PatchingError, match="progress"):
            construct_unchecked(ErrorShareConfig, progress="yes")
        with pytest.raises(PatchingError, match="config must be a ErrorShareConfig"):
            unchecked(error_share)(model, sae, clean, corrupted, METRIC, config=object())
        with pytest.raises(PatchingError, match="batch_size"):
            error_share(model, sae, clean, corrupted, METRIC, batch_size=0)
        with pytest.raises(PatchingError, match="token ids outside"):
            error_share(model, sae, clean, corrupted, LogitDiff(answer=2, wrong=999))
    finally:
        handle.remove()
    assert calls == []


def test_several_sites_give_each_site_its_own_shares(tiny_model, tiny_sae):
    """With SAEs at two sites, each column is that site's shares: the other SAE is spliced but, with
    its error node, reproduces the model exactly, so one call per site gives the same values."""
    other = make_sae(tiny_model.cfg.d_model, 40, hook_name="blocks.2.hook_resid_pre",
                     model_name=tiny_model.cfg.model_name, seed=7)
    clean, corrupted = pair_tokens(0, n=2, length=10)
    both = error_share(tiny_model, {SITE: tiny_sae, "blocks.2.hook_resid_pre": other}, clean, corrupted, METRIC)
    assert both.sites == [SITE, "blocks.2.hook_resid_pre"] and both.latents.shape == (2, 2)
    for s, sae in enumerate((tiny_sae, other)):
        alone = error_share(tiny_model, sae, clean, corrupted, METRIC)
        for name in ("latents", "error", "total"):
            torch.testing.assert_close(getattr(both, name)[:, s], getattr(alone, name)[:, 0], atol=1e-4, rtol=1e-4)
    assert not torch.allclose(both.latents[:, 0], both.latents[:, 1], atol=1e-3)
