"""What runs rows after a key-value prefix, and what reads the MLPs' own inputs, on the bridge
backend (its blocks driven from a layer by `tl_bridge_blocks`): causal tracing, path patching,
edge attribution, faithfulness and find_circuit, each against the hooked backend on the same weights
(a HookedTransformer converted from the same Hugging Face folder, so these run in `make test`), and
the Bridge's `hook_mlp_in` gradient against the MLP-only gradient taken on transformers itself."""

from __future__ import annotations

import pytest
import torch

from patching import (LogitDiff, NoiseConfig, Site, attribute_edges, causal_trace, faithfulness, find_circuit, patch_paths, receivers_of,
                      upstream_nodes)
from patching.model import tl_compat, tl_paths
from tests.test_bridge import boot_tiny, tiny_hf_folder

METRIC = LogitDiff(answer=3, wrong=4)
CLEAN = torch.randint(3, 64, (1, 7), generator=torch.Generator().manual_seed(5))
CORRUPTED = CLEAN.clone()
CORRUPTED[0, 3] = (CLEAN[0, 3] + 13) % 61 + 3
HOOKED = "converts the folder into a HookedTransformer (TransformerLens 3.x)"


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return tiny_hf_folder(tmp_path_factory.mktemp("tiny-hf"), n_layers=3)


@pytest.fixture(scope="module")
def bridge(folder):
    return boot_tiny(folder).eval()


@pytest.fixture(scope="module")
def hooked(folder):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    hf_model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    return tl_compat.build_from_local_folder(folder, hf_model, AutoTokenizer.from_pretrained(folder), model_name="tiny",
                                             flags=dict.fromkeys(tl_compat.PROCESSING_FLAGS, False), n_layers=None,
                                             n_ctx=64, device="cpu", dtype=torch.float32).eval()


def test_mlp_input_gradient_is_the_mlps_own(folder, bridge):
    """The gradient at the Bridge's `hook_mlp_in` (under `node_inputs`) is the metric's gradient
    through the MLP alone: on transformers, the same metric with a copy of layer 1's MLP input
    (`post_attention_layernorm`'s input) made a leaf, every other reader left on the residual."""
    from transformers import AutoModelForCausalLM

    reference = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, attn_implementation="eager").eval()
    norm, leaf = reference.model.layers[1].post_attention_layernorm, {}

    def own_copy(module, args):
        leaf["x"] = args[0].detach().clone().requires_grad_(True)
        return (leaf["x"],)

    handle = norm.register_forward_pre_hook(own_copy)
    try:
        logits = reference(CLEAN).logits
    finally:
        handle.remove()
    (logits[0, -1, 3] - logits[0, -1, 4]).backward()
    seen = {}

    def keep(x):
        x.retain_grad()
        seen["x"] = x

    with torch.enable_grad(), tl_paths.node_inputs(bridge), tl_compat.hooks(bridge, [("blocks.1.hook_mlp_in", keep)]):
        logits = bridge(CLEAN)
        (logits[0, -1, 3] - logits[0, -1, 4]).backward()
    torch.testing.assert_close(seen["x"].grad, leaf["x"].grad, atol=1e-6, rtol=1e-5)


@pytest.mark.hooked_only(reason=HOOKED)
def test_causal_trace_equals_the_hooked_backend(hooked, bridge):
    """Noised rows joining at every layer after the noised run's keys and values (restored states,
    and the MLP-severed kind, whose frozen writes sit inside the suffix)."""
    for kind, sever in (("state", None), ("state", "mlp")):
        ours, theirs = (causal_trace(m, CLEAN, [1, 2], 3, noise=NoiseConfig(scale=1.0, n_samples=4), kind=kind, sever=sever)
                        for m in (bridge, hooked))
        torch.testing.assert_close(ours.prob, theirs.prob, atol=1e-5, rtol=1e-4, equal_nan=True)


@pytest.mark.hooked_only(reason=HOOKED)
def test_path_patching_equals_the_hooked_backend(hooked, bridge):
    """Every sender through every receiver (heads' q/k/v inputs, MLP inputs, the logits), by sender and by edge."""
    for by in ("sender", "edge"):
        ours, theirs = (patch_paths(m, CLEAN, CORRUPTED, METRIC, senders=upstream_nodes(m), receivers=receivers_of(m), by=by,
                                    progress=False) for m in (bridge, hooked))
        torch.testing.assert_close(ours.metric, theirs.metric, atol=2e-5, rtol=1e-4, equal_nan=True)


@pytest.mark.hooked_only(reason=HOOKED)
def test_edge_attribution_faithfulness_and_find_circuit_equal_the_hooked_backend(hooked, bridge):
    """EAP's edges (into MLPs too, through the MLP-only gradient), faithfulness of a circuit, and
    find_circuit's estimate, exact confirmation and chosen edges."""
    ours, theirs = (attribute_edges(m, CLEAN, CORRUPTED, METRIC) for m in (bridge, hooked))
    torch.testing.assert_close(ours.metric, theirs.metric, atol=2e-5, rtol=1e-4, equal_nan=True)
    found = {"bridge": find_circuit(bridge, CLEAN, CORRUPTED, METRIC, k=6),
             "hooked": find_circuit(hooked, CLEAN, CORRUPTED, METRIC, k=6)}
    assert found["bridge"].edges == found["hooked"].edges
    torch.testing.assert_close(found["bridge"].estimate, found["hooked"].estimate, atol=2e-5, rtol=1e-4, equal_nan=True)
    torch.testing.assert_close(found["bridge"].exact, found["hooked"].exact, atol=2e-5, rtol=1e-4, equal_nan=True)
    circuit = set(found["hooked"].edges[:3])
    scores = [faithfulness(m, CLEAN, CORRUPTED, METRIC, circuit, senders=upstream_nodes(m), receivers=receivers_of(m))
              for m in (bridge, hooked)]
    scores += [found["bridge"].faithfulness, found["hooked"].faithfulness]
    for field in ("faithfulness", "completeness", "metric_circuit", "metric_complement", "metric_empty"):
        torch.testing.assert_close(getattr(scores[0], field), getattr(scores[1], field), atol=2e-5, rtol=1e-4, msg=field)
        torch.testing.assert_close(getattr(scores[2], field), getattr(scores[3], field), atol=2e-5, rtol=1e-4, msg=field)


@pytest.mark.hooked_only(reason=HOOKED)
@pytest.mark.parametrize("kind", ["q", "k"])
def test_the_qk_fix_equals_the_hooked_backend(hooked, bridge, kind):
    """The QK fix recomputes each head's softmax from the queries and keys the scores were made
    of and the attention's scale (on the Bridge, its Hugging Face attention's `scaling`), and
    GradDrop runs the blocks from layer 0 with a layer's gradient dropped: both equal the hooked
    backend's, per position and at all positions."""
    from patching import attribute_qk

    for method, by in (("atp_qk", "position"), ("atp*", "all")):
        ours, theirs = (attribute_qk(m, CLEAN, CORRUPTED, METRIC, kind=kind, method=method, by=by) for m in (bridge, hooked))
        assert [u.label() for u in ours.units] == [u.label() for u in theirs.units]
        torch.testing.assert_close(ours.metric, theirs.metric, atol=2e-5, rtol=1e-4)


P = 3  # CLEAN and CORRUPTED share their first 3 tokens


def test_runs_inside_a_bound_prefix_equal_the_whole_prompts(bridge):
    """Inside `bound_prefix` on the Bridge the tokens passed are the positions after the prefix: a
    forward, hooks (which see only those positions), the blocks run from a layer, and a residual
    trace equal the same on the whole prompts at those positions (the trace's units there)."""
    from patching import Site, patch_residual

    names = [Site(layer).hook_name for layer in range(3)]
    with torch.no_grad():
        whole_logits = bridge(CLEAN)
        whole_final, whole = tl_compat.run_until_end_with_cache(bridge, CLEAN, names)
    whole_trace = patch_residual(bridge, CLEAN, CORRUPTED, METRIC, progress=False).metric.reshape(3, 7)
    with tl_compat.bound_prefix(bridge, CLEAN[:, :P]):
        with torch.no_grad():
            torch.testing.assert_close(bridge(CLEAN[:, P:]), whole_logits[:, P:], atol=1e-5, rtol=0)
            final, acts = tl_compat.run_until_end_with_cache(bridge, CLEAN[:, P:], names)
            for name in names:
                torch.testing.assert_close(acts[name], whole[name][:, P:], atol=1e-5, rtol=0)
            torch.testing.assert_close(tl_compat.run_blocks(bridge, whole[names[1]][:, P:], 1), whole_final[:, P:], atol=1e-5, rtol=0)
        bound_trace = patch_residual(bridge, CLEAN[:, P:], CORRUPTED[:, P:], METRIC, progress=False).metric.reshape(3, 7 - P)
    torch.testing.assert_close(bound_trace, whole_trace[:, P:], atol=1e-5, rtol=0)
    assert "forward" not in bridge.__dict__  # the binding is gone
    with torch.no_grad():
        torch.testing.assert_close(bridge(CLEAN), whole_logits, atol=0, rtol=0)


def _steered_generation(model, prefix=None, use_kv_cache=True):
    """Four greedy tokens after CLEAN under a hook adding a vector at absolute position 5 of
    `blocks.1.hook_resid_pre` (a fixed random vector); the tokens, each step's logits and the absolute positions the hook saw."""
    from patching import Site
    from patching.splice.generate import Interventions, generate

    logits, seen = [], set()
    vector = torch.randn(model.cfg.d_model, generator=torch.Generator().manual_seed(2))

    def steer(x, step):
        seen.update(step.positions)
        x = x.clone()
        x[:, [i for i, p in enumerate(step.positions) if p == 5]] += vector
        return x

    with torch.no_grad():
        tokens = generate(model, CLEAN, 4, use_kv_cache=use_kv_cache, prefix=prefix, observe=lambda s, out: logits.append(out),
                          interventions=Interventions(hooks={Site(1): steer}))
    return tokens, torch.stack(logits), seen


def test_generation_after_a_shared_prefix_equals_the_whole_prompts(bridge):
    """KV-cached decoding after a `SharedPrefix` on the Bridge (`tl_bridge_decode`): the prefix runs
    once, is never intervened on (the hook sees no position before it), and the tokens and logits
    equal the uncached loop over the whole prompt (1e-4) under the same steering."""
    from patching.splice.generate import SharedPrefix

    prefix = SharedPrefix.of(bridge, CLEAN[0, :P])
    assert prefix.cache.length == P
    cached, uncached = _steered_generation(bridge, prefix), _steered_generation(bridge, use_kv_cache=False)
    assert min(cached[2]) == P and min(uncached[2]) == 0
    assert torch.equal(cached[0], uncached[0])
    torch.testing.assert_close(cached[1], uncached[1], atol=1e-4, rtol=0)


@pytest.mark.hooked_only(reason=HOOKED)
def test_cached_generation_after_a_prefix_equals_the_hooked_backend(hooked, bridge):
    """The same steered generation after the same `SharedPrefix` on both backends (same weights)."""
    from patching.splice.generate import SharedPrefix

    ours, theirs = (_steered_generation(m, SharedPrefix.of(m, CLEAN[0, :P])) for m in (bridge, hooked))
    assert torch.equal(ours[0], theirs[0]) and ours[2] == theirs[2]
    torch.testing.assert_close(ours[1], theirs[1], atol=1e-4, rtol=0)


@pytest.mark.hooked_only(reason=HOOKED)
def test_bound_prefix_experiments_equal_the_hooked_backend(hooked, bridge):
    """The safety experiments' uses of a bound prefix on both backends: refusal directions (mean
    residuals at the queries' last tokens, which stop the forward early) and AtP on the queries."""
    from patching import Site, attribute_latents
    from patching.safety.direction import refusal_directions
    from tests.conftest import make_sae

    queries = [torch.randint(3, 64, (1, n), generator=torch.Generator().manual_seed(n)) for n in (3, 4, 5)]
    sae = make_sae(32, 48, hook_name=Site(1).hook_name, model_name="tiny", seed=4)
    out = {}
    for name, m in (("bridge", bridge), ("hooked", hooked)):
        with tl_compat.bound_prefix(m, CLEAN[:, :P]):
            out[name] = (refusal_directions(m, queries[:2], queries[1:], [0, 2]),
                         attribute_latents(m, sae, CLEAN[:, P:], CORRUPTED[:, P:], METRIC, method="atp", progress=False).metric)
    torch.testing.assert_close(out["bridge"][0], out["hooked"][0], atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(out["bridge"][1], out["hooked"][1], atol=2e-5, rtol=1e-4)


@pytest.mark.hooked_only(reason=HOOKED)
@pytest.mark.parametrize("method", ["eap", "atp*"])
def test_mixed_circuits_equal_the_hooked_backend(hooked, bridge, method):
    """Mixed circuits (heads, MLPs, two SAEs' latents and error nodes in one graph) on both backends:
    the same kept nodes and edges, node estimates, exact effects, edge effects, faithfulness,
    completeness and curve within 5e-5 (measured: 1e-5 at most; the metric spans 0.016 here, so
    normalised effects magnify differences ~60x)."""
    from tests.conftest import make_sae

    saes = [make_sae(32, 24, hook_name=f"blocks.{layer}.hook_resid_pre", model_name="tiny", seed=layer) for layer in (1, 2)]
    clean = torch.cat([CLEAN, CLEAN.flip(1)])
    corrupted = clean.clone()
    corrupted[:, 3] = (clean[:, 3] + 13) % 61 + 3
    ours, theirs = (find_circuit(m, clean, corrupted, METRIC, saes=saes, method=method, threshold=0.01, k=8)
                    for m in (bridge, hooked))
    assert ours.nodes == theirs.nodes and len(ours.nodes) == 8 and ours.edges == theirs.edges
    for name in ("estimate", "exact", "edge_estimate"):
        torch.testing.assert_close(getattr(ours, name), getattr(theirs, name), atol=5e-5, rtol=0)
    for name in ("faithfulness", "completeness", "metric_circuit", "metric_complement"):
        torch.testing.assert_close(getattr(ours.faithfulness, name), getattr(theirs.faithfulness, name), atol=5e-5, rtol=0)
    torch.testing.assert_close(ours.curve.faithfulness, theirs.curve.faithfulness, atol=5e-5, rtol=0)
    assert ours.error_share == pytest.approx(theirs.error_share, abs=1e-5)


@pytest.mark.hooked_only(reason=HOOKED)
@pytest.mark.parametrize("by", ["sender", "edge"])
def test_latent_path_patching_equals_the_hooked_backend(hooked, bridge, by):
    """`patch_paths` with SAE latents and error nodes as senders and receivers (two SAEs), and head,
    MLP and logit receivers, on both backends (measured: 1.5e-7)."""
    from patching.paths import LatentNode, Receiver
    from tests.conftest import make_sae

    up, down = Site(1), Site(2)
    saes = {site: make_sae(32, 24, hook_name=site.hook_name, model_name="tiny", seed=site.layer) for site in (up, down)}
    senders = [LatentNode(up, 0), LatentNode(up, 5, pos=4), LatentNode(up), LatentNode(up, None, pos=3)]
    receivers = [LatentNode(down, 1), LatentNode(down, 4, pos=5), LatentNode(down), Receiver("q", 2, 1), Receiver("v", 2, 0),
                 Receiver("mlp", 2), Receiver("logits")]
    ours, theirs = (patch_paths(m, CLEAN, CORRUPTED, METRIC, senders=senders, receivers=receivers, saes=saes, by=by,
                                progress=False).metric for m in (bridge, hooked))
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=0)
    assert (theirs - theirs.mean()).abs().max() > 1e-3  # the paths moved the metric
