"""`latentpatch circuit --sae ... --graph-json`: on a tiny worded model with two residual-stream SAEs saved
as folders, the command's latent graph and JSON file equal `attribute_latent_edges` and
`LatentGraph.to_graph_json` on the same inputs; without `--sae` the JSON is the head circuit's."""

from __future__ import annotations

import json

import pytest

import patching.model.loading as loading
from conftest import make_sae
from latentpatch.cli.entry import main
from patching import LogitDiff
from patching.model.sites import Site
from patching.paths import attribute_latent_edges
from worded_model import worded_model

PAIR = ["--clean", "w1 w2 w3 w4 w5", "--corrupted", "w1 w9 w3 w4 w5", "--answer", "w6", "--wrong", "w7"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return worded_model(tmp_path_factory.mktemp("tokenizer"), n_layers=3)


@pytest.fixture
def stubbed(tiny, monkeypatch):
    calls = []

    def load(*args, **kwargs):
        calls.append(args)
        return tiny

    monkeypatch.setattr(loading, "load_model", load)
    yield tiny
    assert calls


@pytest.fixture(scope="module")
def sae_folders(tiny, tmp_path_factory):
    folders, saes = [], {}
    for seed, layer in enumerate((1, 2)):
        site = Site(layer, "resid_pre")
        sae = make_sae(tiny.cfg.d_model, 16, hook_name=site.hook_name, model_name=tiny.cfg.model_name, seed=seed)
        folders.append(str(sae.save(tmp_path_factory.mktemp("sae") / f"l{layer}")))
        saes[site] = sae
    return folders, saes


def run(capsys, *argv):
    code = main([*argv, "--json"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    return json.loads(captured.out)


def test_sae_graph_json_equals_the_api(stubbed, sae_folders, capsys, tmp_path):
    folders, saes = sae_folders
    path = tmp_path / "graph.json"
    out = run(capsys, "circuit", *PAIR, "--sae", folders[0], "--sae", folders[1], "--latent-k", "4",
              "--graph-json", str(path), "--threshold", "0.5", "--method", "eap", "--graph-threshold", "0",
              "--label-rows", "0")
    metric = LogitDiff(stubbed.to_single_token("w6"), stubbed.to_single_token("w7"))
    expected = attribute_latent_edges(stubbed, saes, PAIR[1], PAIR[3], metric, k=4, direction="noise", progress=False)
    g = out["latent_graph"]
    assert g["sites"] == [s.hook_name for s in saes] and g["n_edges"] == len(expected.edges)
    assert g["replacement"] == pytest.approx(expected.scores().replacement, abs=1e-6)
    assert [(e["upstream"], e["downstream"]) for e in g["top_edges"]] == [(u, d) for u, d, _ in expected.top_edges(10)]
    doc = json.loads(path.read_text())
    reference = json.loads(expected.to_graph_json(tmp_path / "api.json").read_text())
    assert [n["id"] for n in doc["nodes"]] == [n["id"] for n in reference["nodes"]]
    assert [e["weight"] for e in doc["edges"]] == pytest.approx([e["weight"] for e in reference["edges"]], abs=1e-6)
    assert out["graph_json"] == str(path)


def test_without_sae_the_json_is_the_circuit(stubbed, capsys, tmp_path):
    path = tmp_path / "circuit.json"
    out = run(capsys, "circuit", *PAIR, "--graph-json", str(path), "--threshold", "0.2", "--method", "eap")
    doc = json.loads(path.read_text())
    assert out["latent_graph"] is None and len(doc["edges"]) == len(out["edges"])
    assert {n["kind"] for n in doc["nodes"]} <= {"embedding", "head", "mlp", "logit"}


def test_graph_labels_come_from_the_held_out_rows(stubbed, sae_folders, capsys, tmp_path, monkeypatch):
    import torch

    import training.data.heldout as heldout
    from patching.paths.labels import latent_labels

    rows = torch.randint(3, 50, (6, 10), generator=torch.Generator().manual_seed(2))
    asked = []
    monkeypatch.setattr(heldout, "heldout_tokens", lambda model, **kw: asked.append(kw) or rows)
    folders, saes = sae_folders
    path = tmp_path / "graph.json"
    run(capsys, "circuit", *PAIR, "--sae", folders[0], "--sae", folders[1], "--graph-json", str(path),
        "--threshold", "0.5", "--method", "eap", "--label-rows", "6", "--graph-threshold", "0.02")
    assert stubbed.cfg.n_ctx < 64  # rows as long as the model's context where it is shorter than 64 tokens
    assert asked == [{"n_rows": 6, "context_size": stubbed.cfg.n_ctx}]
    doc = json.loads(path.read_text())
    metric = LogitDiff(stubbed.to_single_token("w6"), stubbed.to_single_token("w7"))
    graph = attribute_latent_edges(stubbed, saes, PAIR[1], PAIR[3], metric, direction="noise", progress=False)
    nodes = {n.label(): n for n in graph.nodes}
    latents = [n for n in doc["nodes"] if n["kind"] == "latent"]
    assert latents and all(abs(e["weight"]) >= 0.02 for e in doc["edges"])
    expected = latent_labels(stubbed, saes, rows, [nodes[n["id"]] for n in latents])
    assert [n["label"] for n in latents] == [expected[nodes[n["id"]]] for n in latents]
    assert any(n["label"] != n["id"] for n in latents)


def test_bad_graph_threshold_refused_before_the_model_loads(monkeypatch, capsys):
    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before the bad input was refused")

    monkeypatch.setattr(loading, "load_model", refuse)
    assert main(["circuit", *PAIR, "--graph-threshold", "nan"]) == 1
    assert "--graph-threshold must be a finite number" in capsys.readouterr().err


def test_mixed_circuit_equals_the_api(stubbed, sae_folders, capsys):
    from patching.paths import find_circuit

    folders, saes = sae_folders
    out = run(capsys, "circuit", *PAIR, "--sae", folders[0], "--sae", folders[1], "--mixed", "--method", "eap",
              "--threshold", "0.05", "--latent-k", "2")
    metric = LogitDiff(stubbed.to_single_token("w6"), stubbed.to_single_token("w7"))
    expected = find_circuit(stubbed, PAIR[1], PAIR[3], metric, saes=saes, threshold=0.05, method="eap")
    assert [n["node"] for n in out["mixed_circuit"]["nodes"]] == [n.label() for n in expected.nodes]
    assert out["mixed_circuit"]["error_share"] == pytest.approx(expected.error_share, abs=1e-6)
    assert out["faithfulness"] == pytest.approx(float(expected.faithfulness.faithfulness.mean()), abs=1e-5)
    assert out["edges"] == [] and out["latent_graph"] is not None and out["mixed_circuit"]["nodes"]
    got = [(e["upstream"], e["downstream"], e["estimate"]) for e in out["mixed_circuit"]["edges"]]
    assert got == [(u.label(), d.label(), pytest.approx(float(w), abs=1e-6))
                   for (u, d), w in zip(expected.edges, expected.edge_estimate)] and got


def test_mixed_atp_star_and_its_graph_json_equal_the_api(stubbed, sae_folders, capsys, tmp_path, monkeypatch):
    import torch

    import training.data.heldout as heldout
    from patching.paths import find_circuit
    from patching.paths.labels import latent_labels

    rows = torch.randint(3, 50, (4, 10), generator=torch.Generator().manual_seed(3))
    monkeypatch.setattr(heldout, "heldout_tokens", lambda model, **kw: rows)
    folders, saes = sae_folders
    path = tmp_path / "mixed.json"
    out = run(capsys, "circuit", *PAIR, "--sae", folders[0], "--sae", folders[1], "--mixed", "--method", "atp*",
              "--threshold", "0.05", "--latent-k", "2", "--graph-json", str(path), "--label-rows", "4")
    metric = LogitDiff(stubbed.to_single_token("w6"), stubbed.to_single_token("w7"))
    expected = find_circuit(stubbed, PAIR[1], PAIR[3], metric, saes=saes, threshold=0.05, method="atp*")
    assert [n["node"] for n in out["mixed_circuit"]["nodes"]] == [n.label() for n in expected.nodes]
    assert out["graph_json"] == str(path)
    latents = [n for n in expected.nodes if getattr(n, "latent", None) is not None]
    labels = latent_labels(stubbed, saes, rows, latents) if latents else None
    with open(path) as handle:
        doc = json.load(handle)
    want = json.loads(expected.to_graph_json(tmp_path / "want.json", labels=labels).read_text())
    assert [n["id"] for n in doc["nodes"]] == [n["id"] for n in want["nodes"]]
    assert [n["label"] for n in doc["nodes"]] == [n["label"] for n in want["nodes"]]
    assert [(e["source"], e["target"]) for e in doc["edges"]] == [(e["source"], e["target"]) for e in want["edges"]]
    assert doc["metadata"]["method"] == "atp*" and any(n["kind"] == "latent" and n["label"] != n["id"] for n in doc["nodes"])


def test_atp_star_circuit_equals_the_api(stubbed, capsys):
    from patching.paths import find_circuit

    out = run(capsys, "circuit", *PAIR, "--method", "atp*", "--threshold", "0.2", "--layers", "1", "2")
    metric = LogitDiff(stubbed.to_single_token("w6"), stubbed.to_single_token("w7"))
    from patching.paths import receivers_of, upstream_nodes
    expected = find_circuit(stubbed, PAIR[1], PAIR[3], metric, method="atp*", threshold=0.2,
                            senders=upstream_nodes(stubbed, [1, 2]), receivers=receivers_of(stubbed, [1, 2]))
    assert [(e["sender"], e["receiver"]) for e in out["edges"]] == [(u.label(), r.label()) for u, r in expected.edges]
    assert out["mixed_circuit"] is None


def test_latent_paths_equal_the_api(stubbed, sae_folders, capsys):
    from patching.paths import LatentNode, Node, Receiver, patch_paths

    folders, saes = sae_folders
    up, down = list(saes)
    out = run(capsys, "paths", *PAIR, "--sae", folders[0], "--sae", folders[1], "--senders", "L1.resid_pre/#3",
              "L1.resid_pre/err", "L0H1", "L1.resid_pre/#5@2", "--receivers", "logits", "L2.resid_pre/#4", "L2.resid_pre/err",
              "--by", "edge", "--top", "50")
    metric = LogitDiff(stubbed.to_single_token("w6"), stubbed.to_single_token("w7"))
    expected = patch_paths(stubbed, PAIR[1], PAIR[3], metric, saes=saes, by="edge", progress=False,
                           senders=[LatentNode(up, 3), LatentNode(up), Node("head", 0, 1), LatentNode(up, 5, 2)],
                           receivers=[Receiver("logits"), LatentNode(down, 4), LatentNode(down)])
    assert out["receivers"] == ["logits", "L2.resid_pre/#4", "L2.resid_pre/err"]
    got = {(e["sender"], e["receivers"]): e["effect"] for e in out["top"]}
    want = {(s, r): e for s, r, e in expected.top(50)}
    assert got.keys() == want.keys() and all(got[k] == pytest.approx(want[k], abs=1e-6) for k in got)


@pytest.mark.parametrize("argv, pattern", [
    (["paths", *PAIR, "--senders", "L1.resid_pre/#99", "--sae", "FOLDER0"], "latent out of range"),
    (["paths", *PAIR, "--senders", "L0.resid_pre/#1", "--sae", "FOLDER0"], "no SAE given"),
    (["paths", *PAIR, "--senders", "L1.resid_pre/#1"], "pass saes="),
    (["paths", *PAIR, "--receivers", "L2.resid_pre/#x"], "expected one of logits"),
    (["paths", *PAIR, "--senders", "L1H0", "--sae", "GPT2"], "gpt2"),
    (["circuit", *PAIR, "--mixed"], "--mixed needs --sae"),
    (["circuit", *PAIR, "--mixed", "--sae", "FOLDER0", "--layers", "1", "--method", "atp*"], "takes every layer"),
    (["circuit", *PAIR, "--mixed", "--sae", "FOLDER0", "--method", "atp*", "--graph-json", "FOLDER0", "--label-rows", "0"],
     "--graph-json"),
])
def test_hostile_latent_inputs_refused_before_any_forward(tiny, sae_folders, tmp_path, capsys, monkeypatch, argv, pattern):
    from hooks_snapshot import CountingHook

    monkeypatch.setattr(loading, "load_model", lambda *args, **kwargs: tiny)
    stubbed = tiny
    folders, _ = sae_folders
    other = make_sae(stubbed.cfg.d_model, 16, hook_name="blocks.1.hook_resid_pre", model_name="gpt2", seed=0)
    names = {"FOLDER0": folders[0], "GPT2": str(other.save(tmp_path / "gpt2"))}
    counter = CountingHook(stubbed)
    try:
        code = main([names.get(a, a) for a in argv])
    finally:
        counter.remove()
    assert code != 0 and pattern in capsys.readouterr().err
    assert counter.count == 0
