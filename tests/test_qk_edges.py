"""AtP* for edges into queries and keys (`find_circuit(method="atp*")`): exact path patching's
magnitude where the metric is linear in the pattern; the node-level QK fix with GradDrop
(`attribute_qk`) where an edge's change is its receiver's whole change (layer 0 reads only the
embedding); and on the saturated-softmax toy, plain EAP's circuit misses the edge AtP*'s keeps."""

from __future__ import annotations

import pytest
import torch

from conftest import learned_or_rotary_gqa
from patching.attribution.qk_fix import attribute_qk
from patching.errors import PatchingError
from patching.model import tl_compat
from patching.paths import Node, Receiver, find_circuit, patch_paths, receivers_of
from patching.paths.qk_edges import atp_star_edges
from patching.sweep import LogitDiff
from test_qk_fix import prompts_differing_at_the_end, saturated_model

METRIC = LogitDiff(answer=3, wrong=4)


@pytest.mark.parametrize("kind", ["learned", "rotary_gqa"])
def test_equals_exact_edge_patching_where_the_metric_is_linear_in_the_pattern(kind):
    extra = {} if kind == "learned" else dict(positional_embedding_type="rotary", rotary_dim=4, n_key_value_heads=2)
    model = tl_compat.random_model(n_layers=1, d_vocab=50, n_ctx=32, attn_only=True, normalization_type=None, d_mlp=None,
                                   seed=2, **extra).eval()
    with torch.no_grad():  # sharp attention: far from linear in q and k
        model.blocks[0].attn.W_Q.mul_(6)
        model.blocks[0].attn.W_K.mul_(6)
        model.unembed.W_U.mul_(20)
    clean, corrupted = prompts_differing_at_the_end()
    receivers = receivers_of(model, kinds=("q", "k", "v"))
    ours = atp_star_edges(model, clean, corrupted, METRIC, [Node("embed")], receivers)
    exact = patch_paths(model, clean, corrupted, METRIC, senders=[Node("embed")], receivers=receivers, by="edge",
                        direction="noise", progress=False)
    qk = [j for j, r in enumerate(receivers) if r.kind in ("q", "k")]
    per_pair = exact.effect[:, 0, qk].abs()
    assert torch.isnan(ours[0, [j for j, r in enumerate(receivers) if r.kind == "v"]]).all()
    # one pair at a time: AtP* averages |effect| over pairs, exact patching's mean is of signed effects
    for p in range(len(clean)):
        one = atp_star_edges(model, clean[p:p + 1], corrupted[p:p + 1], METRIC, [Node("embed")], receivers)
        torch.testing.assert_close(one[0, qk], per_pair[p], atol=1e-5, rtol=0)
    assert per_pair.max() > 0.05


@pytest.mark.parametrize("kind", ["q", "k"])
def test_layer_zero_edges_equal_the_node_qk_fix_with_grad_drop(kind):
    model = learned_or_rotary_gqa("rotary_gqa")
    clean, corrupted = prompts_differing_at_the_end()
    receivers = receivers_of(model, layers=[0], kinds=(kind,))
    ours = atp_star_edges(model, clean, corrupted, METRIC, [Node("embed")], receivers)
    node = attribute_qk(model, clean, corrupted, METRIC, kind=kind, by="all", method="atp*", direction="noise", layers=(0,))
    torch.testing.assert_close(ours[0], node.effect.mean(0), atol=1e-5, rtol=1e-4)
    assert ours.abs().max() > 1e-3


def test_saturated_softmax_plain_eap_circuit_misses_the_edge_atp_star_keeps():
    model = saturated_model()
    clean, corrupted = torch.tensor([[3, 4, 5]]), torch.tensor([[3, 4, 6]])
    edge = (Node("embed"), Receiver("q", 0, 0))
    plain = find_circuit(model, clean, corrupted, METRIC, method="eap", threshold=0.5, curve_points=0)
    star = find_circuit(model, clean, corrupted, METRIC, method="atp*", threshold=0.5, curve_points=0)
    to_logits = (Node("head", 0, 0), Receiver("logits"))
    assert plain.edges == [to_logits]  # the saturated softmax hides the query's edge from EAP
    assert set(star.edges) == {edge, to_logits}
    assert star.exact.tolist() == pytest.approx([1.0, 1.0], abs=1e-5)  # both confirmed by exact path patching
    assert star.faithfulness.faithfulness.item() == pytest.approx(1.0, abs=1e-5)
    assert plain.faithfulness.faithfulness.item() == pytest.approx(0.0, abs=1e-5)  # the head reads a corrupted query


def test_circuit_method_checked():
    with pytest.raises(PatchingError, match="method must be 'eap', 'eap_ig' or 'atp\\*'"):
        find_circuit(saturated_model(), torch.tensor([[3, 4, 5]]), torch.tensor([[3, 4, 6]]), METRIC, method="atp+")


def test_model_left_as_found():
    from hooks_snapshot import snapshot

    model = learned_or_rotary_gqa("rotary_gqa")
    clean, corrupted = prompts_differing_at_the_end()
    before = snapshot(model), model.cfg.use_split_qkv_input, [p.requires_grad for p in model.parameters()]
    atp_star_edges(model, clean, corrupted, METRIC, [Node("embed"), Node("head", 0, 1)], receivers_of(model, kinds=("q", "k")))
    assert (snapshot(model), model.cfg.use_split_qkv_input, [p.requires_grad for p in model.parameters()]) == before
