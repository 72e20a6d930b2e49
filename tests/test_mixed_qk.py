"""AtP* on mixed circuits (`find_circuit(saes=..., method="atp*")`): on the saturated-softmax toy with an
SAE before the head, plain AtP's mixed circuit misses the latents that move the head's query (the
softmax's gradient is about e^-40) and AtP*'s keeps them, each confirmed by exact patching, and the
head node's own score is the same under both (its output change is exact: its softmax is never
linearised, so the QK fix has nothing to fix there); on a 3-layer model a latent's GradDrop score
equals a hand computation with TransformerLens hooks (split query/key inputs, detached block writes)."""

from __future__ import annotations

import pytest
import torch

from conftest import make_sae
from patching.model.sites import Site
from patching.paths import LatentNode, Node, find_circuit
from patching.sweep import LogitDiff
from test_qk_fix import saturated_model

METRIC = LogitDiff(answer=3, wrong=4)


@pytest.fixture(scope="module")
def toy():
    """The saturated toy with an identity SAE at resid_pre 0: latent i is 1 on token i, the error is 0."""
    model = saturated_model()
    site = Site(0, "resid_pre")
    sae = make_sae(8, 8, hook_name=site.hook_name, model_name=model.cfg.model_name, seed=0)
    with torch.no_grad():
        sae.W_enc.copy_(torch.eye(8))
        sae.W_dec.copy_(torch.eye(8))
        sae.b_enc.zero_()
        sae.b_dec.zero_()
    return model, {site: sae}


def test_plain_atp_mixed_circuit_misses_the_query_latents_atp_star_keeps(toy):
    model, saes = toy
    site = next(iter(saes))
    clean, corrupted = torch.tensor([[3, 4, 5]]), torch.tensor([[3, 4, 6]])
    plain = find_circuit(model, clean, corrupted, METRIC, saes=saes, method="eap", threshold=0.3, curve_points=0)
    star = find_circuit(model, clean, corrupted, METRIC, saes=saes, method="atp*", threshold=0.3, curve_points=0)
    head, query_latents = Node("head", 0, 0), {LatentNode(site, 5), LatentNode(site, 6)}
    assert plain.nodes == [head]  # the saturated softmax hides the latents that move the query
    assert set(star.nodes) == {head} | query_latents
    by_node = dict(zip(star.nodes, star.exact.tolist()))
    # exact noising: latent 5 alone gone leaves a zero query (uniform attention), latent 6 alone added ties
    # tokens 3 and 4; both halve the logit difference; the head alone flips it
    assert by_node == pytest.approx({head: 1.0, LatentNode(site, 5): 0.5, LatentNode(site, 6): 0.5}, abs=1e-4)
    # the QK fix is exact where the metric is linear in the pattern (one layer, read at one position)
    assert dict(zip(star.nodes, star.estimate.tolist())) == pytest.approx(by_node, abs=1e-4)
    # a head's own score: |AtP| under AtP* (one layer: no block to drop)
    assert float(star.estimate[star.nodes.index(head)]) == pytest.approx(abs(float(plain.estimate[0])), abs=1e-6)
    assert star.provenance["method"] == "atp*" and star.faithfulness.faithfulness.item() == pytest.approx(1.0, abs=1e-4)


def naive_star_term(model, sae, clean, corrupted, site, latent, drop, reads):
    """One GradDrop term of a latent's AtP* score by hand, in metric units: dM/dα with α·Δu added at the
    site but taken back out of the query and key inputs of the blocks that read it directly (the
    linear share AtP* replaces), plus those blocks' exact pattern changes (every query input, then
    every key input, moved by Δu) against ∂M/∂pattern; block `drop`'s writes pass no gradient."""
    _, c = model.run_with_cache(clean)
    _, k = model.run_with_cache(corrupted)
    x_c, x_k = c[site.hook_name][0], k[site.hook_name][0]
    delta = ((sae.encode(x_k)[:, latent] - sae.encode(x_c)[:, latent])[:, None] * sae.W_dec[latent]).detach()
    dropped = [(f"blocks.{drop}.hook_{w}_out", lambda x, hook: x.detach()) for w in ("attn", "mlp")]
    alpha = torch.zeros((), requires_grad=True)
    hooks = dropped + [(site.hook_name, lambda x, hook: x + alpha * delta)]
    hooks += [(f"blocks.{layer}.hook_{kind}_input", lambda x, hook: x - alpha * delta[None, :, None, :])
              for layer in reads for kind in ("q", "k")]
    model.cfg.use_split_qkv_input = True
    try:
        linear_out = torch.autograd.grad(metric_of(model.run_with_hooks(clean, fwd_hooks=hooks)), alpha)[0]
        fixed = 0.0
        for layer in reads:
            kept = {}
            name = f"blocks.{layer}.attn.hook_pattern"
            keep = (name, lambda x, hook: kept.setdefault(len(kept), x))
            grad, = torch.autograd.grad(metric_of(model.run_with_hooks(clean, fwd_hooks=dropped + [keep])), kept[0],
                                        allow_unused=True)  # None when block `drop` is the reader's own
            if grad is None:
                continue
            for kind in ("q", "k"):
                kept.clear()
                shift = (f"blocks.{layer}.hook_{kind}_input", lambda x, hook: x + delta[None, :, None, :])
                with torch.no_grad():
                    model.run_with_hooks(clean, fwd_hooks=[shift, keep])
                fixed += ((kept[0] - c[name]) * grad).sum().item()
    finally:
        model.cfg.use_split_qkv_input = False
    return linear_out.item() + fixed


def metric_of(logits):
    return logits[0, -1, 3] - logits[0, -1, 4]


def test_a_latents_grad_drop_score_equals_a_hand_computation():
    from conftest import edited_pair, learned_or_rotary_gqa
    from patching.paths.mixed_circuits import _prepare
    from patching.paths.mixed_qk import atp_star_node_scores

    model = learned_or_rotary_gqa("learned")
    sites = (Site(0, "resid_post"), Site(2, "resid_pre"))
    saes = {s: make_sae(model.cfg.d_model, 10, hook_name=s.hook_name, model_name=model.cfg.model_name, seed=n)
            for n, s in enumerate(sites)}
    clean, corrupted = edited_pair(5, 2, 7, [(None, 2, 9), (1, 5, 3)])
    resolved, metric, pairs, runs, m_clean, m_corrupted = _prepare(model, saes, clean, corrupted, METRIC, None, "resample")
    nodes, scores = atp_star_node_scores(model, resolved, metric, pairs, runs, m_clean, m_corrupted)
    latents = [j for j, n in enumerate(nodes) if isinstance(n, LatentNode) and n.site == sites[0] and n.latent is not None]
    j = max(latents, key=lambda j: float(scores[:, j].sum()))
    for p in range(2):
        terms = [naive_star_term(model, saes[sites[0]], clean[p:p + 1], corrupted[p:p + 1], sites[0], nodes[j].latent,
                                 drop, reads=[1]) for drop in (1, 2)]
        span = float(m_clean[p] - m_corrupted[p])
        assert float(scores[p, j]) == pytest.approx(sum(abs(t) for t in terms) / 2 / abs(span), rel=1e-4, abs=1e-6)
    assert float(scores[:, j].max()) > 1e-3
