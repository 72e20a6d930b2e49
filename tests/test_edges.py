"""Edge attribution (EAP, EAP-IG): exact where the model is affine between its nodes (against exact
path patching), and a node's outgoing edges summed equal its node-level AtP (or IG) score computed
here with plain TransformerLens hooks on the node's own output, on learned-position and rotary
grouped-query models (where key/value edges run into the shared key/value heads)."""

from __future__ import annotations

import pytest
import torch

from conftest import affine_attention_model, construct_unchecked, edited_pair, unchecked
from hooks_snapshot import assert_refused_before_any_forward, snapshot
from patching.errors import PatchingError
from tests.conftest import learned_or_rotary_gqa
from patching.paths import Node, Receiver, attribute_edges, patch_paths, receivers_of, upstream_nodes

from patching.sweep import CallableMetric, LogitDiff

METRIC = LogitDiff(answer=3, wrong=4)


@pytest.fixture(scope="module", params=["learned", "rotary_gqa"])
def model(request):
    return learned_or_rotary_gqa(request.param)


@pytest.fixture(scope="module")
def prompts():
    return edited_pair(7, 2, 7, [(None, 1, 11), (0, 4, 5)])


def node_scores_by_hooks(model, base, source, senders, alphas):
    """Per sender, (source − base output) · ∂M/∂(output), the gradient averaged over embeddings
    base + alpha (source − base): TransformerLens hooks on hook_z, hook_mlp_out and the embedding."""
    _, bc = model.run_with_cache(base)
    _, sc = model.run_with_cache(source)
    embed = "blocks.0.hook_resid_pre"
    names = [embed] + [f"blocks.{layer}.{kind}" for layer in range(model.cfg.n_layers)
                       for kind in ("attn.hook_z", "hook_mlp_out")]
    totals = {name: torch.zeros_like(bc[name]) for name in names}
    for alpha in alphas:
        kept = {}

        def interpolate(x, hook, alpha=alpha):
            return (bc[embed] + alpha * (sc[embed] - bc[embed])).requires_grad_(True)

        def keep(x, hook):
            kept[hook.name] = x
            return x

        with torch.enable_grad(), model.hooks(fwd_hooks=[(embed, interpolate)] + [(name, keep) for name in names]):
            logits = model(base)
            metric = logits[0, -1, 3] - logits[0, -1, 4]
            grads = torch.autograd.grad(metric, [kept[name] for name in names])
        for name, grad in zip(names, grads):
            totals[name] += grad / len(alphas)
    scores = []
    for node in senders:
        if node.kind == "embed":
            name, pick = embed, slice(None)
        elif node.kind == "mlp":
            name, pick = f"blocks.{node.layer}.hook_mlp_out", slice(None)
        else:
            name, pick = f"blocks.{node.layer}.attn.hook_z", node.head
        delta = (sc[name] - bc[name])[0, :, pick] if node.kind == "head" else (sc[name] - bc[name])[0]
        grad = totals[name][0, :, pick] if node.kind == "head" else totals[name][0]
        scores.append((delta * grad).sum().item())
    return torch.tensor(scores)


@pytest.mark.parametrize("method, alphas", [("eap", [0.0]), ("eap_ig", [(k + 0.5) / 4 for k in range(4)])])
def test_outgoing_edges_sum_to_the_node_score(model, prompts, method, alphas):
    clean, corrupted = prompts
    senders, receivers = upstream_nodes(model), receivers_of(model)
    edges = attribute_edges(model, clean, corrupted, METRIC, method=method, steps=4, progress=False)
    assert edges.senders == senders and [g[0] for g in edges.receivers] == receivers
    summed = (edges.metric - edges.metric_corrupted[:, None, None]).sum(-1)  # (pairs, senders)
    for p in range(2):
        expected = node_scores_by_hooks(model, corrupted[p:p + 1], clean[p:p + 1], senders, alphas)
        torch.testing.assert_close(summed[p], expected, atol=2e-5, rtol=1e-4)
        assert expected.abs().max() > 1e-2


@pytest.fixture(scope="module")
def affine_model():
    """No norms, zero queries (uniform causal attention), attention only: every receiver's input
    enters the metric linearly, so first-order estimates are exact."""
    return affine_attention_model(3)


@pytest.mark.parametrize("method", ["eap", "eap_ig"])
def test_exact_on_an_affine_model(affine_model, prompts, method):
    clean, corrupted = prompts
    senders, receivers = upstream_nodes(affine_model), receivers_of(affine_model)
    exact = patch_paths(affine_model, clean, corrupted, METRIC, senders=senders, receivers=receivers, by="edge",
                        progress=False)
    estimate = attribute_edges(affine_model, clean, corrupted, METRIC, method=method, steps=3, progress=False)
    torch.testing.assert_close(estimate.metric, exact.metric, atol=5e-5, rtol=0)
    assert (exact.metric - exact.metric_corrupted[:, None, None]).abs().max() > 0.1


def test_missing_edges_score_zero(model, prompts):
    clean, corrupted = prompts
    r = attribute_edges(model, clean, corrupted, METRIC, senders=[Node("head", 2, 0), Node("embed")],
                        receivers=[Receiver("q", 1, 0), Receiver("v", 2, 1), Receiver("logits")], progress=False)
    estimate = r.metric - r.metric_corrupted[:, None, None]
    assert (estimate[:, 0, :2] == 0).all()  # L2H0 writes after both receivers read
    assert (estimate[:, 1, :2] != 0).all() and (estimate[:, 0, 2] != 0).all()
    assert (estimate[:, 1, 2] == 0).all()  # the embedding does not change at the position the logits read
    assert r.provenance["edges"] == 4


def test_noise_direction_uses_the_clean_run_as_base(model, prompts):
    clean, corrupted = prompts
    noise = attribute_edges(model, clean, corrupted, METRIC, direction="noise", progress=False)
    swapped = attribute_edges(model, corrupted, clean, METRIC, direction="denoise", progress=False)
    torch.testing.assert_close(noise.metric, swapped.metric)


def failing_metric(logits):
    raise RuntimeError("user metric failed")


def test_config_checks_its_fields():
    from patching.paths.edges import EdgeConfig

    with pytest.raises(PatchingError, match="method must be 'eap' or 'eap_ig'"):
        construct_unchecked(EdgeConfig, method="atp")


def test_model_left_as_found(model, prompts):
    clean, corrupted = prompts
    before = snapshot(model), model.cfg.use_split_qkv_input, model.cfg.use_hook_mlp_in
    attribute_edges(model, clean, corrupted, METRIC, progress=False)
    with pytest.raises(RuntimeError):
        attribute_edges(model, clean, corrupted, CallableMetric(failing_metric, readout=-1), progress=False)
    assert (snapshot(model), model.cfg.use_split_qkv_input, model.cfg.use_hook_mlp_in) == before


@pytest.mark.parametrize("kwargs, pattern", [
    (dict(steps=0), "steps must be a positive int"),
    (dict(metric=CallableMetric(lambda x: x[:, -1, 0])), "reads one position"),
    (dict(senders=[Node("mlp", 7)]), "out of range"),
])
def test_bad_input_refused_before_any_forward(model, prompts, kwargs, pattern):
    clean, corrupted = prompts
    kwargs = dict(kwargs)
    metric = kwargs.pop("metric", METRIC)
    assert_refused_before_any_forward(
        model, lambda: unchecked(attribute_edges)(model, clean, corrupted, metric, progress=False, **kwargs),
        PatchingError, pattern)
