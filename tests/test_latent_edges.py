"""Latent-to-latent edges (Marks et al. 2024): exact against edge patching written plainly with
TransformerLens hooks where the model is affine between the sites and every latent stays active; a
node's outgoing edges summed equal its node effect, and the node effects equal the attribution room's
AtP, on the learned-position and rotary grouped-query models with sparse SAEs."""

from __future__ import annotations

import pytest
import torch

from conftest import affine_attention_model, edited_pair, make_sae
from hooks_snapshot import assert_refused_before_any_forward, snapshot
from patching.attribution import attribute_latents
from patching.errors import PatchingError
from patching.model.sites import Site
from patching.paths.latents import LatentGraph, attribute_latent_edges
from patching.sweep import LogitDiff
from tests.conftest import learned_or_rotary_gqa

METRIC = LogitDiff(answer=3, wrong=4)
SITES = (Site(0, "resid_post"), Site(2, "resid_pre"))


@pytest.fixture(scope="module")
def prompts():
    return edited_pair(7, 2, 6, [(None, 1, 11), (0, 3, 5)])


def saes_for(model, d_sae=12, active=False):
    """Two SAEs at SITES; `active` gives every latent a large encoder bias, so none crosses zero."""
    out = {}
    for seed, site in enumerate(SITES):
        sae = make_sae(model.cfg.d_model, d_sae, hook_name=site.hook_name, model_name=model.cfg.model_name, seed=seed)
        if active:
            with torch.no_grad():
                sae.b_enc.add_(50.0)
        out[site] = sae
    return out


@pytest.fixture(scope="module")
def affine():
    """No norms, zero queries (uniform causal attention), attention only: the stream at the second
    site and the metric are affine in the first site's nodes."""
    return affine_attention_model(3)


def _run(model, tokens, site_hooks):
    with torch.no_grad(), model.hooks(fwd_hooks=site_hooks):
        logits = model(tokens)
    return logits[0, -1, 3] - logits[0, -1, 4]


def node_values(sae, x):
    z = sae.encode(x)
    return z, x - sae.decode(z)


def exact_edge(model, saes, base, source, up, down):
    """Patch upstream node `up` (latent or error, one position or all) to its source value, read the
    downstream node's new value at the next site, then run the base prompt with only that downstream
    node moved: M(patched) − M(base). Plain hooks, separate forwards."""
    (a, sae_a), (b, sae_b) = saes.items()
    cache = {}
    for name, tokens in (("base", base), ("source", source)):
        _, c = model.run_with_cache(tokens)
        cache[name] = {a: c[a.hook_name][0], b: c[b.hook_name][0]}

    def move(sae, node, x_base, x_source):
        """x_base with node's value replaced by its value in x_source."""
        zb, eb = node_values(sae, x_base)
        zs, es = node_values(sae, x_source)
        where = slice(None) if node.pos is None else node.pos
        shift = torch.zeros_like(x_base)
        if node.latent is None:
            shift[where] = (es - eb)[where]
        else:
            shift[where] = (zs[where, node.latent] - zb[where, node.latent])[..., None] * sae.W_dec[node.latent]
        return x_base + shift

    patched_a = move(sae_a, up, cache["base"][a], cache["source"][a])
    seen = {}
    with torch.no_grad(), model.hooks(fwd_hooks=[(a.hook_name, lambda x, hook: patched_a[None]),
                                                 (b.hook_name, lambda x, hook: seen.update(b=x[0].clone()))]):
        model(base)
    patched_b = move(sae_b, down, cache["base"][b], seen["b"])
    return float(_run(model, base, [(b.hook_name, lambda x, hook: patched_b[None])]) - _run(model, base, []))


@pytest.mark.parametrize("positions, method", [(False, "atp"), (True, "atp"), (False, "ig")])
def test_exact_where_affine(affine, prompts, positions, method):
    clean, corrupted = prompts
    saes = saes_for(affine, active=True)
    graph = attribute_latent_edges(affine, saes, clean, corrupted, METRIC, k=None, positions=positions, method=method,
                                   steps=2, progress=False)
    span = graph.metric_clean - graph.metric_corrupted
    assert len(graph.edges) > 20
    checked = 0
    for e in torch.randperm(len(graph.edges), generator=torch.Generator().manual_seed(0))[:12].tolist():
        u, d = graph.edges[e]
        for p in range(2):
            exact = exact_edge(affine, saes, corrupted[p:p + 1], clean[p:p + 1], graph.nodes[u], graph.nodes[d])
            assert float(graph.edge_effect[p, e] * span[p]) == pytest.approx(exact, abs=1e-3, rel=1e-4)
            checked += abs(exact) > 1e-2
    assert checked > 4


@pytest.fixture(scope="module", params=["learned", "rotary_gqa"])
def model(request):
    return learned_or_rotary_gqa(request.param)


@pytest.mark.parametrize("direction, method", [("denoise", "atp"), ("noise", "atp"), ("noise", "ig")])
def test_node_effects_are_the_attribution_rooms(model, prompts, direction, method):
    clean, corrupted = prompts
    saes = saes_for(model)
    graph = attribute_latent_edges(model, saes, clean, corrupted, METRIC, positions=True, direction=direction,
                                   method=method, steps=3, progress=False)
    atp = attribute_latents(model, saes, clean, corrupted, METRIC, direction=direction, method=method, steps=3,
                            progress=False)
    by_unit = {}
    for j, unit in enumerate(atp.units):
        part = unit.parts[0]
        by_unit[(part.site, None if part.kind == "error" else part.latents[0], part.positions[0])] = atp.effect[:, j]
    ours = {(n.site, n.latent, n.pos): graph.node_effect[:, j] for j, n in enumerate(graph.nodes)}
    assert set(ours) <= set(by_unit) and len(ours) > 20
    for key, value in ours.items():
        torch.testing.assert_close(value, by_unit[key], atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("positions", [False, True])
def test_outgoing_edges_sum_to_the_node_effect(model, prompts, positions):
    """The chain rule through a cut: every path from the first site reaches the metric through the
    second site's latents and error nodes (the downstream nodes are all of them, k=None)."""
    clean, corrupted = prompts
    graph = attribute_latent_edges(model, saes_for(model), clean, corrupted, METRIC, k=None, positions=positions,
                                   progress=False)
    first = [j for j, n in enumerate(graph.nodes) if n.site == SITES[0]]
    summed = torch.zeros(graph.edge_effect.shape[0], len(graph.nodes))
    for e, (u, _) in enumerate(graph.edges):
        summed[:, u] += graph.edge_effect[:, e]
    torch.testing.assert_close(summed[:, first], graph.node_effect[:, first], atol=3e-5, rtol=1e-4)
    assert graph.node_effect[:, first].abs().max() > 1e-2
    assert any(graph.nodes[j].kind == "error" for j in first)


def test_k_keeps_the_strongest_downstream_nodes(model, prompts, tmp_path):
    clean, corrupted = prompts
    graph = attribute_latent_edges(model, saes_for(model), clean, corrupted, METRIC, k=3, progress=False)
    downs = {d for _, d in graph.edges}
    second = [j for j, n in enumerate(graph.nodes) if n.site == SITES[1]]
    strongest = sorted(second, key=lambda j: -float(graph.node_effect.mean(0)[j].abs()))[:3]
    assert downs == set(strongest)
    loaded = LatentGraph.load(graph.save(tmp_path / "graph"))
    assert loaded.nodes == graph.nodes and loaded.edges == graph.edges
    torch.testing.assert_close(loaded.edge_effect, graph.edge_effect)
    assert len(graph.to_dataframe()) == len(graph.edges) and graph.top_edges(2)


def test_model_left_as_found(model, prompts):
    clean, corrupted = prompts
    before = snapshot(model), [p.requires_grad for p in model.parameters()]
    attribute_latent_edges(model, saes_for(model), clean, corrupted, METRIC, progress=False)
    assert (snapshot(model), [p.requires_grad for p in model.parameters()]) == before


@pytest.mark.parametrize("saes, kwargs, pattern", [
    ("attn", {}, "residual stream"),
    ("same_stream", {}, "same residual stream"),
    ("ok", dict(k=0), "k must be a positive int"),
    ("ok", dict(batch_size=0), "batch_size must be a positive int"),
    ("ok", dict(steps=0), "steps must be an int in 1..1024"),
])
def test_bad_input_refused_before_any_forward(model, prompts, saes, kwargs, pattern):
    clean, corrupted = prompts
    d = model.cfg.d_model
    chosen = {"ok": saes_for(model),
              "attn": {Site(1, "attn_out"): make_sae(d, 8, hook_name=None, model_name=None)},
              "same_stream": {Site(0, "resid_post"): make_sae(d, 8, hook_name=None, model_name=None),
                              Site(1, "resid_pre"): make_sae(d, 8, hook_name=None, model_name=None)}}[saes]
    assert_refused_before_any_forward(
        model, lambda: attribute_latent_edges(model, chosen, clean, corrupted, METRIC, progress=False, **kwargs),
        PatchingError, pattern)


def test_graph_json_of_a_latent_graph(model, prompts, tmp_path):
    import json

    from patching.paths.graph import check_graph_document, graph_scores

    clean, corrupted = prompts
    graph = attribute_latent_edges(model, saes_for(model), clean, corrupted, METRIC, k=None, progress=False)
    labels = {graph.nodes[0]: "first latent"}
    doc = json.loads(graph.to_graph_json(tmp_path / "g.json", labels=labels).read_text())
    check_graph_document(doc)
    by_id = {n["id"]: n for n in doc["nodes"]}
    assert by_id[graph.nodes[0].label()]["label"] == "first latent"
    assert {n["kind"] for n in doc["nodes"]} == {"latent", "error", "logit"}
    into_metric = sum(e["weight"] for e in doc["edges"] if e["target"] == "logits")
    last = [j for j, n in enumerate(graph.nodes) if n.site == SITES[1]]
    assert into_metric == pytest.approx(float(graph.node_effect.mean(0)[last].sum()), abs=1e-5)
    assert len(doc["edges"]) == int((graph.edge_effect.mean(0) != 0).sum()) + len(last)
    scores = graph.scores()
    assert 0 < scores.replacement < 1 and 0 < scores.completeness <= 1
    assert (scores.replacement, scores.completeness) == pytest.approx(tuple(graph_scores(doc["nodes"], doc["edges"]).__dict__.values()))
    assert doc["metadata"]["scores"]["replacement"] == pytest.approx(scores.replacement)
    assert set(doc["metadata"]["saes"]) and doc["metadata"]["method"] == "latent_edges"
    strong = json.loads(graph.to_graph_json(tmp_path / "s.json", threshold=0.05).read_text())
    assert all(abs(e["weight"]) >= 0.05 for e in strong["edges"]) and len(strong["edges"]) < len(doc["edges"])
    assert graph.plot_graph(tmp_path / "g.png", threshold=0.05).stat().st_size > 0


def test_latent_labels_are_the_top_activating_tokens(model, prompts):
    from patching.paths.labels import latent_labels
    from patching.paths.latents import LatentNode

    saes = saes_for(model)
    corpus = torch.randint(0, 50, (5, 9), generator=torch.Generator().manual_seed(3))
    nodes = [LatentNode(SITES[0], 2), LatentNode(SITES[1], 5, 3), LatentNode(SITES[1])]
    labels = latent_labels(model, saes, corpus, nodes, k=2)
    assert labels[nodes[2]] == "error"
    for node in nodes[:2]:
        _, cache = model.run_with_cache(corpus)
        z = saes[node.site].encode(cache[node.site.hook_name])[..., node.latent].flatten()  # (rows · pos,)
        top = torch.topk(z, 2).indices
        expected = "|".join(dict.fromkeys(str(int(corpus.flatten()[i])) for i in top if z[i] > 0)) or "(silent)"
        assert labels[node] == expected
    with pytest.raises(PatchingError, match="no SAE given"):
        latent_labels(model, {SITES[0]: saes[SITES[0]]}, corpus, nodes)


def test_config_checks_its_method():
    from conftest import construct_unchecked
    from patching.paths.latents import LatentEdgeConfig

    with pytest.raises(PatchingError, match="method must be 'atp' or 'ig'"):
        construct_unchecked(LatentEdgeConfig, method="eap")
