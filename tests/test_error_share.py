"""`error_share`: the latents' and the error node's shares of a pair's denoising effect at an SAE
site, checked against a hand computation on an affine toy and against plain TransformerLens hooks; the
named pair set (`pair_set_error_share`) against plain hooks pair by pair, its medians and its threshold."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from conftest import construct_unchecked, make_sae, unchecked
from patching import (ErrorShare, ErrorShareConfig, LogitDiff, NamedPair, PairSetConfig, PairSetShares, error_share,
                      named_pairs, pair_set_error_share)
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


# --- the named pair set (`pair_set_error_share`) ------------------------------------------------

WORDED_SITE = "blocks.1.hook_resid_pre"
WORDED_PAIRS = (  # words w0..w46 are one token each; answers differ from the pair's tokens
    NamedPair("a", "factual", "w1 w2 w3 w4 w5 w6", "w1 w7 w3 w4 w5 w6", " w20", " w21"),
    NamedPair("b", "factual", "w8 w9 w10 w11 w12", "w8 w9 w13 w11 w12", " w22", " w23"),
    NamedPair("c", "ioi", "w14 w15 w16 w17 w18 w19 w2", "w14 w15 w16 w17 w18 w15 w2", " w24", " w25"),
    NamedPair("d", "ioi", "w30 w31 w32 w33", "w30 w34 w32 w33", " w26", " w27"),
    NamedPair("e", "ioi", "w35 w36 w37 w38 w39", "w40 w36 w37 w38 w39", " w28", " w29"),
)


@pytest.fixture(scope="module")
def worded(tmp_path_factory):
    from worded_model import worded_model

    model = worded_model(tmp_path_factory.mktemp("tokenizer"), n_layers=3, n_ctx=16)
    sae = make_sae(model.cfg.d_model, 40, hook_name=WORDED_SITE, model_name=model.cfg.model_name, seed=11)
    return model, sae


def _plain_shares(model, sae, pair):
    """One pair's three shares set by plain hooks (no engine, no splice), and its span."""
    clean, corrupted = model.to_tokens(pair.clean), model.to_tokens(pair.corrupted)
    answer, wrong = model.to_single_token(pair.answer), model.to_single_token(pair.wrong)

    def metric(tokens, value):
        logits = model.run_with_hooks(tokens, fwd_hooks=[(WORDED_SITE, lambda act, hook: value)])
        return float(logits[0, -1, answer] - logits[0, -1, wrong])

    with torch.no_grad():
        _, cache = model.run_with_cache(clean, names_filter=WORDED_SITE)
        x_clean = cache[WORDED_SITE]
        _, cache = model.run_with_cache(corrupted, names_filter=WORDED_SITE)
        x_corr = cache[WORDED_SITE]
        d_clean, d_corr = sae.decode(sae.encode(x_clean)), sae.decode(sae.encode(x_corr))
        m_clean, m_corr = metric(clean, x_clean), metric(corrupted, x_corr)
        span = m_clean - m_corr
        latents = (metric(corrupted, d_clean + (x_corr - d_corr)) - m_corr) / span
        error = (metric(corrupted, d_corr + (x_clean - d_clean)) - m_corr) / span
    return latents, error, span


def test_pair_set_matches_plain_hooks_and_medians_count_only_pairs_over_the_threshold(worded):
    model, sae = worded
    first = pair_set_error_share(model, sae, WORDED_PAIRS, span_threshold=1e-6)
    spans = first.span.tolist()
    for i, pair in enumerate(WORDED_PAIRS):
        latents, error, span = _plain_shares(model, sae, pair)
        assert first.latents[i].item() == pytest.approx(latents, abs=1e-3, rel=1e-3)
        assert first.error[i].item() == pytest.approx(error, abs=1e-3, rel=1e-3)
        assert spans[i] == pytest.approx(span, abs=1e-4, rel=1e-4)
    positive = sorted(s for s in spans if s > 0)
    assert len(positive) >= 2, f"spans {spans}: the toy needs pairs on both sides of a threshold"
    threshold = (positive[0] + positive[1]) / 2  # drops the smallest positive span and every negative one
    result = pair_set_error_share(model, sae, WORDED_PAIRS, config=PairSetConfig(span_threshold=threshold))
    assert result.counted.tolist() == [s >= threshold for s in spans]
    for group in ("factual", "ioi"):
        rows = [i for i, p in enumerate(WORDED_PAIRS) if p.group == group and spans[i] >= threshold]
        median = result.medians()[group]
        assert median["n_pairs"] == sum(p.group == group for p in WORDED_PAIRS) and median["n_counted"] == len(rows)
        for name in ("latents", "error", "total"):
            expected = float(np.median(getattr(first, name)[rows].numpy())) if rows else None
            assert median[name] == (pytest.approx(expected, abs=1e-6) if rows else None)


def test_pair_set_saves_and_writes_a_strict_json_registry_block(worded, tmp_path):
    model, sae = worded
    result = pair_set_error_share(model, sae, WORDED_PAIRS[:3], span_threshold=1e-6)
    block = json.loads(json.dumps(result.registry_block(), allow_nan=False))
    assert block["site"] == WORDED_SITE and set(block["pairs"]) == {"a", "b", "c"}
    assert block["pairs"]["a"]["latents"] == pytest.approx(result.latents[0].item())
    loaded = PairSetShares.load(result.save(tmp_path / "set"))
    assert loaded.names == result.names and torch.equal(loaded.error, result.error)
    assert loaded.provenance["prompts"]["a"] == [WORDED_PAIRS[0].clean, WORDED_PAIRS[0].corrupted]
    assert list(loaded.to_dataframe()["pair"]) == ["a", "b", "c"] and (tmp_path / "set" / "plot.png").stat().st_size


@pytest.mark.parametrize("pairs, overrides, message", [
    ((NamedPair("x", "factual", "w1 w2 w3", "w1 w2", " w5", " w6"),), {}, "equal lengths"),
    ((NamedPair("x", "factual", "w1 w2", "w1 w3", " w5 w6", " w7"),), {}, "one token"),
    ((NamedPair("x", "safety", "w1 w2", "w1 w3"),), {}, "chat template"),
    (WORDED_PAIRS, {"span_threshold": 0.0}, "span_threshold"),
    (WORDED_PAIRS, {"batch_size": 0}, "batch_size"),
    (WORDED_PAIRS, {"direction": "noise"}, "unknown PairSetConfig fields"),
    ((), {}, "non-empty"),
])
def test_pair_set_refuses_bad_input_before_any_forward(worded, pairs, overrides, message):
    model, sae = worded
    calls = []
    handle = model.blocks[0].register_forward_hook(lambda *args: calls.append(1))
    try:
        with pytest.raises(PatchingError, match=message):
            unchecked(pair_set_error_share)(model, sae, pairs, **overrides)
    finally:
        handle.remove()
    assert calls == []


def test_named_pairs_are_the_issue_set_and_refuse_unknown_groups():
    pairs = named_pairs()
    assert [p.name for p in pairs if p.group == "factual"] == ["eiffel"]
    assert sum(p.group == "ioi" for p in pairs) == 5 and sum(p.group == "safety" for p in pairs) == 30
    for p in pairs:
        if p.group == "ioi":  # clean repeats the subject (answer: the other name); corrupted repeats the answer
            assert p.clean.count(p.wrong.strip()) == 2 and p.corrupted.count(p.answer.strip()) == 2
    with pytest.raises(PatchingError, match="pair groups"):
        named_pairs(["eiffel"])
    with pytest.raises(PatchingError, match="safety pair"):
        NamedPair("x", "safety", "a", "b", " a", " b")


def test_safety_pairs_span_is_the_suites_refusal_score_difference(default_model_4l):
    """Chat path on the default tokenizer: each safety pair's span equals the refusal scores the
    safety search reads (`refusal_scores`, KV-cached decoder), and the splice reproduces the clean run."""
    from patching.safety import RefusalScore, SafetySuite
    from patching.safety.score import refusal_scores, tokenize_chat

    model = default_model_4l
    sae = make_sae(model.cfg.d_model, 64, hook_name="blocks.2.hook_resid_pre", model_name=model.cfg.model_name, seed=2)
    pairs = [p for p in named_pairs(["safety"])][:2]
    result = pair_set_error_share(model, sae, pairs)
    suite, metric = SafetySuite(), RefusalScore.for_model(model)
    for i, pair in enumerate(pairs):
        harmful, harmless = tokenize_chat(model, suite, [pair.clean, pair.corrupted])
        scores = refusal_scores(model, [harmful, harmless], metric)
        assert result.span[i].item() == pytest.approx((scores[0] - scores[1]).item(), abs=1e-3)
    torch.testing.assert_close(result.total, torch.ones(2), atol=1e-3, rtol=0)
