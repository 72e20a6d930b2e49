"""The demo report's numbers (where the sweep's effect sits, the top 10 latents jointly, the error
node) against naive computations with the SAE written out by hand in a hook; cards from the latents it names."""

from __future__ import annotations

import pytest
import torch

from latentpatch.demo_report import by_position, joint_and_error, mentioned_latents
from latentpatch.report import card_from_report


@pytest.fixture(scope="module")
def pair():
    clean = torch.tensor([[1, 8, 9, 3, 4, 5, 6, 7]])
    corrupted = clean.clone()
    corrupted[0, 2] = 30
    corrupted[0, 5] = 11
    return clean, corrupted


def normalized(model, sae, clean, corrupted, metric, replace):
    """M with the site's activation replaced by `replace(x_corrupted, x_clean)`, normalized (M - M_corr) / (M_clean - M_corr)."""
    hook = sae.cfg.hook_name
    _, cache = model.run_with_cache(clean, names_filter=hook)
    x_clean = cache[hook]
    pair_ids = torch.zeros(1, dtype=torch.long)
    with torch.no_grad():
        m_clean, m_corr = (metric(model(t)[:, -1], pair_ids).item() for t in (clean, corrupted))
        logits = model.run_with_hooks(corrupted, fwd_hooks=[(hook, lambda x, hook: replace(x, x_clean))])
    return (metric(logits[:, -1], pair_ids).item() - m_corr) / (m_clean - m_corr)


def test_position_sums_joint_top10_and_error_node_match_hand_computations(tiny_model, tiny_sae, pair):
    from patching import LogitDiff, patch_latents

    metric = LogitDiff(3, 4)
    sweep = patch_latents(tiny_model, tiny_sae, *pair, metric, progress=False)
    sums = {}
    for unit, effect in zip(sweep.units, sweep.mean_effect.tolist()):
        if unit.kind == "latent":
            sums[unit.position] = sums.get(unit.position, 0.0) + effect
    assert {row["position"]: row["effect"] for row in by_position(sweep)} == pytest.approx(sums, abs=1e-4)

    found = joint_and_error(tiny_model, tiny_sae, sweep, *pair, metric)
    ranked = sorted(range(len(sweep.units)), key=lambda j: -abs(sweep.mean_effect[j].item()))
    top = [(sweep.units[j].position, sweep.units[j].latent) for j in ranked if sweep.units[j].kind == "latent"][:10]

    def joint(x, x_clean):
        f, f_clean = tiny_sae.encode(x), tiny_sae.encode(x_clean)
        patched = f.clone()
        for p, latent in top:
            patched[0, p, latent] = f_clean[0, p, latent]
        return tiny_sae.decode(patched) + (x - tiny_sae.decode(f))

    def error(x, x_clean):
        return tiny_sae.decode(tiny_sae.encode(x)) + (x_clean - tiny_sae.decode(tiny_sae.encode(x_clean)))

    assert len(top) == 10 and abs(found["joint_top10"] - found["error_node"]) > 1e-3
    assert found["joint_top10"] == pytest.approx(normalized(tiny_model, tiny_sae, *pair, metric, joint), abs=1e-3)
    assert found["error_node"] == pytest.approx(normalized(tiny_model, tiny_sae, *pair, metric, error), abs=1e-3)


def test_mentioned_latents_in_order_of_first_mention():
    results = {"sweep": {"top": [{"latent": None}, {"latent": 7}, {"latent": 3}]},
               "steering": [{"latents": "3"}, {"latents": "3 9 7 11"}]}
    assert mentioned_latents(results) == [7, 3, 9, 11]
    assert mentioned_latents({}) == []


def test_card_from_a_latent_report_keeps_the_highlighted_token(tiny_model, tiny_sae, tiny_tokens):
    from patching.inspect.latents import MARK_OPEN, inspect_latents

    report = inspect_latents(tiny_model, tiny_sae, [0, 5], tiny_tokens, k_contexts=3)[1]
    card = card_from_report(report, "x.png")
    assert card.latent == 5 and card.n_active == report.n_active and card.image == "x.png"
    for c, original in zip(card.contexts, report.contexts):
        assert c.before + MARK_OPEN + c.token in original.text and c.activation == original.activation
    assert [t for t, _ in card.promoted] == [e.token for e in report.top_tokens]
    assert card.label.startswith("fires on") or card.label.startswith("promotes")


def test_terminal_output_is_a_few_lines_for_people():
    from latentpatch.cli.demo import describe
    from tests.test_report import fake_results
    from latentpatch.report import demo_summary

    brief = {"seconds": 250.0, "section_seconds": {"sae": 2.0, "sweep": 31.4}, "report": "/tmp/x/index.html",
             "findings": demo_summary(fake_results())}
    lines = describe(brief).splitlines()
    assert 5 <= len(lines) <= 10
    assert lines[0] == "latentpatch demo: done in 4.2 min (sae 2 s, sweep 31 s)"
    assert lines[-1].startswith("report: /tmp/x/index.html") and "{" not in describe(brief)
    assert any("Latent 3465 alone restores 5%" in line for line in lines)
