"""Causal tracing against a naive one-forward-per-restoration reference, on tiny random models
with learned and rotary positions (and grouped-query attention)."""

from __future__ import annotations

import pytest
import torch

from patching.errors import PatchingError
from patching.model import Site, tl_compat
from patching.tracing import NoiseConfig, causal_trace, window_layers
from tests.conftest import unchecked
from tests.hooks_snapshot import CountingHook, snapshot

ANSWER, SUBJECT = 7, (1, 2)
NOISE = NoiseConfig(scale=2.0, n_samples=3, seed=4)


@pytest.fixture(scope="module", params=["learned", "rotary_gqa"])
def model(request):
    if request.param == "learned":
        model = tl_compat.random_model(n_layers=3, d_vocab=50, n_ctx=32)
    else:
        model = tl_compat.random_model(n_layers=3, d_vocab=50, n_ctx=32, positional_embedding_type="rotary",
                                       rotary_dim=4, normalization_type="RMS", n_key_value_heads=2,
                                       act_fn="silu", gated_mlp=True, seed=1)
    return model.eval()


@pytest.fixture(scope="module")
def tokens():
    return torch.randint(0, 50, (1, 6), generator=torch.Generator().manual_seed(2))


def naive_noise(d_model):
    """The documented draws, written out here rather than taken from `NoiseConfig.draw`: seeded
    standard normals, (n_samples, subject positions, d_model), times the scale."""
    gen = torch.Generator().manual_seed(NOISE.seed)
    return torch.randn(NOISE.n_samples, len(SUBJECT), d_model, generator=gen) * NOISE.scale


def naive_add_noise(drawn, draw):
    """ROME's corruption by its own definition: the noise added to the subject's token embeddings
    (hook_embed, before any learned positional embedding), not through `noise_hook`."""
    def hook(x, hook):
        x = x.clone()
        x[:, list(SUBJECT)] += drawn[draw]
        return x
    return ("hook_embed", hook)


def naive_noised_prob(model, tokens):
    drawn = naive_noise(model.cfg.d_model)
    probs = []
    for draw in range(NOISE.n_samples):
        with torch.inference_mode():
            logits = model.run_with_hooks(tokens, fwd_hooks=[naive_add_noise(drawn, draw)])
        probs.append(torch.softmax(logits[0, -1], -1)[ANSWER])
    return float(torch.stack(probs).mean())


def naive_trace(model, tokens, kind, window=1, sever=None):
    """One full forward per (draw, layer, position), every restoration by a hook."""
    n_layers, n_pos = model.cfg.n_layers, tokens.shape[1]
    drawn = naive_noise(model.cfg.d_model)
    _, clean = model.run_with_cache(tokens)
    prob = torch.zeros(n_layers, n_pos)
    for draw in range(NOISE.n_samples):
        add = naive_add_noise(drawn, draw)
        _, noised = _cached(model, tokens, add)
        for layer in range(n_layers):
            for p in range(n_pos):
                if kind == "state":
                    restore = [Site(layer).hook_name]
                    freeze = [] if sever is None else [Site(i, f"{sever}_out").hook_name for i in range(layer, n_layers)]
                else:
                    restore = [Site(i, f"{kind}_out").hook_name for i in window_layers(layer, window, n_layers)]
                    freeze = []
                hooks = [add] + [(name, _setter(clean[name], p)) for name in restore]
                hooks += [(name, _setter(noised[name], p)) for name in freeze]
                with torch.inference_mode():
                    logits = model.run_with_hooks(tokens, fwd_hooks=hooks)
                prob[layer, p] += torch.softmax(logits[0, -1], -1)[ANSWER] / NOISE.n_samples
    return prob


def _cached(model, tokens, add):
    cache = {}

    def keep(x, hook):
        cache[hook.name] = x.detach().clone()

    with torch.inference_mode():
        model.run_with_hooks(tokens, fwd_hooks=[add, (lambda name: True, keep)])
    return None, cache


def _setter(source, p):
    def hook(x, hook):
        x = x.clone()
        x[:, p] = source[:, p]
        return x
    return hook


@pytest.mark.parametrize("kind,window,sever", [("state", 1, None), ("mlp", 2, None), ("attn", 3, None),
                                               ("state", 1, "mlp"), ("state", 1, "attn")])
def test_trace_equals_naive_reference(model, tokens, kind, window, sever):
    ours = causal_trace(model, tokens, SUBJECT, ANSWER, noise=NOISE, kind=kind, window=window, sever=sever, batch_size=7)
    torch.testing.assert_close(ours.prob, naive_trace(model, tokens, kind, window, sever), atol=1e-5, rtol=0)
    assert ours.p_clean != ours.p_corrupted
    clean_prob = torch.softmax(model(tokens)[0, -1], -1)[ANSWER].item()
    assert ours.p_clean == pytest.approx(clean_prob, abs=1e-6)
    assert ours.p_corrupted == pytest.approx(naive_noised_prob(model, tokens), abs=1e-6)
    # before the first noised position nothing differs: restoring there changes nothing
    torch.testing.assert_close(ours.prob[:, 0], torch.full((model.cfg.n_layers,), ours.p_corrupted), atol=1e-6, rtol=0)


def test_trace_after_a_bound_prefix_equals_the_whole_prompts_trace(model, tokens):
    """Under `bound_prefix` (the safety pipeline's shared context) the trace runs after the
    context's keys and values: it equals the whole prompt's trace at the positions after it."""
    whole = causal_trace(model, tokens, SUBJECT, ANSWER, noise=NOISE, kind="state")
    with tl_compat.bound_prefix(model, tokens[:, :1]):
        bound = causal_trace(model, tokens[:, 1:], tuple(p - 1 for p in SUBJECT), ANSWER, noise=NOISE, kind="state")
    torch.testing.assert_close(bound.prob, whole.prob[:, 1:], atol=1e-5, rtol=0)


def test_zero_noise_is_refused_not_divided_by_zero(model, tokens):
    with pytest.raises(PatchingError, match="unchanged"):
        causal_trace(model, tokens, SUBJECT, ANSWER, noise=NoiseConfig(scale=0.0, n_samples=1))


def test_window_layout_matches_rome():
    assert list(window_layers(0, 10, 30)) == list(range(0, 5))
    assert list(window_layers(15, 10, 30)) == list(range(10, 20))
    assert list(window_layers(29, 10, 30)) == list(range(24, 30))
    assert list(window_layers(4, 1, 30)) == [4]


@pytest.mark.parametrize("kwargs,pattern", [
    (dict(kind="hidden"), "kind must be"), (dict(sever="mlp", kind="mlp"), "sever applies"),
    (dict(window=0, kind="mlp"), "window must be"), (dict(subject=(0, 9)), "subject positions"),
    (dict(answer=50), "answer must be"), (dict(noise=3.0), "NoiseConfig"),
])
def test_bad_inputs_raise_before_any_forward(model, tokens, kwargs, pattern):
    args = dict(subject=SUBJECT, answer=ANSWER, noise=NOISE)
    args.update(kwargs)
    counter = CountingHook(model)
    try:
        with pytest.raises(PatchingError, match=pattern):
            unchecked(causal_trace)(model, tokens, args.pop("subject"), args.pop("answer"), **args)
    finally:
        counter.remove()
    assert counter.count == 0
    with pytest.raises(PatchingError, match="n_samples"):
        NoiseConfig(scale=1.0, n_samples=0)


def test_hooks_restored_after_a_fault(model, tokens, monkeypatch):
    before = snapshot(model)
    calls = []

    def failing_run_blocks(*args, **kwargs):
        calls.append(1)
        raise KeyboardInterrupt

    monkeypatch.setattr(tl_compat, "run_blocks_joining", failing_run_blocks)
    with pytest.raises(KeyboardInterrupt):
        causal_trace(model, tokens, SUBJECT, ANSWER, noise=NOISE, kind="state", sever="mlp")
    assert calls and snapshot(model) == before


def test_counting_hook_sees_runs_that_start_mid_model(model, tokens):
    """The refused-before-any-forward checks count block calls too: rows that join at a later
    layer from cached residuals never touch the embedding."""
    with torch.inference_mode():
        _, cache = model.run_with_cache(tokens)
        counter = CountingHook(model)
        try:
            tl_compat.run_blocks_joining(model, [(1, cache[Site(1).hook_name])])
        finally:
            counter.remove()
    assert counter.count == model.cfg.n_layers - 1
