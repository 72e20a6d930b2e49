"""Mixed circuits (heads, MLPs, SAE latents and error nodes in one graph; the embedding is the input): ablating one
node equals patching it by hand with TransformerLens hooks; the whole graph is faithful (1) with an
empty complement (0) under every ablation; on a planted affine toy the attribution estimates equal
exact patching and `find_circuit(saes=...)` recovers the planted nodes with recall 1."""

from __future__ import annotations

import pytest
import torch

from conftest import edited_pair, make_sae, planted_heads_model, saes_at, unchecked
from hooks_snapshot import assert_refused_before_any_forward
from patching.errors import PatchingError
from patching.model.sites import Site
from patching.paths import LatentNode, MixedCircuitResult, Node, find_circuit, mixed_faithfulness, mixed_nodes
from patching.paths.mixed_ablation import ablated_metrics
from patching.paths.mixed_circuits import _prepare
from patching.sweep import LogitDiff
from tests.conftest import learned_or_rotary_gqa

METRIC = LogitDiff(answer=3, wrong=4)
SITES = (Site(0, "resid_post"), Site(2, "resid_pre"))


@pytest.fixture(scope="module", params=["learned", "rotary_gqa"])
def model(request):
    return learned_or_rotary_gqa(request.param)


@pytest.fixture(scope="module")
def saes(model):
    return saes_at(model, SITES)


@pytest.fixture(scope="module")
def prompts():
    return edited_pair(5, 2, 7, [(None, 2, 9), (1, 5, 3)])


def naive_patched(model, saes, clean, corrupted, node):
    """The clean run with `node` alone set to its corrupted-run value, by hand: a head's z, an MLP's
    output, a latent through its decoder (`x + decode(f') − decode(f)`), the error node's error."""
    _, corr = model.run_with_cache(corrupted)
    if isinstance(node, LatentNode):
        sae, name = saes[node.site], node.site.hook_name

        def hook(x, hook):
            z, z_corr = sae.encode(x), sae.encode(corr[name])
            if node.latent is None:
                return sae.decode(z) + (corr[name] - sae.decode(z_corr))
            z_new = z.clone()
            z_new[..., node.latent] = z_corr[..., node.latent]
            return x + sae.decode(z_new) - sae.decode(z)
        hooks = [(name, hook)]
    elif node.kind == "head":
        def hook(x, hook):
            x = x.clone()
            x[:, :, node.head] = corr[hook.name][:, :, node.head]
            return x
        hooks = [(f"blocks.{node.layer}.attn.hook_z", hook)]
    else:
        hooks = [(f"blocks.{node.layer}.hook_mlp_out", lambda x, hook: corr[hook.name])]
    logits = model.run_with_hooks(clean, fwd_hooks=hooks)
    return (logits[0, -1, 3] - logits[0, -1, 4]).item()


def test_one_node_ablated_equals_patching_it_by_hand(model, saes, prompts):
    clean, corrupted = prompts
    nodes = [Node("head", 0, 1), Node("mlp", 1), Node("head", 2, 3), LatentNode(SITES[0], 2), LatentNode(SITES[0]),
             LatentNode(SITES[1], 7), LatentNode(SITES[1])]
    resolved, metric, _, runs, m_clean, _ = _prepare(model, saes, clean, corrupted, METRIC, None, "resample")
    values = ablated_metrics(model, resolved, metric, runs, [(frozenset({n}), True) for n in nodes], "resample", batch_size=3)
    with torch.inference_mode():
        for p in range(2):
            for j, node in enumerate(nodes):
                expected = naive_patched(model, saes, clean[p:p + 1], corrupted[p:p + 1], node)
                assert values[p, j].item() == pytest.approx(expected, abs=1e-4), (p, node)
    assert (values - m_clean[:, None]).abs().max() > 1e-2


@pytest.mark.parametrize("ablation", ["resample", "zero", "mean"])
def test_whole_graph_is_faithful_and_its_complement_empty(model, saes, prompts, ablation):
    clean, corrupted = prompts
    f = mixed_faithfulness(model, saes, clean, corrupted, METRIC, mixed_nodes(model, saes), ablation=ablation)
    torch.testing.assert_close(f.metric_circuit, f.metric_clean, atol=1e-5, rtol=0)
    torch.testing.assert_close(f.faithfulness, torch.ones(2), atol=1e-4, rtol=0)
    torch.testing.assert_close(f.completeness, torch.zeros(2), atol=1e-4, rtol=0)
    if ablation == "resample":  # every node at its corrupted value: the corrupted run
        torch.testing.assert_close(f.metric_empty, f.metric_corrupted, atol=1e-4, rtol=0)


@pytest.fixture(scope="module")
def planted():
    """The planted-heads toy (L0H1 and L1H2 strong, the other heads a thousandth) with an SAE between
    its layers whose latents 2 and 5 write strongly and the rest a thousandth as much."""
    toy = planted_heads_model()
    site = Site(1, "resid_pre")
    sae = make_sae(toy.cfg.d_model, 8, hook_name=site.hook_name, model_name=toy.cfg.model_name, seed=2)
    with torch.no_grad():
        scale = torch.full((8, 1), 1e-3)
        scale[[2, 5]] = 3.0
        sae.W_dec.mul_(scale)
    return toy, {site: sae}


def test_planted_mixed_circuit_recovered(planted, tmp_path):
    toy, saes = planted
    site = next(iter(saes))
    g = torch.Generator().manual_seed(11)
    clean = torch.randint(0, 50, (2, 6), generator=g)
    corrupted = clean.clone()
    corrupted[:, 1] = (corrupted[:, 1] + 13) % 50
    corrupted[:, 5] = (corrupted[:, 5] + 7) % 50
    truth = {Node("head", 0, 1), Node("head", 1, 2), LatentNode(site, 2), LatentNode(site, 5), LatentNode(site)}
    found = find_circuit(toy, clean, corrupted, METRIC, saes=saes, threshold=0.02, method="eap", curve_points=4)
    assert isinstance(found, MixedCircuitResult)
    assert set(found.nodes) == truth  # recall 1 and nothing else at the threshold
    torch.testing.assert_close(found.exact, found.estimate, atol=1e-4, rtol=0)  # AtP is exact on this affine toy
    assert found.faithfulness.faithfulness.min() > 0.99 and found.faithfulness.completeness.abs().max() < 0.01
    assert found.curve is not None and found.curve.faithfulness[-1] == pytest.approx(1.0, abs=1e-3)
    assert 0 < found.error_share < 1
    ig = find_circuit(toy, clean, corrupted, METRIC, saes=saes, threshold=0.02, method="eap_ig", steps=3, curve_points=0)
    torch.testing.assert_close(ig.estimate, found.estimate, atol=1e-4, rtol=0)  # a constant gradient: IG = AtP
    assert ig.edges == found.edges and len(found.edges) > 0  # and so for the edges' downstream gradients
    torch.testing.assert_close(ig.edge_estimate, found.edge_estimate, atol=1e-4, rtol=0)
    loaded = MixedCircuitResult.load(found.save(tmp_path / "mixed"))
    assert loaded.nodes == found.nodes and loaded.error_share == found.error_share
    assert found.plot_curve(tmp_path / "curve.png").stat().st_size > 0
    assert len(found.to_dataframe()) == len(truth)


@pytest.mark.parametrize("circuit, pattern", [
    (lambda s: [LatentNode(s, 99)], "latent out of range"),
    (lambda s: [LatentNode(Site(1, "resid_pre"), 0)], "no SAE given"),
    (lambda s: [LatentNode(s, 0, pos=7)], "position out of range"),
    (lambda s: [Node("head", 0, 9)], "heads 0..3"),
    (lambda s: ["L0H1"], "Node or LatentNode"),
    (lambda s: [Node("embed")], "the embedding is the input"),
])
def test_bad_circuits_refused_before_any_forward(model, saes, prompts, circuit, pattern):
    clean, corrupted = prompts
    assert_refused_before_any_forward(
        model, lambda: mixed_faithfulness(model, saes, clean, corrupted, METRIC, circuit(SITES[0])), PatchingError, pattern)


def test_find_circuit_with_saes_refuses_edges_and_bad_methods(model, saes, prompts):
    clean, corrupted = prompts
    with pytest.raises(PatchingError, match="graph of nodes"):
        find_circuit(model, clean, corrupted, METRIC, saes=saes, senders=[Node("embed")])
    with pytest.raises(PatchingError, match="ablation must be one of"):
        unchecked(mixed_faithfulness)(model, saes, clean, corrupted, METRIC, [], ablation="noise")


def test_model_left_as_found_after_a_failing_metric(model, saes, prompts):
    from hooks_snapshot import snapshot

    clean, corrupted = prompts
    before = snapshot(model), [p.requires_grad for p in model.parameters()]
    calls = []

    def failing(logits):  # passes the reference runs, fails inside the gradient pass
        calls.append(1)
        if len(calls) > 4:
            raise RuntimeError("user metric failed")
        return logits[:, 3] - logits[:, 4]

    from patching.sweep import CallableMetric

    with pytest.raises(RuntimeError, match="user metric failed"):
        find_circuit(model, clean, corrupted, CallableMetric(failing, readout=-1), saes=saes, method="eap")
    assert len(calls) > 4  # it failed in the gradient pass, past the reference runs
    assert (snapshot(model), [p.requires_grad for p in model.parameters()]) == before


def test_planted_circuit_edges_and_graph_json(planted, tmp_path):
    """The kept nodes' edges are `attribute_mixed_edges` of those nodes; the graph JSON holds them in the
    `latentpatch.graph/1` schema (checked by the head/MLP graph's own checker), latents labelled by
    their top activating tokens; save/load keeps the edges."""
    import json

    from patching.paths import attribute_mixed_edges
    from patching.paths.graph import check_graph_document
    from patching.paths.labels import latent_labels

    toy, saes = planted
    site = next(iter(saes))
    clean, corrupted = edited_pair(11, 2, 6, [(None, 1, 13), (None, 5, 7)])
    found = find_circuit(toy, clean, corrupted, METRIC, saes=saes, threshold=0.02, method="eap", curve_points=0)
    alone = attribute_mixed_edges(toy, saes, clean, corrupted, METRIC, found.nodes)
    assert found.edges == alone.edges and len(found.edges) > 0
    torch.testing.assert_close(found.edge_estimate, alone.effect.mean(0))
    assert (Node("head", 0, 1), LatentNode(site, 2)) in found.edges  # L0H1 writes the stream the site encodes
    corpus = torch.randint(0, 50, (3, 8), generator=torch.Generator().manual_seed(2))
    labels = latent_labels(toy, saes, corpus, [n for n in found.nodes if isinstance(n, LatentNode)])
    doc = json.loads(found.to_graph_json(tmp_path / "graph.json", labels=labels).read_text())
    check_graph_document(doc)
    kinds = {node["id"]: node["kind"] for node in doc["nodes"]}
    assert kinds == {**{n.label(): n.kind for n in found.nodes}, "logits": "logit"}
    by_id = {node["id"]: node for node in doc["nodes"]}
    assert by_id[LatentNode(site, 2).label()]["label"] == labels[LatentNode(site, 2)] != LatentNode(site, 2).label()
    assert by_id["L0H1"]["activation"] is None and by_id[LatentNode(site, 2).label()]["activation"] >= 0
    assert by_id[LatentNode(site, 2).label()]["layer"] == 1 and by_id["L1H2"]["layer"] == 1
    weights = {(e["source"], e["target"]): e["weight"] for e in doc["edges"]}
    assert weights == pytest.approx({(u.label(), "logits" if d.kind == "logits" else d.label()): float(w)
                                     for (u, d), w in zip(found.edges, found.edge_estimate)})
    assert doc["metadata"]["scores"]["faithfulness"] == pytest.approx(float(found.faithfulness.faithfulness.mean()))
    assert found.plot_graph(tmp_path / "graph.png").read_bytes()[:4] == b"\x89PNG"
    loaded = MixedCircuitResult.load(found.save(tmp_path / "saved"))
    assert loaded.edges == found.edges and torch.equal(loaded.edge_estimate, found.edge_estimate)
