"""AtP*'s QK fix: exact against patching where the metric is linear in the attention pattern (one
attention layer read at one position), equal to a naive recomputation through TransformerLens's own
attention on a deep rotary grouped-query model, and recovering a saturated-softmax effect that plain
AtP scores near zero."""

from __future__ import annotations

import math

import pytest
import torch

from conftest import construct_unchecked
from hooks_snapshot import assert_refused_before_any_forward, snapshot
from patching.attribution.qk_fix import QKConfig, attribute_qk
from patching.errors import PatchingError
from patching.model import tl_compat
from patching.sweep import CallableMetric, LogitDiff, patch_heads

METRIC = LogitDiff(answer=3, wrong=4)


def prompts_differing_at_the_end():
    g = torch.Generator().manual_seed(5)
    clean = torch.randint(0, 50, (2, 8), generator=g)
    corrupted = clean.clone()
    corrupted[:, 2] = (corrupted[:, 2] + 9) % 50
    corrupted[:, 7] = (corrupted[:, 7] + 1) % 50  # the read position's query changes too
    return clean, corrupted


@pytest.fixture(scope="module", params=["learned", "rotary_gqa"])
def one_layer(request):
    extra = {} if request.param == "learned" else dict(positional_embedding_type="rotary", rotary_dim=4, n_key_value_heads=2)
    model = tl_compat.random_model(n_layers=1, d_vocab=50, n_ctx=32, attn_only=True, normalization_type=None, d_mlp=None,
                                   seed=2, **extra).eval()
    with torch.no_grad():  # sharper attention and larger logits: effects far from linear in q and k
        model.blocks[0].attn.W_Q.mul_(6)
        model.blocks[0].attn.W_K.mul_(6)
        model.unembed.W_U.mul_(20)
    return model


@pytest.mark.parametrize("kind", ["q", "k"])
@pytest.mark.parametrize("by", ["position", "all"])
def test_equals_exact_patching_when_the_metric_is_linear_in_the_pattern(one_layer, kind, by):
    clean, corrupted = prompts_differing_at_the_end()
    exact = patch_heads(one_layer, clean, corrupted, METRIC, kind=kind, by=by, progress=False)
    fixed = attribute_qk(one_layer, clean, corrupted, METRIC, kind=kind, by=by)
    plain = attribute_qk(one_layer, clean, corrupted, METRIC, kind=kind, by=by, method="atp")
    assert [u.label() for u in fixed.units] == [u.label() for u in exact.units]
    torch.testing.assert_close(fixed.metric, exact.metric, atol=1e-5, rtol=0)
    # linearising the softmax is not exact here: plain AtP is off by orders of magnitude more
    assert (plain.metric - exact.metric).abs().max() > 100 * (fixed.metric - exact.metric).abs().max() + 1e-2


def naive_qk_fix(model, base, source, layer, kind, head, position):
    """Patch one q (query head) or k (key/value head) at one position in a base forward, read that
    layer's new pattern from TransformerLens's own attention, and dot its change with ∂M/∂pattern
    from a separate backward pass of the base run."""
    _, src = model.run_with_cache(source)
    kept = {}

    def keep(x, hook):
        kept["pattern"] = x
        return x

    pattern_name = f"blocks.{layer}.attn.hook_pattern"
    with torch.enable_grad(), model.hooks(fwd_hooks=[(pattern_name, keep)]):
        logits = model(base)  # parameters require grad, so the pattern is in the graph; autograd.grad leaves them be
        grad, = torch.autograd.grad(logits[0, -1, 3] - logits[0, -1, 4], [kept["pattern"]])
    base_pattern = kept["pattern"].detach()
    name = f"blocks.{layer}.attn.hook_{kind}"

    def patch(x, hook):
        x = x.clone()
        x[:, position, head] = src[name][:, position, head]
        return x

    with model.hooks(fwd_hooks=[(name, patch), (pattern_name, keep)]):
        model(base)
    return ((kept["pattern"] - base_pattern) * grad).sum().item()


def test_equals_a_naive_recomputation_on_a_deep_rotary_gqa_model():
    model = tl_compat.random_model(n_layers=3, d_vocab=50, n_ctx=32, positional_embedding_type="rotary", rotary_dim=4,
                                   normalization_type="RMS", n_key_value_heads=2, act_fn="silu", gated_mlp=True, seed=1).eval()
    clean, corrupted = prompts_differing_at_the_end()
    n_pos = clean.shape[1]
    for kind in ("q", "k"):
        r = attribute_qk(model, clean, corrupted, METRIC, kind=kind)
        n_heads = r.metric.shape[1] // (3 * n_pos)
        estimates = (r.metric - r.metric_corrupted[:, None]).reshape(2, 3, n_pos, n_heads)
        for layer, position, head in [(0, 2, 0), (1, 7, n_heads - 1), (2, 5, 1), (2, 2, 0), (1, 3, 1)]:
            expected = naive_qk_fix(model, corrupted[1:2], clean[1:2], layer, kind, head, position)
            assert estimates[1, layer, position, head].item() == pytest.approx(expected, abs=1e-5), (kind, layer, position)
    assert estimates.abs().max() > 1e-3


def saturated_model():
    """One head that copies the token it attends to into the logits. Token 5 (the clean query)
    attends to token 3 and token 6 (the corrupted query) to token 4, with score gaps of 40: the
    softmax is saturated, so its gradient with respect to the query is about e^-40."""
    model = tl_compat.random_model(n_layers=1, d_model=8, d_head=8, n_heads=1, d_vocab=8, n_ctx=8, attn_only=True,
                                   normalization_type=None, d_mlp=None)
    eye = torch.eye(8)
    with torch.no_grad():
        for param in model.parameters():
            param.zero_()
        model.embed.W_E.copy_(eye)
        model.blocks[0].attn.W_K.copy_(eye[None])
        model.blocks[0].attn.W_V.copy_(eye[None])
        model.blocks[0].attn.W_O.copy_(eye[None])
        model.unembed.W_U.copy_(eye)
        gap = 40 * math.sqrt(8)
        model.blocks[0].attn.W_Q[0, 5, 3] = gap
        model.blocks[0].attn.W_Q[0, 6, 4] = gap
    return model.eval()


def test_saturated_softmax_plain_atp_misses_what_the_qk_fix_recovers():
    model = saturated_model()
    clean, corrupted = torch.tensor([[3, 4, 5]]), torch.tensor([[3, 4, 6]])
    exact = patch_heads(model, clean, corrupted, METRIC, kind="q", by="position", progress=False)
    fixed = attribute_qk(model, clean, corrupted, METRIC, kind="q")
    plain = attribute_qk(model, clean, corrupted, METRIC, kind="q", method="atp")
    last = -1  # units run (layer, position, head): the query at the final position
    assert exact.metric_clean.item() == pytest.approx(1.0, abs=1e-6)
    assert exact.metric_corrupted.item() == pytest.approx(-1.0, abs=1e-6)
    assert exact.effect[0, last].item() == pytest.approx(1.0, abs=1e-6)
    assert fixed.effect[0, last].item() == pytest.approx(1.0, abs=1e-6)
    assert abs(plain.effect[0, last].item()) < 1e-6


def test_model_left_as_found(one_layer):
    clean, corrupted = prompts_differing_at_the_end()
    before = snapshot(one_layer)
    attribute_qk(one_layer, clean, corrupted, METRIC, kind="k")
    assert snapshot(one_layer) == before


def test_refusals_before_any_forward(one_layer):
    clean, corrupted = prompts_differing_at_the_end()
    assert_refused_before_any_forward(one_layer, lambda: attribute_qk(
        one_layer, clean, corrupted, CallableMetric(lambda x: x[:, -1, 0])), PatchingError, "reads one position")
    assert_refused_before_any_forward(one_layer, lambda: attribute_qk(one_layer, clean, corrupted, METRIC, layers=(4,)),
                                      Exception, "out of range")
    qk_norm = tl_compat.random_model(n_layers=1, use_qk_norm=True, normalization_type="RMS", positional_embedding_type="rotary",
                                     rotary_dim=4).eval()
    assert_refused_before_any_forward(qk_norm, lambda: attribute_qk(qk_norm, clean, corrupted, METRIC), PatchingError, "QK-norm")
    with pytest.raises(PatchingError, match="QKConfig.method must be one of"):
        construct_unchecked(QKConfig, method="atp_gd")


def test_atp_star_is_the_qk_fix_alone_with_no_block_after(one_layer):
    clean, corrupted = prompts_differing_at_the_end()
    for kind in ("q", "k"):
        star = attribute_qk(one_layer, clean, corrupted, METRIC, kind=kind, method="atp*")
        fixed = attribute_qk(one_layer, clean, corrupted, METRIC, kind=kind)
        torch.testing.assert_close(star.effect, fixed.effect.abs())


@pytest.mark.parametrize("kind, by", [("q", "position"), ("k", "all")])
def test_atp_star_is_the_mean_of_the_qk_fix_under_each_blocks_grad_drop(kind, by):
    """Reference: the QK fix run under TransformerLens hooks that detach block ℓ's attention and MLP
    writes (values unchanged, gradient dropped), |estimate| averaged over the blocks after each unit."""
    model = tl_compat.random_model(n_layers=3, d_vocab=50, n_ctx=32, positional_embedding_type="rotary", rotary_dim=4,
                                   normalization_type="RMS", n_key_value_heads=2, act_fn="silu", gated_mlp=True, seed=1).eval()
    clean, corrupted = prompts_differing_at_the_end()
    star = attribute_qk(model, clean, corrupted, METRIC, kind=kind, by=by, method="atp*")
    n_units = star.metric.shape[1] // 3  # units are layer-major
    per_drop = {}
    for drop in (1, 2):
        hooks = [(f"blocks.{drop}.hook_{name}", lambda x, hook: x.detach()) for name in ("attn_out", "mlp_out")]
        with model.hooks(fwd_hooks=hooks):
            r = attribute_qk(model, clean, corrupted, METRIC, kind=kind, by=by)
        per_drop[drop] = (r.metric - r.metric_corrupted[:, None]).abs().reshape(2, 3, n_units)
    plain = attribute_qk(model, clean, corrupted, METRIC, kind=kind, by=by)
    last = (plain.metric - plain.metric_corrupted[:, None]).abs().reshape(2, 3, n_units)[:, 2]
    expected = torch.stack([(per_drop[1][:, 0] + per_drop[2][:, 0]) / 2, per_drop[2][:, 1], last], 1).flatten(1)
    torch.testing.assert_close(star.metric - star.metric_corrupted[:, None], expected, atol=1e-5, rtol=1e-4)
    assert (star.effect >= 0).all() and (expected - last.repeat(1, 3)).abs().max() > 1e-4
