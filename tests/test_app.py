"""`latentpatch serve` (issue 29 §2): the app's API on a tiny random model with a word-level tokenizer,
each number checked against the Python API or a naive computation; its refusals (typed errors as 400
with no forward pass run, a busy model as 409, bodies and prompts capped, no path outside its own
files). The end-to-end run in Chromium is tests/test_app_browser.py."""

from __future__ import annotations

import threading
import time

import pytest
import torch
from fastapi.testclient import TestClient

from conftest import make_sae
from patching.model import tl_compat
from patching.model.sites import Site
from worded_model import worded_model

CLEAN, CORRUPTED = "w1 w2 w3 w4 w5", "w1 w9 w3 w4 w5"
PAIR = {"sae": 0, "clean": CLEAN, "corrupted": CORRUPTED, "answer": "w7", "wrong": "w8"}
CARD_TEXTS = [" ".join(f"w{(7 * i + 3 * j) % 47}" for j in range(24)) for i in range(6)]


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return worded_model(tmp_path_factory.mktemp("tokenizer"), n_ctx=96)


@pytest.fixture(scope="module")
def sae(model):
    return make_sae(model.cfg.d_model, 48, hook_name="blocks.1.hook_resid_pre", model_name=model.cfg.model_name)


@pytest.fixture(scope="module")
def bench(model, sae):
    from latentpatch.app import Workbench

    return Workbench(model, [sae], ["tiny"], card_texts=CARD_TEXTS)


@pytest.fixture(scope="module")
def client(bench):
    from latentpatch.app import create_app

    return TestClient(create_app(bench), raise_server_exceptions=False)


def wait(client, job: dict, timeout: float = 60.0) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        state = client.get(f"/api/jobs/{job['id']}").json()
        if state["state"] != "running":
            return state
        assert time.monotonic() < deadline, state
        time.sleep(0.02)


def events(state: dict, kind: str) -> list[dict]:
    return [e for e in state["events"] if e["kind"] == kind]


def latents_at_site(model, sae, text: str):
    """Naive reference: the model run with a cache, the SAE's encoder on the site's activation."""
    tokens = model.to_tokens(text)
    _, cache = model.run_with_cache(tokens, names_filter=sae.cfg.hook_name)
    return sae.encode(cache[sae.cfg.hook_name])[0].detach(), model.to_str_tokens(tokens)


def test_pages_and_info(client, sae):
    for url in ("/", "/latents", "/patch", "/steer", "/circuits"):
        response = client.get(url)
        assert response.status_code == 200 and response.headers["content-type"].startswith("text/html")
        assert "/static/app.js" in response.text and "https://" not in response.text  # no CDN
    assert "fetch(" in client.get("/static/app.js").text
    info = client.get("/api/info").json()
    assert info["saes"] == [{"index": 0, "name": "tiny", "site": "blocks.1.hook_resid_pre", "d_sae": sae.d_sae}]
    assert info["n_layers"] == 2


def test_search_ranks_latents_by_their_largest_activation(client, model, sae):
    out = client.post("/api/search", json={"sae": 0, "text": CLEAN}).json()
    z, strings = latents_at_site(model, sae, CLEAN)
    z = z[1:]  # BOS is a special token: left out, as the cards leave it out
    best, where = z.max(0)
    expected = [i for i in torch.argsort(best, descending=True, stable=True).tolist() if best[i] > 0][:20]
    assert [r["latent"] for r in out["latents"]] == expected
    for row in out["latents"]:
        assert row["activation"] == pytest.approx(float(best[row["latent"]]), abs=1e-5)
        assert row["token"] == strings[1 + int(where[row["latent"]])]
    assert [t["token"] for t in out["tokens"]] == strings and out["tokens"][0]["counted"] is False


def test_card_shows_the_latents_strongest_context(client, model, sae):
    latent = 5
    html = client.get(f"/api/card/0/{latent}").text
    assert f'id="latent-{latent}"' in html and "data:image/png;base64," in html
    from patching.inspect.pages import round_sig

    strongest = max(float(latents_at_site(model, sae, text)[0][1:, latent].max()) for text in CARD_TEXTS)
    contexts = html.split("top-activating context")[1]
    shown = contexts.split('<td class="num">')[1].split("</td>")[0]
    assert strongest > 0 and shown == round_sig(strongest)


def test_sweep_equals_patch_latents_and_its_check_equals_verify(client, model, sae):
    from patching import LogitDiff, attribute_latents, patch_latents, verify

    state = wait(client, client.post("/api/sweep", json=PAIR).json())
    assert state["state"] == "done", state["error"]
    (heat,) = events(state, "heatmap")
    metric = LogitDiff(*[int(model.to_tokens(w, prepend_bos=False)[0, 0]) for w in ("w7", "w8")])
    exact = patch_latents(model, sae, CLEAN, CORRUPTED, metric, progress=False)
    expected = {(u.position, u.latent): float(e) for u, e in zip(exact.units, exact.mean_effect)}
    assert heat["units"] == len(exact.units) and heat["tokens"] == exact.base_tokens[0]
    shown = {(p, latent): row[j] for p, row in enumerate(heat["effects"]) for j, latent in enumerate(heat["latents"])}
    assert all(value is None if (p, latent) not in expected else value == pytest.approx(expected[p, latent], abs=1e-6)
               for (p, latent), value in shown.items())
    strongest = max(expected.values(), key=abs)
    assert any(value == pytest.approx(strongest, abs=1e-6) for value in shown.values() if value is not None)
    assert [(r["position"], r["latent"]) for r in heat["top"]] == [(e.position, e.latent) for e in exact.top(10)]
    (check,) = events(state, "check")
    reference = verify(attribute_latents(model, sae, CLEAN, CORRUPTED, metric, progress=False), k=10, random_k=10)
    assert check["spearman"] == pytest.approx(reference.spearman, abs=1e-6)
    assert check["recall_at_k"] == reference.recall_at_k and check["n_checked"] == reference.n_checked
    assert [u["exact"] for u in check["units"]] == pytest.approx(reference.exact.mean_effect.tolist(), abs=1e-6)


def naive_kl(base, steered, mask) -> float:
    total, count = 0.0, 0
    for row in range(base.shape[0]):
        for pos in range(base.shape[1]):
            if mask[row, pos]:
                p, q = base[row, pos].double().softmax(-1), steered[row, pos].double().softmax(-1)
                total += float((p * (p.log() - q.log())).sum())
                count += 1
    return total / count


def test_steer_streams_the_python_generation_and_its_kl(client, model, sae):
    from patching import generate_steered, steer
    from patching.model.tokens import padded_tokens
    from patching.steering.concepts import NEUTRAL

    request = {"sae": 0, "prompt": "w1 w2 w3", "latents": [3, 11], "method": "add", "coefficient": 6.0, "max_new_tokens": 6}
    state = wait(client, client.post("/api/steer", json=request).json())
    assert state["state"] == "done", state["error"]
    reference = generate_steered(model, sae, [3, 11], "w1 w2 w3", method="add", coefficient=6.0, max_new_tokens=6)
    final = {e["column"]: e["text"] for e in events(state, "continuation")}
    assert final == {"steered": reference.steered[0], "unsteered": reference.unsteered[0]}
    assert final["steered"] != final["unsteered"]
    streamed = [e for e in events(state, "token") if e["column"] == "steered"]
    assert streamed[0]["n"] == 1 and [e["n"] for e in streamed] == sorted({e["n"] for e in streamed})
    assert all(final["steered"].startswith(e["text"].rstrip()) for e in streamed)  # each a prefix of the whole

    tokens, mask = padded_tokens(model, list(NEUTRAL))
    with torch.inference_mode():
        base = model(tokens)
        with steer(model, sae, [3, 11], method="add", coefficient=6.0):
            steered = model(tokens)
    (kl,) = events(state, "kl")
    assert kl["kl"] == pytest.approx(naive_kl(base, steered, mask), rel=1e-4) and kl["kl"] > 0


def test_with_no_throttle_every_token_is_streamed(client, monkeypatch):
    import latentpatch.app.experiments as experiments

    monkeypatch.setattr(experiments, "STREAM_EVERY_S", 0.0)
    request = {"sae": 0, "prompt": "w1 w2 w3", "latents": [3, 11], "coefficient": 6.0, "max_new_tokens": 6}
    state = wait(client, client.post("/api/steer", json=request).json())
    streamed = [e for e in events(state, "token") if e["column"] == "unsteered"]
    assert [e["n"] for e in streamed] == list(range(1, 7))
    assert streamed[-1]["text"] == events(state, "continuation")[-1]["text"]


def test_steer_from_a_contrast_names_the_contrast_latents(client, model, sae):
    from patching import contrast_latents

    positive, negative = ["w1 w2 w3", "w1 w2 w4"], ["w30 w31 w32", "w30 w33 w34"]
    request = {"sae": 0, "prompt": "w5 w6", "positive": positive, "negative": negative, "k": 2, "scale": "activation",
               "coefficient": 2.0, "max_new_tokens": 3}
    state = wait(client, client.post("/api/steer", json=request).json())
    assert state["state"] == "done", state["error"]
    (chosen,) = events(state, "latents")
    assert chosen["latents"] == list(contrast_latents(model, sae, positive, negative, k=2).latents)


def test_circuit_lists_find_circuits_edges(client, model):
    from patching import LogitDiff, find_circuit
    from patching.paths.graph import circuit_document

    state = wait(client, client.post("/api/circuit", json={**PAIR, "k": 3}).json())
    assert state["state"] == "done", state["error"]
    (found,) = events(state, "circuit")
    metric = LogitDiff(*[int(model.to_tokens(w, prepend_bos=False)[0, 0]) for w in ("w7", "w8")])
    reference = find_circuit(model, CLEAN, CORRUPTED, metric, k=3, curve_points=0)
    assert [(e["sender"], e["receiver"]) for e in found["edges"]] == [(u.label(), r.label()) for u, r in reference.edges]
    assert found["scores"]["faithfulness"] == pytest.approx(float(reference.faithfulness.faithfulness.mean()), abs=1e-5)
    document = circuit_document(reference)
    assert [n["id"] for n in found["graph"]["nodes"]] == [n["id"] for n in document["nodes"]]
    assert [e["weight"] for e in found["graph"]["edges"]] == pytest.approx([e["weight"] for e in document["edges"]], abs=1e-5)


def test_latent_circuit_keeps_the_k_strongest_edges_of_attribute_latent_edges(client, model, sae):
    from patching import LogitDiff
    from patching.paths import attribute_latent_edges

    state = wait(client, client.post("/api/circuit", json={**PAIR, "k": 5, "nodes": "latents"}).json())
    assert state["state"] == "done", state["error"]
    (found,) = events(state, "circuit")
    metric = LogitDiff(*[int(model.to_tokens(w, prepend_bos=False)[0, 0]) for w in ("w7", "w8")])
    graph = attribute_latent_edges(model, sae, CLEAN, CORRUPTED, metric, progress=False)
    # one SAE: every node feeds the metric, with its node effect (AtP)
    effect = {node.label(): float(e) for node, e in zip(graph.nodes, graph.node_effect.mean(0))}
    strongest = sorted(effect.items(), key=lambda item: -abs(item[1]))[:5]
    assert [(e["sender"], e["estimate"]) for e in found["edges"]] == [(n, pytest.approx(v, abs=1e-6)) for n, v in strongest]
    latents = [n for n in found["graph"]["nodes"] if n["kind"] == "latent"]
    assert latents and all(n["site"] == "blocks.1.hook_resid_pre" and isinstance(n["latent"], int) for n in latents)
    refused = client.post("/api/circuit", json={**PAIR, "nodes": "neurons"})
    assert refused.status_code == 400 and "nodes:" in refused.json()["error"]


def test_non_finite_results_are_sent_as_null():
    import json

    from latentpatch.app.jobs import Job

    job = Job(id="x", kind="test")
    job.emit("check", spearman=float("nan"), units=[{"atp": float("inf"), "exact": 0.5}], k=3)
    sent = json.loads(json.dumps(job.to_dict(), allow_nan=False))
    assert sent["events"][0]["spearman"] is None and sent["events"][0]["units"] == [{"atp": None, "exact": 0.5}]


@pytest.fixture
def forward_count(model):
    """Forward passes that reach block 0 while the test runs."""
    calls = []
    with tl_compat.hooks(model, [(Site(0, "resid_pre").hook_name, lambda x: calls.append(1))]):
        yield calls


BAD = [
    ("/api/sweep", {**PAIR, "clean": "   "}, "clean: expected a non-empty prompt"),
    ("/api/sweep", {**PAIR, "corrupted": "w1 w9 w3"}, "different token lengths"),
    ("/api/sweep", {**PAIR, "answer": "w7 w8"}, "expected exactly one token"),
    ("/api/sweep", {**PAIR, "clean": " ".join(["w1"] * 80), "corrupted": " ".join(["w2"] * 80)}, "at most 64"),
    ("/api/sweep", {**PAIR, "sae": 3}, "expected an SAE index in 0..0"),
    ("/api/steer", {"prompt": "w1", "latents": [48]}, "unknown latent 48"),
    ("/api/steer", {"prompt": "w1", "latents": [1], "coefficient": 1e9}, "|c| <= 1000"),
    ("/api/steer", {"prompt": "w1", "latents": [1], "max_new_tokens": 5000}, "max_new_tokens: expected an integer in 1..64"),
    ("/api/steer", {"prompt": "w1", "latents": [1], "scale": "activation"}, "choose latents from a contrast"),
    ("/api/steer", {"prompt": "w1"}, "give latent ids, or positive and negative texts"),
    ("/api/steer", {"prompt": " ".join(["w1"] * 40), "latents": [1], "max_new_tokens": 60}, "exceed the model's context of 96"),
    ("/api/steer", {"prompt": "w1", "positive": ["w1"], "negative": [""]}, "negative[0]: expected a non-empty prompt"),
    ("/api/search", {"text": ""}, "text: expected a non-empty prompt"),
    ("/api/search", ["not", "an", "object"], "must be a JSON object"),
]


@pytest.mark.parametrize(("url", "body", "message"), BAD, ids=[b[2][:30] for b in BAD])
def test_bad_input_is_a_400_with_its_message_and_no_forward_pass(client, forward_count, url, body, message):
    response = client.post(url, json=body)
    assert response.status_code == 400 and message in response.json()["error"], response.json()
    assert forward_count == []


def test_unknown_latent_card_and_malformed_bodies(client, forward_count):
    response = client.get("/api/card/0/48")
    assert response.status_code == 400 and "unknown latent 48" in response.json()["error"]
    assert client.get("/api/card/0/abc").status_code == 400
    assert "not JSON" in client.post("/api/sweep", content=b"{oops", headers={"content-type": "application/json"}).json()["error"]
    assert client.post("/api/sweep", content=b"x" * 70_000, headers={"content-type": "application/json"}).status_code == 413

    def chunks():
        for _ in range(40):
            yield b"x" * 4096

    assert client.post("/api/search", content=chunks()).status_code == 413  # no Content-Length: counted as it streams
    assert forward_count == []


@pytest.mark.parametrize("url", ["/static/../../etc/passwd", "/static/..%2F..%2Fetc%2Fpasswd", "/static/%2e%2e%2fserver.py",
                                 "/static/server.py", "/static/jobs.py", "/..%2F..%2Fetc%2Fpasswd", "/static/app.js%00.html",
                                 "/static//etc/passwd", "/api/card/0/..%2F..%2Fetc%2Fpasswd"])
def test_requests_reach_only_the_apps_own_files(client, url):
    response = client.get(url)
    assert response.status_code in (400, 404) and "root:" not in response.text and "import " not in response.text


def test_host_header_must_name_this_machine(client):
    assert client.get("/api/info", headers={"host": "attacker.example"}).status_code == 400


def test_an_unexpected_error_is_one_line_not_a_trace(client, bench, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("secret internals")

    monkeypatch.setattr(bench, "search", broken)
    response = client.post("/api/search", json={"text": "w1"})
    assert response.status_code == 500 and "secret" not in response.text and "Traceback" not in response.text


def hook_counts(model) -> list[int]:
    return [len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules()]


def test_one_job_at_a_time_and_cancel_between_forward_passes(client, bench, model):
    before = hook_counts(model)
    release, passes = threading.Event(), []
    tokens = model.to_tokens("w1 w2 w3")

    def endless(job):
        while True:  # forward passes until cancelled: the watching hook raises at the next one
            release.wait(5)
            with torch.inference_mode():
                model(tokens)
            passes.append(1)

    job = bench.runner.start("test", endless)
    busy = client.post("/api/sweep", json=PAIR)
    assert busy.status_code == 409 and "busy" in busy.json()["error"] and job.id in busy.json()["error"]
    assert client.post("/api/search", json={"text": "w1"}).status_code == 409
    release.set()
    while len(passes) < 3:
        time.sleep(0.01)
    assert client.post(f"/api/jobs/{job.id}/cancel").status_code == 200
    state = wait(client, {"id": job.id})
    assert state["state"] == "cancelled" and state["rows"] >= 3
    assert hook_counts(model) == before  # the job's hook is gone; the model is as it was
    assert client.post("/api/search", json={"text": "w1"}).status_code == 200  # the model is free again



def test_serve_refuses_an_unknown_sae_in_one_line_before_any_model_loads(monkeypatch, capsys):
    import patching.model.loading as loading
    from latentpatch.cli.entry import main

    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before the bad SAE was refused")

    monkeypatch.setattr(loading, "load_model", refuse)
    monkeypatch.setattr(loading, "load_model_for", refuse)
    assert main(["serve", "smollm2-135m-res/blocks.99.hook_resid_pre", "--port", "0"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "blocks.99.hook_resid_pre" in err and "Traceback" not in err
    assert main(["serve", "x", "--port", "70000"]) == 1 and "--port" in capsys.readouterr().err


def test_cards_are_cached_and_bounded(client, bench, monkeypatch):
    import latentpatch.app.workbench as workbench

    monkeypatch.setattr(workbench, "MAX_CARDS", 2)
    pages = [client.get(f"/api/card/0/{latent}").text for latent in (1, 2, 1, 3)]
    assert pages[0] == pages[2] and len(bench._cards) == 2 and (0, 3) in bench._cards


def test_a_cancelled_sweep_leaves_the_model_as_it_was(client, model, monkeypatch):
    import latentpatch.app.experiments as experiments

    before, reached, release = hook_counts(model), threading.Event(), threading.Event()
    counted = experiments.differing

    def paused(bench, pair):  # hold the job just before the exact sweep's first forward pass
        n = counted(bench, pair)
        reached.set()
        release.wait(10)
        return n

    monkeypatch.setattr(experiments, "differing", paused)
    job = client.post("/api/sweep", json=PAIR).json()
    assert reached.wait(10)
    client.post(f"/api/jobs/{job['id']}/cancel")
    release.set()
    state = wait(client, job)
    assert state["state"] == "cancelled" and events(state, "heatmap") == [] and "cancelled" in state["error"]
    assert hook_counts(model) == before
    monkeypatch.setattr(experiments, "differing", counted)
    again = wait(client, client.post("/api/sweep", json=PAIR).json())
    assert again["state"] == "done" and events(again, "heatmap")


def test_a_long_poll_answers_at_the_next_result(client, bench):
    go = threading.Event()

    def slow(job):
        go.wait(5)
        job.emit("note", text="ready")

    job = bench.runner.start("test", slow)
    threading.Timer(0.3, go.set).start()
    start = time.monotonic()
    state = client.get(f"/api/jobs/{job.id}", params={"since": 0, "wait": 8}).json()
    assert 0.25 < time.monotonic() - start < 4 and [e["text"] for e in state["events"]] == ["ready"]
    assert wait(client, {"id": job.id})["state"] == "done"
    start = time.monotonic()  # an ended job answers a long poll at once
    assert client.get(f"/api/jobs/{job.id}", params={"since": 1, "wait": 8}).json()["state"] == "done"
    assert time.monotonic() - start < 2
