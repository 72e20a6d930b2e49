"""Edges of mixed circuits (heads, MLPs, SAE latents, error nodes, the logits): each edge equals an
independent computation written plainly here with TransformerLens hooks — d's input moved by α·Δu,
every other node at the clean run, d's new value patched into an otherwise live clean run, dM/dα —
on learned-position and rotary grouped-query models; edges exist exactly where u's term is part of
the stream d reads; the edges out of every node sum to its AtP estimate (the chain rule); and
`find_circuit(saes=...)` carries the edges between its kept nodes."""

from __future__ import annotations

import pytest
import torch

from conftest import edited_pair, learned_or_rotary_gqa, saes_at
from hooks_snapshot import assert_refused_before_any_forward
from patching.errors import PatchingError
from patching.model.sites import Site
from patching.paths import LatentNode, Node, Receiver, attribute_mixed_edges, mixed_nodes
from patching.paths.mixed_circuits import _prepare
from patching.paths.mixed_estimates import node_estimates
from patching.sweep import LogitDiff
from patching.sweep.engine import normalized_effect

METRIC = LogitDiff(answer=3, wrong=4)
SITES = (Site(0, "resid_post"), Site(2, "resid_pre"))
LOGITS = Receiver("logits")


@pytest.fixture(scope="module", params=["learned", "rotary_gqa"])
def model(request):
    return learned_or_rotary_gqa(request.param)


@pytest.fixture(scope="module")
def saes(model):
    return saes_at(model, SITES)


@pytest.fixture(scope="module")
def prompts():
    return edited_pair(5, 2, 7, [(None, 2, 9), (1, 5, 3)])


def metric_of(logits):
    return logits[0, -1, 3] - logits[0, -1, 4]


def naive_write(model, saes, cache, node):
    """What `node` writes to the stream in a cached run, (pos, d_model)."""
    if isinstance(node, LatentNode):
        sae, x = saes[node.site], cache[node.site.hook_name][0]
        z = sae.encode(x)
        if node.latent is None:
            return x - sae.decode(z)
        only = torch.zeros_like(z)
        only[:, node.latent] = z[:, node.latent]
        return sae.decode(only) - sae.decode(torch.zeros_like(z))
    if node.kind == "mlp":
        return cache[f"blocks.{node.layer}.hook_mlp_out"][0]
    return cache[f"blocks.{node.layer}.attn.hook_z"][0, :, node.head] @ model.blocks[node.layer].attn.W_O[node.head]


def naive_read(model, saes, clean, cache, node, shift):
    """`node`'s value when the stream it reads moves by `shift` and nothing else does."""
    if isinstance(node, LatentNode):
        sae, x = saes[node.site], cache[node.site.hook_name][0] + shift
        z = sae.encode(x)
        return x - sae.decode(z) if node.latent is None else z[:, node.latent]
    if node == LOGITS:
        name = f"blocks.{model.cfg.n_layers - 1}.hook_resid_post"
        return metric_of(model.run_with_hooks(clean, fwd_hooks=[(name, lambda x, hook: x + shift)]))
    seen = {}
    read = f"blocks.{node.layer}.hook_resid_pre" if node.kind == "head" else f"blocks.{node.layer}.hook_resid_mid"
    out = f"blocks.{node.layer}.attn.hook_z" if node.kind == "head" else f"blocks.{node.layer}.hook_mlp_out"
    model.run_with_hooks(clean, fwd_hooks=[(read, lambda x, hook: x + shift), (out, lambda x, hook: seen.setdefault("v", x))])
    return seen["v"][0, :, node.head] if node.kind == "head" else seen["v"][0]


def naive_metric_with(model, saes, clean, cache, node, value):
    """M of the clean run with `node`'s value replaced by `value`, everything after it live."""
    if node == LOGITS:
        return value
    if isinstance(node, LatentNode):
        sae, name = saes[node.site], node.site.hook_name

        def hook(x, hook):
            z = sae.encode(x[0])
            if node.latent is None:
                return x + (value - (x[0] - sae.decode(z)))[None]
            z_new = torch.cat([z[:, :node.latent], value[:, None], z[:, node.latent + 1:]], 1)
            return x + (sae.decode(z_new) - sae.decode(z))[None]
        return metric_of(model.run_with_hooks(clean, fwd_hooks=[(name, hook)]))
    if node.kind == "mlp":
        return metric_of(model.run_with_hooks(clean, fwd_hooks=[(f"blocks.{node.layer}.hook_mlp_out",
                                                                  lambda x, hook: value[None])]))

    def set_head(x, hook):
        x = x.clone()
        x[0, :, node.head] = value
        return x
    return metric_of(model.run_with_hooks(clean, fwd_hooks=[(f"blocks.{node.layer}.attn.hook_z", set_head)]))


def naive_edge(model, saes, clean, c, k, up, down):
    """dM/dα with `down`'s input moved by α·Δup (Δ = corrupted − clean; `c`, `k` their caches), in metric units."""
    delta = (naive_write(model, saes, k, up) - naive_write(model, saes, c, up)).detach()
    alpha = torch.zeros((), requires_grad=True)
    moved = naive_read(model, saes, clean, c, down, alpha * delta)
    value = naive_metric_with(model, saes, clean, c, down, moved)
    return torch.autograd.grad(value, alpha)[0].item()


def chosen_nodes():
    s0, s1 = SITES
    return [Node("head", 0, 1), Node("mlp", 0), LatentNode(s0, 3), LatentNode(s0, 7), LatentNode(s0), Node("head", 1, 2),
            Node("head", 1, 3), Node("mlp", 1), LatentNode(s1, 1), LatentNode(s1, 6), LatentNode(s1), Node("head", 2, 0),
            Node("mlp", 2)]


def test_edges_exist_where_the_upstream_term_is_in_the_stream_read(model, saes, prompts):
    nodes = chosen_nodes()
    found = attribute_mixed_edges(model, saes, *prompts, METRIC, nodes)
    h0, m0, a, b, e0, h12, h13, m1, c, d, e1, h2, m2 = nodes
    site0, site1 = [a, b, e0], [c, d, e1]
    expected = {(h0, m0)} | {(u, s) for u in (h0, m0) for s in site0}
    expected |= {(u, r) for u in site0 for r in (h12, h13, m1, *site1)} | {(h, m1) for h in (h12, h13)}
    expected |= {(u, s) for u in (h12, h13, m1) for s in site1}
    expected |= {(u, r) for u in site1 for r in (h2, m2, LOGITS)} | {(h2, m2), (h2, LOGITS), (m2, LOGITS)}
    assert set(found.edges) == expected and len(found.edges) == len(expected)
    assert found.effect.shape == (2, len(expected))


def test_each_edge_equals_the_frozen_path_derivative_by_hand(model, saes, prompts):
    clean, corrupted = prompts
    found = attribute_mixed_edges(model, saes, clean, corrupted, METRIC, chosen_nodes(), batch_size=3)
    for p in range(2):
        c, k = clean[p:p + 1], corrupted[p:p + 1]
        (logits_c, cache_c), (logits_k, cache_k) = model.run_with_cache(c), model.run_with_cache(k)
        span = (metric_of(logits_c) - metric_of(logits_k)).item()
        checked = range(0, len(found.edges), 1 if p == 0 else 3)  # every edge of pair 0, a third of pair 1's
        naive = torch.tensor([naive_edge(model, saes, c, cache_c, cache_k, *found.edges[e]) for e in checked])
        torch.testing.assert_close(found.effect[p, list(checked)], -naive / span, atol=2e-5, rtol=1e-4)
    assert found.effect.abs().max() > 1e-2


def test_edges_out_of_every_node_sum_to_its_attribution_estimate(model, saes, prompts):
    """The chain rule over the whole graph: Σ_d w(u → d) = Δu · ∂M/∂u (the issue's "EAP edges summed
    over a node's outgoing edges equal its AtP node score"), for every head, MLP, latent and error node."""
    clean, corrupted = prompts
    every = mixed_nodes(model, saes)
    found = attribute_mixed_edges(model, saes, clean, corrupted, METRIC, every)
    resolved, metric, _, runs, m_clean, m_corrupted = _prepare(model, saes, clean, corrupted, METRIC, None, "resample")
    scored, raw = node_estimates(model, resolved, metric, runs, "eap", 1)
    estimate = normalized_effect(m_clean[:, None] + raw, m_clean, m_corrupted, "noise")
    for j, node in enumerate(scored):
        out = [e for e, (u, _) in enumerate(found.edges) if u == node]
        assert out, node
        torch.testing.assert_close(found.effect[:, out].sum(1), estimate[:, j], atol=1e-5, rtol=1e-4)
    assert estimate.abs().max() > 1e-2


@pytest.mark.parametrize("nodes, pattern", [
    (lambda s: [], "at least one"),
    (lambda s: [LatentNode(s, 99)], "latent out of range"),
    (lambda s: [Node("embed")], "the embedding is the input"),
    (lambda s: ["L0H1"], "Node or LatentNode"),
])
def test_bad_nodes_refused_before_any_forward(model, saes, prompts, nodes, pattern):
    assert_refused_before_any_forward(
        model, lambda: attribute_mixed_edges(model, saes, *prompts, METRIC, nodes(SITES[0])), PatchingError, pattern)


def test_bad_settings_refused(model, saes, prompts):
    for kwargs, pattern in (({"method": "atp*"}, "method 'eap' or 'eap_ig'"), ({"batch_size": 0}, "batch_size")):
        with pytest.raises(PatchingError, match=pattern):
            attribute_mixed_edges(model, saes, *prompts, METRIC, [Node("mlp", 0)], **kwargs)
