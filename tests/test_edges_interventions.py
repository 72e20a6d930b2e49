"""EAP and EAP-IG under each intervention (patch, zero, mean, mean-positional) and IG over the inputs or
over each writing layer's activations: exact against the closed form on an affine model (each edge's
effect is the metric's change when only the receiver's input moves by the sender's target minus base
output, computed here with plain TransformerLens hooks), and on nonlinear models a sender's outgoing
edges summed equal its node score along its own group's path (the chain rule)."""

from __future__ import annotations

import pytest
import torch

from conftest import affine_attention_model, construct_unchecked, edited_pair
from patching.errors import PatchingError
from patching.paths import EdgeConfig, attribute_edges, receivers_of, upstream_nodes
from patching.paths.interventions import check_intervention
from patching.paths.nodes import reaches
from patching.sweep import LogitDiff
from tests.conftest import learned_or_rotary_gqa

METRIC = LogitDiff(answer=3, wrong=4)
INTERVENTIONS = ["patch", "zero", "mean", "mean-positional"]
METHODS = [("eap", "inputs"), ("eap_ig", "inputs"), ("eap_ig", "activations")]


@pytest.fixture(scope="module")
def prompts():
    return edited_pair(7, 3, 6, [(None, 1, 11), (0, 4, 5)])


@pytest.fixture(scope="module")
def affine():
    return affine_attention_model(2)


def outputs(model, tokens):
    """Every sender's output, as `upstream_nodes` orders them, (senders, pos, d_model)."""
    _, cache = model.run_with_cache(tokens)
    outs = [cache["blocks.0.hook_resid_pre"][0]]
    for layer in range(model.cfg.n_layers):
        z = cache[f"blocks.{layer}.attn.hook_z"][0]
        outs += [z[:, h] @ model.blocks[layer].attn.W_O[h] for h in range(model.cfg.n_heads)]
        if not model.cfg.attn_only:
            outs.append(cache[f"blocks.{layer}.hook_mlp_out"][0])
    return torch.stack(outs)


def targets(model, clean, corrupted, intervention, p):
    """Closed-form targets when noising pair p (base = clean, source = corrupted)."""
    sources = torch.stack([outputs(model, corrupted[i:i + 1]) for i in range(len(corrupted))])  # (pairs, S, pos, d)
    return {"patch": sources[p], "zero": torch.zeros_like(sources[p]),
            "mean": sources.mean((0, 2), keepdim=True)[0].expand_as(sources[p]),
            "mean-positional": sources.mean(0)}[intervention]


def metric_with_receiver_shift(model, tokens, receiver, shift):
    """M when only `receiver`'s input moves by `shift` (pos, d_model): the edge's own path."""
    if receiver.kind == "logits":
        name, pick = f"blocks.{model.cfg.n_layers - 1}.hook_resid_post", None
    else:
        name, pick = f"blocks.{receiver.layer}.hook_{receiver.kind}_input", receiver.head

    def hook(x, hook):
        x = x.clone()
        if pick is None:
            x[0] += shift
        else:
            x[0, :, pick] += shift
        return x

    model.cfg.use_split_qkv_input = True
    try:
        with torch.no_grad(), model.hooks(fwd_hooks=[(name, hook)]):
            logits = model(tokens)
    finally:
        model.cfg.use_split_qkv_input = False
    return float(logits[0, -1, 3] - logits[0, -1, 4])


@pytest.mark.parametrize("intervention", INTERVENTIONS)
@pytest.mark.parametrize("method, ig", METHODS)
def test_closed_form_on_an_affine_model(affine, prompts, intervention, method, ig):
    clean, corrupted = prompts
    senders, receivers = upstream_nodes(affine), receivers_of(affine, kinds=("v", "logits"))
    result = attribute_edges(affine, clean, corrupted, METRIC, senders=senders, receivers=receivers, method=method,
                             ig=ig, steps=2, direction="noise", intervention=intervention, progress=False)
    assert result.provenance["intervention"] == intervention
    for p in (0, 2):
        base = outputs(affine, clean[p:p + 1])
        delta = targets(affine, clean, corrupted, intervention, p) - base
        m_base = metric_with_receiver_shift(affine, clean[p:p + 1], receivers[-1], torch.zeros_like(delta[0]))
        for s in range(0, len(senders), 3):
            for r, receiver in enumerate(receivers):
                if not reaches(senders[s], receiver, affine):
                    assert float(result.metric[p, s, r]) == pytest.approx(m_base, abs=1e-5)
                    continue
                expected = metric_with_receiver_shift(affine, clean[p:p + 1], receiver, delta[s]) - m_base
                assert float(result.metric[p, s, r]) - m_base == pytest.approx(expected, abs=2e-3, rel=1e-4)


@pytest.fixture(scope="module", params=["learned", "rotary_gqa"])
def model(request):
    return learned_or_rotary_gqa(request.param)


def group_path_scores(model, base_tokens, deltas, senders, alphas):
    """Each sender's node score with its writing group's output moved along α · (its group's summed
    delta): Δ_u · mean_α ∂M/∂(the group's output), plain hooks on hook_attn_out / hook_mlp_out / the embedding."""
    scores = torch.zeros(len(senders))
    for s, node in enumerate(senders):
        name = {"embed": "blocks.0.hook_resid_pre", "head": f"blocks.{node.layer}.hook_attn_out",
                "mlp": f"blocks.{node.layer}.hook_mlp_out"}[node.kind]
        group = [i for i, other in enumerate(senders) if other.kind == node.kind and other.layer == node.layer]
        shift = deltas[group].sum(0)
        total = torch.zeros_like(shift)
        for alpha in alphas:
            kept = {}

            def move(x, hook, alpha=alpha):
                kept["x"] = (x + alpha * shift).detach().requires_grad_(True)
                return kept["x"]

            with torch.enable_grad(), model.hooks(fwd_hooks=[(name, move)]):
                logits = model(base_tokens)
                (grad,) = torch.autograd.grad(logits[0, -1, 3] - logits[0, -1, 4], [kept["x"]])
            total += grad[0] / len(alphas)
        scores[s] = (deltas[s] * total).sum()
    return scores


@pytest.mark.parametrize("intervention", ["mean"])
def test_activation_ig_outgoing_edges_sum_to_the_group_path_score(model, prompts, intervention):
    clean, corrupted = prompts
    senders = upstream_nodes(model)
    result = attribute_edges(model, clean, corrupted, METRIC, method="eap_ig", ig="activations", steps=3,
                             direction="noise", intervention=intervention, progress=False)
    summed = (result.metric - result.metric_clean[:, None, None]).sum(-1)
    for p in (0, 1):
        deltas = targets(model, clean, corrupted, intervention, p) - outputs(model, clean[p:p + 1])
        expected = group_path_scores(model, clean[p:p + 1], deltas, senders, [(k + 0.5) / 3 for k in range(3)])
        torch.testing.assert_close(summed[p], expected, atol=5e-5, rtol=1e-4)
        assert expected.abs().max() > 1e-2


def test_the_embedding_path_is_the_same_for_both_ig_forms(model, prompts):
    clean, corrupted = prompts
    kwargs = dict(method="eap_ig", steps=3, senders=upstream_nodes(model)[:1], progress=False)
    inputs = attribute_edges(model, clean, corrupted, METRIC, ig="inputs", **kwargs)
    activations = attribute_edges(model, clean, corrupted, METRIC, ig="activations", **kwargs)
    torch.testing.assert_close(inputs.metric, activations.metric, atol=1e-5, rtol=0)


def test_config_and_lengths_refused():
    with pytest.raises(PatchingError, match="intervention must be one of"):
        construct_unchecked(EdgeConfig, intervention="resample")
    with pytest.raises(PatchingError, match="ig must be 'inputs' or 'activations'"):
        construct_unchecked(EdgeConfig, ig="layers")
    with pytest.raises(PatchingError, match="one token length"):
        check_intervention("mean-positional", [5, 6])
    check_intervention("mean", [5, 6])
