"""Path patching against a naive freeze-and-patch reference written here with TransformerLens hooks
(two separate forward passes per path, Wang et al. 2022 §3.1), on learned-position and rotary
grouped-query models; and, on a model linear between its nodes, a sender's edges summed over every
receiver equal its total effect."""

from __future__ import annotations

import pytest
import torch

from conftest import construct_unchecked, edited_pair, unchecked
from hooks_snapshot import CountingHook, assert_refused_before_any_forward, snapshot
from patching.errors import PatchingError
from patching.model import tl_compat
from tests.conftest import learned_or_rotary_gqa
from patching.paths import Node, PathConfig, PathResult, Receiver, patch_paths, receivers_of, upstream_nodes
from patching.sweep import LogitDiff, patch_heads

METRIC = LogitDiff(answer=3, wrong=4)


@pytest.fixture(scope="module", params=["learned", "rotary_gqa"])
def model(request):
    return learned_or_rotary_gqa(request.param)


@pytest.fixture(scope="module")
def prompts():
    return edited_pair(5, 2, 8, [(None, 2, 9), (1, 5, 3)])


def naive_path_metric(model, base, source, sender, receivers):
    """Step 2: the base run with every head's z and MLP output frozen at the base run's and the
    sender's from the source run, recording each receiver's q / k / v (its head) or MLP
    pre-activations. Step 3: the base run with those recorded values set; for the logits receiver,
    the final residual moved by step 2's change of it. Returns the metric of step 3."""
    _, base_cache = model.run_with_cache(base)
    _, src_cache = model.run_with_cache(source)
    n_layers = model.cfg.n_layers

    def frozen(name, layer, kind):
        def hook(x, hook):
            out = base_cache[name].clone()
            if sender.kind == kind and sender.layer == layer:
                if kind == "head":
                    out[:, :, sender.head] = src_cache[name][:, :, sender.head]
                else:
                    out = src_cache[name].clone()
            return out
        return hook

    freeze = []
    for layer in range(n_layers):
        freeze.append((f"blocks.{layer}.attn.hook_z", frozen(f"blocks.{layer}.attn.hook_z", layer, "head")))
        if not model.cfg.attn_only:
            freeze.append((f"blocks.{layer}.hook_mlp_out", frozen(f"blocks.{layer}.hook_mlp_out", layer, "mlp")))
    if sender.kind == "embed":
        freeze.append(("blocks.0.hook_resid_pre", lambda x, hook: src_cache["blocks.0.hook_resid_pre"].clone()))
    final_name = f"blocks.{n_layers - 1}.hook_resid_post"
    with model.hooks(fwd_hooks=freeze):
        _, step2 = model.run_with_cache(base)

    def set_heads(name, head):
        def hook(x, hook):
            x = x.clone()
            x[:, :, head] = step2[name][:, :, head]
            return x
        return hook

    def set_all(name):
        return lambda x, hook: step2[name].clone()

    patches = []
    for r in receivers:
        if r.kind in ("q", "k", "v"):
            patches.append((f"blocks.{r.layer}.attn.hook_{r.kind}", set_heads(f"blocks.{r.layer}.attn.hook_{r.kind}", r.head)))
        elif r.kind == "mlp":
            names = ["mlp.hook_pre"] + (["mlp.hook_pre_linear"] if model.cfg.gated_mlp else [])
            patches += [(f"blocks.{r.layer}.{n}", set_all(f"blocks.{r.layer}.{n}")) for n in names]
        else:
            shift = step2[final_name] - base_cache[final_name]
            patches.append((final_name, lambda x, hook, shift=shift: x + shift))
    logits = model.run_with_hooks(base, fwd_hooks=patches)
    return (logits[0, -1, 3] - logits[0, -1, 4]).item()


def sample_graph(model):
    kv = tl_compat.n_kv_heads(model)
    senders = [Node("embed"), Node("head", 0, 1), Node("mlp", 0), Node("head", 1, 3), Node("mlp", 1), Node("head", 2, 0)]
    receivers = [Receiver("q", 1, 2), Receiver("k", 1, kv - 1), Receiver("v", 2, 0), Receiver("mlp", 1),
                 Receiver("mlp", 2), Receiver("q", 2, 3), Receiver("logits")]
    return senders, receivers


@pytest.mark.parametrize("direction", ["denoise", "noise"])
def test_edges_equal_naive_freeze_and_patch(model, prompts, direction):
    clean, corrupted = prompts
    senders, receivers = sample_graph(model)
    ours = patch_paths(model, clean, corrupted, METRIC, senders=senders, receivers=receivers, by="edge",
                       direction=direction, progress=False, batch_size=7)
    assert ours.metric.shape == (2, len(senders), len(receivers))
    for p in range(2):
        base, source = (corrupted[p:p + 1], clean[p:p + 1]) if direction == "denoise" else (clean[p:p + 1], corrupted[p:p + 1])
        with torch.inference_mode():
            for s, sender in enumerate(senders):
                for g, receiver in enumerate(receivers):
                    expected = naive_path_metric(model, base, source, sender, [receiver])
                    assert ours.metric[p, s, g].item() == pytest.approx(expected, abs=1e-4), (p, sender, receiver)


def test_sender_to_every_receiver_at_once_equals_naive(model, prompts):
    clean, corrupted = prompts
    senders, receivers = sample_graph(model)
    ours = patch_paths(model, clean, corrupted, METRIC, senders=senders, receivers=receivers, progress=False)
    assert ours.metric.shape == (2, len(senders), 1)
    moved = 0
    with torch.inference_mode():
        for p in range(2):
            for s, sender in enumerate(senders):
                expected = naive_path_metric(model, corrupted[p:p + 1], clean[p:p + 1], sender, receivers)
                assert ours.metric[p, s, 0].item() == pytest.approx(expected, abs=1e-4), (p, sender)
                moved += abs(expected - ours.metric_corrupted[p].item()) > 1e-3
    assert moved >= 6  # the comparison is not between unmoved base metrics


def test_batch_size_does_not_change_values(model, prompts):
    clean, corrupted = prompts
    senders, receivers = sample_graph(model)
    runs = [patch_paths(model, clean, corrupted, METRIC, senders=senders, receivers=receivers, by="edge",
                        progress=False, batch_size=b).metric for b in (1, 5, None)]
    torch.testing.assert_close(runs[0], runs[1], atol=1e-5, rtol=0)
    torch.testing.assert_close(runs[0], runs[2], atol=1e-5, rtol=0)


@pytest.fixture(scope="module")
def linear_model():
    """Attention-only, no norms, zero queries (uniform causal attention): every path is linear in
    the sender's output, so path effects add up."""
    model = tl_compat.random_model(n_layers=3, d_vocab=50, n_ctx=32, attn_only=True, normalization_type=None,
                                   d_mlp=None, seed=3).eval()
    with torch.no_grad():
        for block in model.blocks:
            block.attn.W_Q.zero_()
            block.attn.b_Q.zero_()
        model.unembed.W_U.mul_(30)  # logit differences of order one
    return model


def test_edges_sum_to_total_effect_where_the_model_is_linear(linear_model, prompts):
    model = linear_model
    clean, corrupted = prompts
    senders = [Node("embed")] + [Node("head", layer, h) for layer in (0, 1) for h in range(4)]
    receivers = receivers_of(model)  # q, k, v of every head, and the logits
    edges = patch_paths(model, clean, corrupted, METRIC, senders=senders, receivers=receivers, by="edge", progress=False)
    summed = (edges.metric - edges.metric_corrupted[:, None, None]).sum(-1)  # (pairs, senders)
    total = patch_heads(model, clean, corrupted, METRIC, kind="head_out", layers=[0, 1], progress=False).metric
    total = torch.cat([edges.metric_clean[:, None], total], 1) - edges.metric_corrupted[:, None]  # embed: all of it
    torch.testing.assert_close(summed, total, atol=1e-4, rtol=1e-4)
    assert total.abs().max() > 0.1
    # the q and k edges carry nothing here (queries are zero); the v and logits edges carry it all
    qk = torch.tensor([r.kind in ("q", "k") for r in receivers])
    assert (edges.metric[:, :, qk] - edges.metric_corrupted[:, None, None]).abs().max() < 1e-5


def test_embedding_path_to_logits_alone_is_the_direct_effect(linear_model, prompts):
    clean, corrupted = prompts
    r = patch_paths(linear_model, clean, corrupted, METRIC, senders=[Node("embed")], receivers=[Receiver("logits")],
                    progress=False)
    with torch.inference_mode():
        for p in range(2):
            embed_delta = (linear_model.embed(clean[p:p + 1]) + linear_model.pos_embed(clean[p:p + 1])
                           - linear_model.embed(corrupted[p:p + 1]) - linear_model.pos_embed(corrupted[p:p + 1]))
            direct = (embed_delta[0, -1] @ linear_model.W_U)[[3, 4]]
            assert r.metric[p, 0, 0].item() - r.metric_corrupted[p].item() == pytest.approx((direct[0] - direct[1]).item(),
                                                                                           abs=1e-4)


def test_save_load_and_provenance(model, prompts, tmp_path):
    clean, corrupted = prompts
    senders, receivers = sample_graph(model)
    r = patch_paths(model, clean, corrupted, METRIC, senders=senders, receivers=receivers, by="edge", progress=False)
    loaded = PathResult.load(r.save(tmp_path / "paths"))
    assert loaded.senders == r.senders and loaded.receivers == r.receivers
    torch.testing.assert_close(loaded.effect, r.effect)
    assert loaded.provenance["model"] == tl_compat.model_name(model)
    assert len(r.to_dataframe()) == len(senders) * len(receivers)
    assert r.plot(tmp_path / "paths.png").stat().st_size > 0
    assert r.top(3)[0][2] == pytest.approx(float(r.mean_effect.abs().max()) * (1 if r.top(1)[0][2] > 0 else -1))


def test_model_left_as_found(model, prompts):
    clean, corrupted = prompts
    senders, receivers = sample_graph(model)
    before = snapshot(model), model.cfg.use_split_qkv_input, model.cfg.use_hook_mlp_in

    def bad_metric(logits):
        raise RuntimeError("user metric failed")

    with pytest.raises(RuntimeError):
        patch_paths(model, clean, corrupted, bad_metric, senders=senders, receivers=receivers, progress=False)
    patch_paths(model, clean, corrupted, METRIC, senders=senders, receivers=receivers, progress=False)
    assert (snapshot(model), model.cfg.use_split_qkv_input, model.cfg.use_hook_mlp_in) == before


@pytest.mark.parametrize("kwargs, pattern", [
    (dict(senders=[], receivers=[Receiver("logits")]), "non-empty list of Node"),
    (dict(senders=[Node("head", 5, 0)], receivers=[Receiver("logits")]), "out of range"),
    (dict(senders=[Node("head", 0, 9)], receivers=[Receiver("logits")]), "heads 0..3"),
    (dict(senders=[Node("embed")], receivers=[Receiver("logits")], colour="red"), "unknown PathConfig"),
    (dict(senders=[Receiver("logits")], receivers=[Receiver("logits")]), "hold Node values"),
])
def test_bad_input_refused_before_any_forward(model, prompts, kwargs, pattern):
    clean, corrupted = prompts
    assert_refused_before_any_forward(model, lambda: unchecked(patch_paths)(model, clean, corrupted, METRIC, progress=False, **kwargs),
                                      PatchingError, pattern)


def test_config_checks_its_fields():
    with pytest.raises(PatchingError, match="by must be 'sender' or 'edge'"):
        construct_unchecked(PathConfig, by="receiver")
    with pytest.raises(PatchingError, match="must be a PathConfig"):
        unchecked(patch_paths)(None, "a", "b", METRIC, senders=[Node("embed")], receivers=[Receiver("logits")], config={"by": "edge"})


def test_kv_receivers_count_key_value_heads(model):
    kv = tl_compat.n_kv_heads(model)
    with pytest.raises(PatchingError, match="key/value heads"):
        Receiver("k", 0, kv).check(model)
    assert len(receivers_of(model, layers=[0], kinds=("k",))) == kv
    assert upstream_nodes(model)[0] == Node("embed")


def test_paths_to_the_logits_alone_run_no_block(model, prompts):
    clean, corrupted = prompts
    counter = CountingHook(model)
    try:
        r = patch_paths(model, clean, corrupted, METRIC, senders=upstream_nodes(model), receivers=[Receiver("logits")],
                        progress=False)
    finally:
        counter.remove()
    assert counter.count == 2 * 2 * (1 + model.cfg.n_layers)  # the two reference runs of each pair, nothing more
    assert r.provenance["patched_rows_evaluated"] > 0


def test_listed_edges_alone_equal_the_grid(model, prompts):
    clean, corrupted = prompts
    senders, receivers = sample_graph(model)
    grid = patch_paths(model, clean, corrupted, METRIC, senders=senders, receivers=receivers, by="edge", progress=False)
    edges = [(senders[1], receivers[0]), (senders[4], receivers[6]), (senders[0], receivers[3]), (senders[1], receivers[6])]
    listed = patch_paths(model, clean, corrupted, METRIC, edges=edges, by="edge", progress=False)
    assert listed.senders == [senders[1], senders[4], senders[0]]
    for u, r in edges:
        s, g = listed.senders.index(u), [group[0] for group in listed.receivers].index(r)
        torch.testing.assert_close(listed.metric[:, s, g], grid.metric[:, senders.index(u), receivers.index(r)], atol=1e-5,
                                   rtol=0)
    assert int(torch.isnan(listed.metric[0]).sum()) == 3 * 3 - len(edges)
    with pytest.raises(PatchingError, match="needs by='edge'"):
        patch_paths(model, clean, corrupted, METRIC, edges=edges, progress=False)
