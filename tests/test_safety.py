"""Safety latents: suite integrity, the refusal metric, curve bookkeeping, hook hygiene."""

from __future__ import annotations

import math

import pytest
import torch

from patching import Site
from patching.attribution.restoration import RestorationCurve, latent_restoration, raw_restoration
from patching.errors import SpliceError
from patching.model import tl_compat
from patching.safety.prompts import SafetySuite, is_refusal
from patching.safety.search import RefusalScore, SafetyReport, greedy_generate, query_start, tokenize_chat
from tests.conftest import make_sae
from tests.hooks_snapshot import snapshot


@pytest.mark.default_model
def test_every_pair_formats_to_equal_token_length(default_model_4l):
    suite = SafetySuite()
    harmful = tokenize_chat(default_model_4l, suite, [h for h, _ in suite.pairs])
    harmless = tokenize_chat(default_model_4l, suite, [s for _, s in suite.pairs])
    assert len(suite.pairs) >= 30
    for (h, s), a, b in zip(suite.pairs, harmful, harmless):
        assert a.shape == b.shape, (h, s)
        assert a[0, 0].item() == default_model_4l.tokenizer.bos_token_id and (a[0, 1:2] != a[0, :1]).all()  # one BOS
    start = query_start(default_model_4l, suite)
    assert all(torch.equal(a[0, :start], harmful[0][0, :start]) for a in harmful + harmless)  # shared context
    assert harmful[0][0, -4].item() == default_model_4l.tokenizer.bos_token_id  # <|im_start|> ass istant \n
    assert default_model_4l.to_string(harmful[0][0, -3:]) == "assistant\n"


def test_refusal_score_on_hand_made_logits():
    logits = torch.zeros(2, 10)
    logits[0, [1, 2]] = math.log(3.0)  # refusal tokens 1, 2: logsumexp = log 6
    logits[0, 5] = math.log(2.0)       # compliance token 5: log 2
    logits[1, 5] = 4.0
    score = RefusalScore(refusal=(1, 2), compliance=(5,))
    values = score(logits, torch.tensor([0, 0]))
    assert values[0].item() == pytest.approx(math.log(3.0))
    assert values[1].item() == pytest.approx(math.log(2.0) - 4.0)
    assert score.readout == -1


def test_refusal_detection():
    assert is_refusal("  I'm sorry, but I can't help with that.")
    assert is_refusal("I cannot do that")
    assert not is_refusal("Sure! Here is how")
    assert not is_refusal("Dear Ms. Johnson, I'm sorry to hear")


@pytest.fixture(scope="module")
def toy():
    model = tl_compat.random_model(n_layers=3, d_vocab=50)
    model.eval()
    site = Site(1)
    sae = make_sae(16, 40, hook_name=site.hook_name, model_name=model.cfg.model_name, seed=2)
    harmful = torch.tensor([[1, 8, 9, 3, 4, 5, 6, 7]])
    harmless = harmful.clone()
    harmless[0, 3] = 30
    return model, site, sae, harmful, harmless, RefusalScore((3,), (4,))


def test_patching_everything_restores_exactly_all_of_it(toy):
    model, site, sae, harmful, harmless, metric = toy
    curve, active, full, scores = latent_restoration(model, site, sae, harmful, harmless, metric, (1, 3, 1000), start=3)
    assert full == pytest.approx(1.0, abs=1e-4)
    assert 0 < active <= 40 * 5 and scores.shape == (40,)
    # Every differing latent, without the error node, is what the largest count patches.
    assert curve.shape == (3,)
    raw, n_elements = raw_restoration(model, site, harmful, harmless, metric, (1, 16 * 5), start=3)
    assert n_elements == 16 * 5
    assert raw[-1].item() == pytest.approx(1.0, abs=1e-4)  # every dimension at every query position


def test_curve_bookkeeping():
    curve = RestorationCurve(counts=[1, 2, 4], fraction=torch.tensor([[0.2, 0.6, 0.95], [0.1, 0.3, 0.4]]), n_active=[40, 20])
    assert curve.needed(0.5) == [5.0, None]
    assert curve.needed(0.9) == [10.0, None]
    report = SafetyReport(site="s", refusal_rates={}, pairs_used=[("a", "b")] * 2, latents=curve, raw=curve)
    summary = report.summary()["latents"]
    assert summary["pairs_reaching_50"] == 1 and summary["median_percent_for_50"] == 5.0


def test_hooks_restored_when_dynamic_patching_raises(toy, monkeypatch):
    model, site, sae, harmful, _, _ = toy
    before = snapshot(model)
    calls = {"n": 0}
    real_encode = sae.encode

    def failing_encode(x):
        calls["n"] += 1
        if calls["n"] == 2:
            raise RuntimeError("encode failed mid-generation")
        return real_encode(x)

    monkeypatch.setattr(sae, "encode", failing_encode)
    with pytest.raises(RuntimeError, match="mid-generation"):
        greedy_generate(model, [harmful], 4, clamp=(site, sae, [1, 2], torch.tensor([0.5, 0.5]), 2))
    assert snapshot(model) == before
    monkeypatch.undo()
    with pytest.raises(SpliceError, match="latent index 99"):
        greedy_generate(model, [harmful], 2, clamp=(site, sae, [99], torch.tensor([0.5]), 2))
    assert snapshot(model) == before


def test_clamped_generation_sets_the_latents_from_the_query_on(toy):
    model, site, sae, harmful, _, _ = toy
    from patching import splice

    tokens = harmful
    with torch.inference_mode(), splice(model, sae, cache=True) as state:
        model(tokens)
    z = state.records[site].latents[0]
    silent = [int(i) for i in torch.nonzero((z == 0).all(0)).flatten()[:3]]
    loud = int(z[2:].sum(0).argmax())
    assert silent, "the toy SAE should have latents that never fire on this prompt"
    # One new token: the clamp then acts on the prompt only, where the silent latents are zero.
    plain = greedy_generate(model, [tokens], 1)
    assert greedy_generate(model, [tokens], 1, clamp=(site, sae, silent, torch.zeros(len(silent)), 2)) == plain
    # Clamping a strongly active latent to a huge value from position 2 on changes the answer.
    assert greedy_generate(model, [tokens], 1, clamp=(site, sae, [loud], torch.tensor([500.0]), 2)) != plain
