"""Latent inspection against direct computations: logit effect, contexts, histogram, padding."""

from __future__ import annotations

import pytest
import torch
from tests.conftest import construct_unchecked, make_sae, unchecked
from tests.hooks_snapshot import CountingHook

from patching import PatchingError, Site, splice
from patching.inspect.latents import InspectConfig, inspect_latent, inspect_latents, logit_effect
from patching.splice.collect import _token_rows, iter_site_latents

SITE = Site(1, "resid_pre")


@pytest.fixture(scope="module")
def corpus():
    return torch.randint(0, 50, (4, 10), generator=torch.Generator().manual_seed(3))


def _latents(model, sae, tokens):
    with splice(model, sae, cache=True) as state:
        model(tokens)
    return state.records[SITE].latents


def test_logit_effect_is_the_decoder_row_through_the_norm_weight_and_unembedding(tiny_model, tiny_sae):
    top, bottom = logit_effect(tiny_model, tiny_sae, 5, k=4)
    direct = ((tiny_sae.W_dec[5] * tiny_model.ln_final.w) @ tiny_model.W_U).detach()
    assert [e.token_id for e in top] == torch.topk(direct, 4).indices.tolist()
    assert [e.token_id for e in bottom] == torch.topk(-direct, 4).indices.tolist()
    assert top[0].logit == pytest.approx(float(direct.max()), rel=1e-5)


def test_contexts_and_histogram_match_the_activations(tiny_model, tiny_sae, corpus):
    z = _latents(tiny_model, tiny_sae, corpus)
    latent = int(z.flatten(0, 1).max(0).values.argmax())
    column = z[..., latent]
    report = inspect_latent(tiny_model, tiny_sae, latent, corpus, config=InspectConfig(k_contexts=3, bins=5))
    best = torch.topk(column.flatten(), 3)
    assert [c.activation for c in report.contexts] == pytest.approx(best.values.tolist(), rel=1e-5)
    assert [(c.row, c.position) for c in report.contexts] == [divmod(int(i), corpus.shape[1]) for i in best.indices]
    first = report.contexts[0]
    assert f"«{int(corpus[first.row, first.position])}»" in first.text
    assert report.n_tokens == corpus.numel() and report.n_active == int((column > 0).sum())
    assert float(report.counts.sum()) == report.n_active and len(report.edges) == 6
    # The histogram of the non-zero activations: five equal bins from 0 to the largest, counted by hand.
    positive = column[column > 0].tolist()
    top_value = max(positive)
    torch.testing.assert_close(report.edges, torch.linspace(0.0, top_value, 6), atol=1e-6, rtol=1e-6)
    by_hand = [sum(1 for v in positive if b * top_value / 5 <= v < (b + 1) * top_value / 5 or (b == 4 and v == top_value))
               for b in range(5)]
    assert report.counts.tolist() == by_hand and sum(1 for c in by_hand if c > 0) > 1
    assert "top-activating contexts" in report.to_text()


def test_several_latents_in_one_pass_equal_one_at_a_time(tiny_model, tiny_sae, corpus):
    together = inspect_latents(tiny_model, tiny_sae, [2, 9], corpus)
    for report in together:
        alone = inspect_latent(tiny_model, tiny_sae, report.latent, corpus)
        assert report.contexts == alone.contexts and torch.equal(report.counts, alone.counts)


def test_report_plot_writes_a_png(tiny_model, tiny_sae, corpus, tmp_path):
    report = inspect_latent(tiny_model, tiny_sae, 3, corpus)
    path = report.plot(tmp_path / "latent.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bad_latents_and_corpora_are_refused_before_any_forward(tiny_model, tiny_sae, corpus):
    counter = CountingHook(tiny_model)
    try:
        for latents, match in (([48], r"0\.\.47"), ([-1], r"0\.\.47"), ([], "latent indices")):
            with pytest.raises(PatchingError, match=match):
                inspect_latents(tiny_model, tiny_sae, latents, corpus)
        with pytest.raises(PatchingError, match="no tokenizer"):
            inspect_latent(tiny_model, tiny_sae, 0, ["some text"])
        with pytest.raises(PatchingError, match=r"\(batch, pos\)"):
            unchecked(_token_rows)(tiny_model, corpus[0])  # a type checker refuses it earlier in this run
    finally:
        counter.remove()
    assert counter.count == 0
    with pytest.raises(PatchingError, match="k_contexts"):
        construct_unchecked(InspectConfig, k_contexts=0)


@pytest.mark.default_model
def test_padded_text_batches_give_each_text_its_own_latents(default_model_4l):
    model = default_model_4l
    sae = make_sae(576, 64, hook_name="blocks.2.hook_resid_pre", model_name=model.cfg.model_name)
    texts = ["Paris is the capital of France.", "Hi", "The quick brown fox jumps over the lazy dog again."]
    together = list(iter_site_latents(model, sae, Site(2), texts, batch_rows=3))
    for item in together:
        (alone,) = iter_site_latents(model, sae, Site(2), [texts[item.row]], batch_rows=1)
        assert torch.equal(alone.tokens, item.tokens)
        torch.testing.assert_close(alone.latents, item.latents, rtol=1e-4, atol=1e-4)
        assert not item.keep[0]  # BOS left out
    report = inspect_latent(model, sae, 7, texts, config=InspectConfig(k_contexts=2))
    assert all("«" in c.text for c in report.contexts) and report.top_tokens is not None
