"""Circuits: edge-ablated runs against exact path patching, faithfulness 1 for the whole graph and
completeness 0 for its empty complement, and a planted circuit recovered by `find_circuit`."""

from __future__ import annotations

import pytest
import torch

from conftest import planted_heads_model
from patching.errors import PatchingError
from patching.model import tl_compat
from patching.paths import Node, Receiver, patch_paths, receivers_of, upstream_nodes
from patching.paths.circuits import edge_ablated_metrics, faithfulness
from patching.paths.nodes import reaches
from patching.sweep import LogitDiff

METRIC = LogitDiff(answer=3, wrong=4)


@pytest.fixture(scope="module", params=["learned", "rotary_gqa"])
def model(request):
    if request.param == "learned":
        model = tl_compat.random_model(n_layers=2, d_vocab=50, n_ctx=32)
    else:
        model = tl_compat.random_model(n_layers=2, d_vocab=50, n_ctx=32, positional_embedding_type="rotary",
                                       rotary_dim=4, normalization_type="RMS", n_key_value_heads=2,
                                       act_fn="silu", gated_mlp=True, seed=1)
    return model.eval()


@pytest.fixture(scope="module")
def prompts():
    g = torch.Generator().manual_seed(11)
    clean = torch.randint(0, 50, (2, 6), generator=g)
    corrupted = clean.clone()
    corrupted[:, 1] = (corrupted[:, 1] + 13) % 50
    corrupted[:, 5] = (corrupted[:, 5] + 7) % 50
    return clean, corrupted


def graph(model):
    senders, receivers = upstream_nodes(model), receivers_of(model)
    return senders, receivers, {(u, r) for u in senders for r in receivers if reaches(u, r, model)}


def test_whole_graph_is_faithful_and_its_complement_empty(model, prompts):
    clean, corrupted = prompts
    senders, receivers, edges = graph(model)
    f = faithfulness(model, clean, corrupted, METRIC, edges, senders=senders, receivers=receivers)
    torch.testing.assert_close(f.faithfulness, torch.ones(2), atol=1e-4, rtol=0)
    torch.testing.assert_close(f.completeness, torch.zeros(2), atol=1e-4, rtol=0)
    torch.testing.assert_close(f.metric_circuit, f.metric_clean, atol=1e-5, rtol=0)
    torch.testing.assert_close(f.metric_empty, f.metric_corrupted, atol=1e-5, rtol=0)  # the whole graph: M(∅) is corrupted
    torch.testing.assert_close(f.metric_complement, f.metric_corrupted, atol=1e-5, rtol=0)
    assert (f.metric_clean - f.metric_corrupted).abs().min() > 0.05


def test_missing_one_edge_equals_noising_path_patching_of_it(model, prompts):
    clean, corrupted = prompts
    senders, receivers, edges = graph(model)
    kv = tl_compat.n_kv_heads(model)
    sample = [(Node("embed"), Receiver("k", 0, kv - 1)), (Node("head", 0, 2), Receiver("q", 1, 1)),
              (Node("mlp", 0), Receiver("v", 1, 0)), (Node("head", 1, 3), Receiver("logits")),
              (Node("head", 0, 0), Receiver("mlp", 0)), (Node("embed"), Receiver("logits"))]
    values, m_clean, _ = edge_ablated_metrics(model, clean, corrupted, METRIC, [edges - {e} for e in sample],
                                              senders=senders, receivers=receivers)
    exact = patch_paths(model, clean, corrupted, METRIC, senders=[u for u, _ in sample], receivers=[r for _, r in sample],
                        by="edge", direction="noise", progress=False)
    expected = torch.stack([exact.metric[:, i, i] for i in range(len(sample))], 1)
    torch.testing.assert_close(values, expected, atol=1e-4, rtol=0)
    assert (values - m_clean[:, None]).abs().max() > 1e-2


def test_a_partial_graph_measures_its_own_empty_circuit(model, prompts):
    clean, corrupted = prompts
    senders, receivers = upstream_nodes(model, layers=[1], embed=False), receivers_of(model, layers=[1])
    edges = {(u, r) for u in senders for r in receivers if reaches(u, r, model)}
    f = faithfulness(model, clean, corrupted, METRIC, set(), senders=senders, receivers=receivers)
    values, _, _ = edge_ablated_metrics(model, clean, corrupted, METRIC, [set()], senders=senders, receivers=receivers)
    torch.testing.assert_close(f.metric_empty, values[:, 0])
    assert (f.metric_empty - f.metric_corrupted).abs().max() > 1e-3  # layer 0 stays intact: not the corrupted run
    torch.testing.assert_close(f.faithfulness, torch.zeros(2), atol=1e-6, rtol=0)
    whole = faithfulness(model, clean, corrupted, METRIC, edges, senders=senders, receivers=receivers)
    torch.testing.assert_close(whole.faithfulness, torch.ones(2), atol=1e-4, rtol=0)


def test_edges_outside_the_graph_refused(model, prompts):
    clean, corrupted = prompts
    senders, receivers, _ = graph(model)
    with pytest.raises(PatchingError, match="outside the graph"):
        edge_ablated_metrics(model, clean, corrupted, METRIC, [{(Node("head", 1, 0), Receiver("q", 0, 0))}],
                             senders=senders, receivers=receivers)


@pytest.fixture(scope="module")
def planted():
    return planted_heads_model()


def test_planted_circuit_recovered(planted, prompts, tmp_path):
    from patching.paths.circuits import find_circuit

    clean, corrupted = prompts
    heads = {Node("embed"), Node("head", 0, 1), Node("head", 1, 2)}
    reads = {Receiver("v", 0, 1), Receiver("v", 1, 2), Receiver("logits")}
    truth = {(u, r) for u in heads for r in reads if reaches(u, r, planted)}
    found = find_circuit(planted, clean, corrupted, METRIC, threshold=0.02, method="eap", steps=1)
    assert truth <= set(found.edges)  # recall 1 at the threshold
    assert set(found.edges) == truth
    torch.testing.assert_close(found.exact, found.estimate, atol=1e-4, rtol=0)  # EAP is exact on this affine model
    assert found.faithfulness.faithfulness.min() > 0.99 and found.faithfulness.completeness.abs().max() < 0.01
    assert len(found.to_dataframe()) == len(truth)
    loaded = type(found).load(found.save(tmp_path / "circuit"))
    assert loaded.edges == found.edges and loaded.provenance == found.provenance
    torch.testing.assert_close(loaded.faithfulness.faithfulness, found.faithfulness.faithfulness)
    assert (tmp_path / "circuit" / "plot.png").stat().st_size > 0
    top = find_circuit(planted, clean, corrupted, METRIC, k=2, method="eap", steps=1)
    assert set(top.edges) <= truth and len(top.edges) == 2
    capped = find_circuit(planted, clean, corrupted, METRIC, threshold=0.02, method="eap", steps=1, max_candidates=3)
    assert capped.provenance["candidates_capped"] and not found.provenance["candidates_capped"]
    assert capped.provenance["n_candidates"] == 3 and set(capped.edges) <= truth


def test_circuit_config_checks_its_fields():
    from conftest import construct_unchecked
    from patching.paths.circuits import CircuitConfig

    with pytest.raises(PatchingError, match="k must be a positive int"):
        construct_unchecked(CircuitConfig, k=0)
    with pytest.raises(PatchingError, match="threshold must be a number >= 0"):
        construct_unchecked(CircuitConfig, threshold=-1.0)


def test_zero_ablating_every_edge_leaves_only_the_attention_biases(prompts):
    model = tl_compat.random_model(n_layers=2, d_vocab=50, n_ctx=32, seed=6).eval()
    with torch.no_grad():
        for block in model.blocks:
            block.attn.b_O.normal_()
    clean, corrupted = prompts
    senders, receivers, _ = graph(model)
    values, _, _ = edge_ablated_metrics(model, clean, corrupted, METRIC, [set()], senders=senders, receivers=receivers,
                                        ablation="zero")
    with torch.inference_mode():  # b_O belongs to no head: it is all the final residual keeps
        final = sum(block.attn.b_O for block in model.blocks)
        logits = model.unembed(model.ln_final(final[None, None]))[0, 0]
    expected = (logits[3] - logits[4]).item()
    torch.testing.assert_close(values, torch.full((2, 1), expected), atol=1e-5, rtol=0)


def test_position_mean_over_identical_clean_prompts_changes_nothing(model, prompts):
    clean, corrupted = prompts
    same = clean[:1].repeat(2, 1)
    senders, receivers, _ = graph(model)
    values, m_clean, _ = edge_ablated_metrics(model, same, corrupted, METRIC, [set()], senders=senders,
                                              receivers=receivers, ablation="position_mean")
    torch.testing.assert_close(values[:, 0], m_clean, atol=1e-5, rtol=0)
    with pytest.raises(PatchingError, match="faithfulness is undefined"):
        faithfulness(model, same, corrupted, METRIC, set(), senders=senders, receivers=receivers,
                     ablation="position_mean")
    with pytest.raises(PatchingError, match="ablation must be one of"):
        edge_ablated_metrics(model, clean, corrupted, METRIC, [set()], senders=senders, receivers=receivers,
                             ablation="median")


def test_graph_json_round_trip_and_drawing(planted, prompts, tmp_path):
    import json

    from patching.paths.circuits import find_circuit
    from patching.paths.graph import EDGE_KEYS, GRAPH_NODE_KINDS, METADATA_KEYS, NODE_KEYS, check_graph_document

    clean, corrupted = prompts
    found = find_circuit(planted, clean, corrupted, METRIC, threshold=0.02, method="eap", steps=1)
    doc = json.loads(found.to_graph_json(tmp_path / "graph.json").read_text())
    check_graph_document(doc)
    assert doc["schema"] == "latentpatch.graph/1" and set(METADATA_KEYS) <= set(doc["metadata"])
    assert all(set(NODE_KEYS) <= set(n) and n["kind"] in GRAPH_NODE_KINDS for n in doc["nodes"])
    assert all(set(EDGE_KEYS) <= set(e) for e in doc["edges"])
    ids = {n["id"]: n for n in doc["nodes"]}
    expected = {(u.label() if u.kind != "embed" else "embed",
                 "logits" if r.kind == "logits" else f"L{r.layer}H{r.head}", float(w))
                for (u, r), w in zip(found.edges, found.exact)}
    assert {(e["source"], e["target"], round(e["weight"], 5)) for e in doc["edges"]} == {(u, r, round(w, 5))
                                                                                        for u, r, w in expected}
    assert ids["logits"]["kind"] == "logit" and ids["embed"]["kind"] == "embedding" and ids["embed"]["layer"] == -1
    assert ids["L0H1"]["influence"] > 0 and doc["metadata"]["scores"]["faithfulness"] > 0.99
    assert doc["metadata"]["model"] == found.provenance["model"] and doc["metadata"]["prompts"]["base"]
    assert found.plot_graph(tmp_path / "graph.png").stat().st_size > 0
    broken = dict(doc, edges=doc["edges"] + [{"source": "nowhere", "target": "logits", "weight": 1.0}])
    with pytest.raises(PatchingError, match="between existing node ids"):
        check_graph_document(broken)
    with pytest.raises(PatchingError, match="metadata lacks"):
        check_graph_document(dict(doc, metadata={}))


def test_threshold_curve_ends_faithful_with_an_empty_complement(planted, prompts, tmp_path):
    from patching.paths.circuits import CircuitResult, find_circuit

    clean, corrupted = prompts
    found = find_circuit(planted, clean, corrupted, METRIC, threshold=0.02, method="eap", steps=1, curve_points=5)
    curve = found.curve
    assert int(curve.n_edges[0]) == 1 and len(curve.n_edges) >= 4
    assert float(curve.faithfulness[-1]) == pytest.approx(1.0, abs=1e-5)  # the whole graph
    assert float(curve.completeness[-1]) == pytest.approx(0.0, abs=1e-6)  # its complement is empty
    at_truth = [j for j, n in enumerate(curve.n_edges.tolist()) if n >= len(found.edges)][0]
    assert float(curve.faithfulness[at_truth]) > 0.99
    assert (curve.threshold[:-1] >= curve.threshold[1:]).all()
    assert found.plot_curve(tmp_path / "curve.png").stat().st_size > 0
    loaded = CircuitResult.load(found.save(tmp_path / "saved"))
    torch.testing.assert_close(loaded.curve.faithfulness, curve.faithfulness)
    assert find_circuit(planted, clean, corrupted, METRIC, threshold=0.02, method="eap", curve_points=0).curve is None


def test_graph_scores_closed_form():
    """a → b (3), e1 → b (1), b → logit (2), e2 → logit (2): rows normalise to b: (¾, ¼), logit: (½, ½);
    influence b ½, e2 ½, a ⅜, e1 ⅛; replacement ⅜ / (⅜ + ⅛ + ½); completeness Σ (non-error share ×
    (influence + logit weight)) / Σ weight = (⅜ + ⅛ + ¾·½ + ½ + ½·1) / 2.5."""
    from patching.paths.graph import graph_scores, influence

    def node(i, kind):
        return {"id": i, "kind": kind, "layer": 0, "position": None, "label": i, "activation": None, "influence": 0.0}

    nodes = [node("a", "latent"), node("e1", "error"), node("b", "latent"), node("e2", "error"), node("out", "logit")]
    edges = [{"source": s, "target": t, "weight": w} for s, t, w in
             [("a", "b", 3.0), ("e1", "b", -1.0), ("b", "out", 2.0), ("e2", "out", 2.0)]]
    torch.testing.assert_close(influence(nodes, edges), torch.tensor([0.375, 0.125, 0.5, 0.5, 0.0], dtype=torch.float64))
    scores = graph_scores(nodes, edges)
    assert scores.replacement == pytest.approx(0.375)
    assert scores.completeness == pytest.approx((0.375 + 0.125 + 0.75 * 0.5 + 0.5 + 0.5) / 2.5)
    no_errors = graph_scores(nodes[:1] + nodes[2:3] + nodes[4:], [edges[0], edges[2]])
    assert (no_errors.replacement, no_errors.completeness) == (1.0, 1.0)
