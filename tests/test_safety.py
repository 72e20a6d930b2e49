"""Safety latents: suite integrity, the refusal metric, curve bookkeeping, hook hygiene."""

from __future__ import annotations

import math

import pytest
import torch

from patching import Site
from patching.model import tl_compat
from patching.errors import PatchingError
from patching.attribution.restoration import RestorationCurve, latent_restoration, raw_restoration
from sae.metrics import median
from patching.safety.curves import UnitCurve, counts_for, pairs_clearing
from patching.safety.direction import Runner, ablation, addition, direction_effects, refusal_directions
from patching.safety.dynamic import UnitSet, guided_generate
from patching.safety.score import RefusalScore, greedy_scored, greedy_texts, query_start, refusal_scores, tokenize_chat
from patching.safety.search import SafetyConfig, find_safety_latents
from patching.safety.prompts import SafetySuite, is_refusal
from patching.splice.generate import SharedPrefix, generate, generate_by_length, prompt_batches
from tests.conftest import make_sae
from tests.hooks_snapshot import CountingHook, snapshot


@pytest.mark.default_model
def test_every_pair_formats_to_equal_token_length(default_model_4l):
    suite = SafetySuite()
    harmful = tokenize_chat(default_model_4l, suite, [h for h, _ in suite.pairs])
    harmless = tokenize_chat(default_model_4l, suite, [s for _, s in suite.pairs])
    assert len(suite.pairs) >= 30
    for (h, s), a, b in zip(suite.pairs, harmful, harmless):
        assert a.shape == b.shape, (h, s)
        assert a[0, 0].item() == default_model_4l.tokenizer.bos_token_id and (a[0, 1:2] != a[0, :1]).all()  # one BOS
    start = query_start(default_model_4l, suite)
    assert all(torch.equal(a[0, :start], harmful[0][0, :start]) for a in harmful + harmless)  # shared context
    assert harmful[0][0, -4].item() == default_model_4l.tokenizer.bos_token_id  # <|im_start|> ass istant \n
    assert default_model_4l.to_string(harmful[0][0, -3:]) == "assistant\n"


def test_refusal_score_on_hand_made_logits():
    logits = torch.zeros(2, 10)
    logits[0, [1, 2]] = math.log(3.0)  # refusal tokens 1, 2: logsumexp = log 6
    logits[0, 5] = math.log(2.0)       # compliance token 5: log 2
    logits[1, 5] = 4.0
    score = RefusalScore(refusal=(1, 2), compliance=(5,))
    values = score(logits, torch.tensor([0, 0]))
    assert values[0].item() == pytest.approx(math.log(3.0))
    assert values[1].item() == pytest.approx(math.log(2.0) - 4.0)
    assert score.readout == -1


def test_refusal_detection():
    assert is_refusal("  I'm sorry, but I can't help with that.")
    assert is_refusal("I cannot do that")
    assert not is_refusal("Sure! Here is how")
    assert not is_refusal("Dear Ms. Johnson, I'm sorry to hear")


@pytest.fixture(scope="module")
def toy():
    model = tl_compat.random_model(n_layers=3, d_vocab=50)
    model.eval()
    site = Site(1)
    sae = make_sae(16, 40, hook_name=site.hook_name, model_name=model.cfg.model_name, seed=2)
    harmful = torch.tensor([[1, 8, 9, 3, 4, 5, 6, 7]])
    harmless = harmful.clone()
    harmless[0, 3] = 30
    return model, site, sae, harmful, harmless, RefusalScore((3,), (4,))


def test_patching_everything_restores_exactly_all_of_it(toy):
    model, site, sae, harmful, harmless, metric = toy
    curve, active, full, scores = latent_restoration(model, sae, harmful, harmless, metric, (1, 3, 1000), start=3, site=site)
    assert full == pytest.approx(1.0, abs=1e-4)
    assert 0 < active <= 40 * 5 and scores.shape == (40,)
    # Every differing latent, without the error node, is what the largest count patches; the
    # smaller counts patch the top AtP elements. All against the naive curve below.
    naive = _naive_latent_curve(model, site, sae, harmful, harmless, metric, (1, 3, 1000), start=3)
    assert naive["n_differing"] < 1000
    torch.testing.assert_close(curve, naive["fraction"], atol=1e-4, rtol=0)
    assert active == naive["active"]
    torch.testing.assert_close(scores, naive["scores"], atol=1e-5, rtol=1e-4)
    assert len(set(curve.tolist())) == 3  # three different selections, three different values
    raw, n_elements = raw_restoration(model, site, harmful, harmless, metric, (1, 3, 16 * 5), start=3)
    assert n_elements == 16 * 5
    assert raw[-1].item() == pytest.approx(1.0, abs=1e-4)  # every dimension at every query position
    # This pair's span is negative (clean below corrupted): the top elements are those restoring the
    # largest share of it, as for latents (before, the raw curve ranked raw AtP and began at -0.30).
    torch.testing.assert_close(raw, _naive_raw_curve(model, [site], harmful, harmless, metric, (1, 3, 16 * 5), 3),
                               atol=1e-4, rtol=0)
    assert raw[0] > 0
    # Several sites ranked together: everything at layers 0 and 2 includes the whole of layer 0.
    both, n_both = raw_restoration(model, [Site(0), Site(2)], harmful, harmless, metric, (3, 2 * 16 * 5), start=3)
    assert n_both == 2 * 16 * 5 and both[-1].item() == pytest.approx(1.0, abs=1e-4)
    assert both[0].item() != pytest.approx(1.0, abs=1e-3)
    torch.testing.assert_close(both, _naive_raw_curve(model, [Site(0), Site(2)], harmful, harmless, metric,
                                                      (3, 2 * 16 * 5), 3), atol=1e-4, rtol=0)


def _naive_latent_curve(model, site, sae, clean, corrupted, metric, counts, start):
    """The latent restoration curve by hand: AtP from the splice's latent gradient on the corrupted
    run, the top n (position, latent) elements set to their clean values by splice edits, one
    forward each, the effect normalised by the plain model's clean and corrupted metrics."""
    from patching import LatentEdit, splice

    pair = torch.tensor([0])
    with torch.inference_mode():
        m_clean, m_corr = (metric(model(t)[:, -1], pair).item() for t in (clean, corrupted))
        with splice(model, sae, cache=True) as state:
            model(clean)
    z_clean = state.records[site].latents[0]
    with splice(model, sae, cache=True, track_grads=True) as state:
        metric(model(corrupted)[:, -1], pair).sum().backward()
    model.zero_grad(set_to_none=True)
    z_corr, grad = state.records[site].latents[0].detach(), state.records[site].latents_grad[0]
    atp = ((z_clean - z_corr) * grad)[start:] / (m_clean - m_corr)  # the share of the span each element restores
    differing = (z_clean != z_corr)[start:]
    order = torch.argsort(atp.masked_fill(~differing, float("-inf")).flatten(), descending=True, stable=True)
    fraction = []
    for n in counts:
        chosen = order[: min(n, int(differing.sum()))]
        edits = [LatentEdit(site, int(j), float(z_clean[start + int(p), int(j)]), positions=start + int(p))
                 for p, j in (divmod(int(i), z_clean.shape[1]) for i in chosen)]
        with torch.inference_mode(), splice(model, sae, edits=edits):
            m = metric(model(corrupted)[:, -1], pair).item()
        fraction.append((m - m_corr) / (m_clean - m_corr))
    return {"fraction": torch.tensor(fraction), "n_differing": int(differing.sum()),
            "active": int((z_clean[start:] != 0).sum()), "scores": atp.sum(0),
            "span": m_clean - m_corr}


def _naive_raw_curve(model, sites, clean, corrupted, metric, counts, start):
    """The raw-unit restoration curve by hand: AtP (x_clean − x_corrupted) · dM/dx from TransformerLens
    hooks, ranked as the share of the span each element restores, the top n (site, position,
    dimension) elements copied from the clean run by hooks, one forward each."""
    pair = torch.tensor([0])
    names = [site.hook_name for site in sites]
    with torch.inference_mode():
        m_clean, m_corr = (metric(model(t)[:, -1], pair).item() for t in (clean, corrupted))
    _, clean_cache = model.run_with_cache(clean, names_filter=names)
    grads, acts = {}, {}

    def keep(x, hook):
        x.retain_grad()
        acts[hook.name] = x
        return x

    with torch.enable_grad():
        logits = model.run_with_hooks(corrupted, fwd_hooks=[(name, keep) for name in names])
        metric(logits[:, -1], pair).sum().backward()
    model.zero_grad(set_to_none=True)
    for name in names:
        grads[name] = acts[name].grad[0]
    scores = torch.cat([((clean_cache[n][0] - acts[n][0].detach()) * grads[n])[start:] for n in names], dim=1)
    scores = scores / (m_clean - m_corr)
    width = scores.shape[1] // len(names)
    order = torch.argsort(scores.flatten(), descending=True, stable=True)
    fraction = []
    for n in counts:
        chosen = {}
        for flat in order[:n].tolist():
            p, column = divmod(flat, scores.shape[1])
            chosen.setdefault(names[column // width], []).append((start + p, column % width))

        def copy(x, hook):
            x = x.clone()
            for p, d in chosen[hook.name]:
                x[0, p, d] = clean_cache[hook.name][0, p, d]
            return x

        with torch.inference_mode():
            logits = model.run_with_hooks(corrupted, fwd_hooks=[(name, copy) for name in chosen])
        fraction.append((metric(logits[:, -1], pair).item() - m_corr) / (m_clean - m_corr))
    return torch.tensor(fraction)


def test_prompts_padded_after_the_shared_context_compute_as_unpadded(toy):
    """Prompts of several lengths share one batch, padded between the context and the query; the
    mask gives every row its unpadded positions, so scores and greedy tokens match the per-length
    batches (under an intervention on every position too)."""
    model, metric = toy[0], toy[-1]
    gen = torch.Generator().manual_seed(11)
    context = torch.randint(0, 50, (1, 6), generator=gen)
    prompts = [torch.cat([context, torch.randint(0, 50, (1, n), generator=gen)], 1) for n in (2, 4, 3, 4, 1)]
    prefix = SharedPrefix.of(model, context)
    batches = prompt_batches(prompts, prefix, pad=True)
    assert len(batches) == 1 and batches[0][2][0].tolist() == [1] * 6 + [0, 0] + [1] * 2  # pads after the context
    assert len(prompt_batches(prompts, prefix)) == 4  # unpadded: one batch per length
    spec = addition(Site(1), 2 * torch.randn(model.cfg.d_model, generator=gen))
    for build in (None, lambda _: spec):
        torch.testing.assert_close(refusal_scores(model, prompts, metric, build, prefix=prefix, pad=True),
                                   refusal_scores(model, prompts, metric, build, prefix=prefix), atol=1e-5, rtol=0)
        padded = generate_by_length(model, prompts, 5, build, prefix=prefix, pad=True)
        assert all(torch.equal(a, b) for a, b in zip(padded, generate_by_length(model, prompts, 5, build, prefix=prefix)))
        # texts and scores from one pass equal the two separate calls
        texts, scores = greedy_scored(model, prompts, 5, metric, build, prefix=prefix, pad=True)
        assert texts == greedy_texts(model, prompts, 5, build, prefix=prefix)
        torch.testing.assert_close(scores, refusal_scores(model, prompts, metric, build, prefix=prefix), atol=1e-5, rtol=0)
    with pytest.raises(PatchingError, match="readout -1"):
        greedy_scored(model, prompts, 5, RefusalScore((3,), (4,), position=2))


def test_pair_curves_after_a_bound_prefix_equal_the_whole_prompts(toy):
    """The curves stage runs each pair's query after the shared context's cached keys and values;
    every unit kind's curve must equal the one computed on the whole prompts."""
    from patching.safety.units import pair_curves

    model, site, sae, harmful, harmless, metric = toy
    gen = torch.Generator().manual_seed(3)
    direction = torch.randn(model.cfg.d_model, generator=gen)
    percents = (1.0, 10.0, 100.0)
    whole = pair_curves(model, {site: sae}, harmful, harmless, metric, 3, 1, percents, direction)
    with tl_compat.bound_prefix(model, harmful[:, :3]):
        bound = pair_curves(model, {site: sae}, harmful[:, 3:], harmless[:, 3:], metric, 0, 1, percents, direction)
        # a cache made inside (as the sweep engine makes one per chunk) already holds the prefix
        inner = tl_compat.prefix_cache(model, harmful[:, 3:5])
        assert tl_compat.cache_length(inner) == 5
    assert "forward" not in model.__dict__  # the binding is gone
    with pytest.raises(PatchingError, match="one row of token ids"):
        with tl_compat.bound_prefix(model, torch.cat([harmful, harmless])[:, :3]):
            pass
    assert "forward" not in model.__dict__
    assert whole.keys() == bound.keys() and len(whole) == 5
    # The direction's point against plain hooks: the harmless run's component along the unit
    # direction at layer 1, from position 3 on, set to the harmful run's.
    unit = direction / direction.norm()
    _, cache = model.run_with_cache(harmful, names_filter="blocks.1.hook_resid_pre")
    source = cache["blocks.1.hook_resid_pre"][0]

    def along(x, hook):
        x = x.clone()
        x[0, 3:] += ((source[3:] - x[0, 3:]) @ unit)[:, None] * unit
        return x

    pair = torch.tensor([0])
    with torch.inference_mode():
        m_harmful, m_harmless = (metric(model(t)[:, -1], pair).item() for t in (harmful, harmless))
        patched = metric(model.run_with_hooks(harmless, fwd_hooks=[("blocks.1.hook_resid_pre", along)])[:, -1], pair).item()
    expected = (patched - m_harmless) / (m_harmful - m_harmless)
    assert whole["direction@layer 1"][0].item() == pytest.approx(expected, abs=1e-4)
    assert abs(expected) > 1e-3
    for kind in whole:
        torch.testing.assert_close(bound[kind][0], whole[kind][0], atol=1e-5, rtol=0)
        assert bound[kind][1] == whole[kind][1]


def test_true_median_and_span_threshold_on_hand_made_numbers():
    assert median([3.0, 1.0, 4.0, 2.0]).item() == 2.5  # torch.median would say 2.0
    assert torch.tensor([3.0, 1.0, 4.0, 2.0]).median().item() == 2.0
    assert median([5.0, 1.0, 3.0]).item() == 3.0
    assert median(torch.tensor([])).isnan()
    spans = [2.0, 0.05, -1.0, 1.0, float("nan"), 0.99]
    assert pairs_clearing(spans, 1.0) == [0, 3]
    with pytest.raises(PatchingError, match="span threshold"):
        pairs_clearing(spans, 0.0)
    assert counts_for([0.01, 10.0, 100.0], 200) == [1, 20, 200]


def test_curve_summary_on_hand_made_numbers():
    curve = UnitCurve("k", [1.0, 5.0, 50.0], torch.tensor([[0.2, 0.6, 0.95], [0.1, 0.3, 0.4], [0.55, 0.92, 1.4],
                                                           [0.0, 0.51, 1.0]]), [100, 40, 10, 20], [0, 3, 5, 7])
    assert curve.needed(0.5) == [5.0, None, 1.0, 5.0]
    assert curve.median() == pytest.approx([0.15, 0.555, 0.975])  # true medians of four pairs
    s = curve.summary(overshoot_margin=0.1)
    assert s["median_percent_for_50"] == 5.0 and s["pairs_reaching_50"] == 3
    assert s["median_percent_for_90"] == 50.0 and s["pairs_reaching_90"] == 3  # median of 50, 5, 50
    assert s["median_units_for_50"] == 1.0  # 5% of 100 = 5; 1% of 10 rounds up to one unit; 5% of 20 = 1
    assert s["overshoot_points"] == 1 and s["max_fraction"] == pytest.approx(1.4)
    legacy = RestorationCurve([1, 2], torch.tensor([[0.1, 0.2], [0.3, 0.4]]), [10, 10])
    assert legacy.median() == pytest.approx([0.2, 0.3])


def test_direction_equals_hand_computed_difference_of_means(toy):
    model = toy[0]
    gen = torch.Generator().manual_seed(5)
    harmful = [torch.randint(0, 50, (1, n), generator=gen) for n in (6, 6, 9)]
    harmless = [torch.randint(0, 50, (1, n), generator=gen) for n in (7, 5)]
    got = refusal_directions(model, harmful, harmless, [0, 2])
    for row, layer in zip(got, [0, 2]):
        name = f"blocks.{layer}.hook_resid_pre"
        def mean(prompts):
            return torch.stack([model.run_with_cache(p)[1][name][0, -1].double() for p in prompts]).mean(0)
        assert torch.allclose(row, mean(harmful) - mean(harmless), atol=1e-5)


def test_shared_context_run_under_the_intervention_equals_running_every_prompt_whole(toy):
    model, metric = toy[0], toy[-1]
    gen = torch.Generator().manual_seed(7)
    context = torch.randint(0, 50, (1, 6), generator=gen)
    prompts = [torch.cat([context, torch.randint(0, 50, (1, n), generator=gen)], 1) for n in (3, 3, 4)]
    d = 3 * torch.randn(model.cfg.d_model, generator=gen)
    for spec in (None, ablation(model, d), addition(Site(1), d)):
        whole, shared = Runner(model), Runner(model, context)
        torch.testing.assert_close(shared.scores(prompts, metric, spec), whole.scores(prompts, metric, spec), atol=1e-5, rtol=0)
        build = None if spec is None else (lambda _, spec=spec: spec)
        tokens = generate_by_length(model, prompts, 4, build)
        assert all(torch.equal(a, b) for a, b in zip(generate_by_length(model, prompts, 4, build, prefix=shared.prefix(spec)),
                                                     tokens))
    # The directions read the prompts' last tokens after the context's cache: equal to whole prompts.
    harmful, harmless = prompts[:2], [torch.cat([context, torch.randint(0, 50, (1, 3), generator=gen)], 1)
                                      for _ in range(2)]
    (report, shared_dirs), (_, whole_dirs) = (direction_effects(model, harmful, harmless, metric, [1, 2], 2, context=c)
                                              for c in (context, None))
    torch.testing.assert_close(shared_dirs, whole_dirs, atol=1e-5, rtol=0)
    assert report.best_layer in (1, 2)
    with pytest.raises(PatchingError, match="start with the given context"):
        direction_effects(model, harmful, [torch.randint(0, 50, (1, 9), generator=gen)], metric, [1], 2, context=context)
    # The context itself is intervened on: reusing an unintervened context gives other scores.
    spec = addition(Site(1), d)
    stale = refusal_scores(model, prompts, metric, lambda _: spec, prefix=SharedPrefix.of(model, context))
    assert (stale - Runner(model).scores(prompts, metric, spec)).abs().max() > 1e-3


def test_direction_ablation_and_addition_equal_plain_hooks(toy):
    """The interventions' scores against TransformerLens hooks: ablation projects the unit direction
    out of every block's input and the last block's output; addition adds the vector at its site."""
    model, metric = toy[0], toy[-1]
    gen = torch.Generator().manual_seed(13)
    prompts = [torch.randint(0, 50, (1, n), generator=gen) for n in (5, 7)]
    d = 3 * torch.randn(model.cfg.d_model, generator=gen)
    u = d / d.norm()
    names = [f"blocks.{layer}.hook_resid_pre" for layer in range(3)] + ["blocks.2.hook_resid_post"]
    cases = ((ablation(model, d), [(name, lambda x, hook: x - (x @ u)[..., None] * u) for name in names]),
             (addition(Site(1), d), [("blocks.1.hook_resid_pre", lambda x, hook: x + d)]))
    for spec, hooks in cases:
        with torch.inference_mode():
            expected = torch.cat([metric(model.run_with_hooks(p, fwd_hooks=hooks)[:, -1], torch.tensor([0]))
                                  for p in prompts])
        got = Runner(model).scores(prompts, metric, spec)
        torch.testing.assert_close(got.float(), expected.float(), atol=1e-5, rtol=0)
        assert (got - Runner(model).scores(prompts, metric)).abs().max() > 1e-3  # the intervention matters


def _all_mlp_units(model):
    return [UnitSet(Site(layer, "mlp_post"), tuple(range(model.cfg.d_mlp))) for layer in range(model.cfg.n_layers)]


@pytest.mark.parametrize("kind", ["mlp_post", "latents"])
def test_dynamic_patching_with_every_unit_and_the_same_run_changes_nothing(toy, kind):
    model, site, sae, harmful, harmless, _ = toy
    tokens = torch.cat([harmful, harmless])
    units = _all_mlp_units(model) if kind == "mlp_post" else [UnitSet(site, tuple(range(sae.d_sae)), sae)]
    before = snapshot(model)
    for cache in (True, False):
        plain = generate(model, tokens, 6, use_kv_cache=cache)
        out = guided_generate(model, tokens, tokens.clone(), 6, units, copy_from=0, use_kv_cache=cache)
        assert torch.equal(out.tokens, plain) and torch.equal(out.guide_tokens, plain)
        # the first pass unembeds only its last position (`forward_step(last_only=True)`)
        logits = tl_compat.readout(model, model(plain[:, :-6], stop_at_layer=model.cfg.n_layers)[:, -1]) if not cache else None
        if logits is not None:
            assert torch.equal(out.first_logits, logits)  # bit-exact, no tolerance
    assert snapshot(model) == before


def test_copying_the_full_residual_reproduces_the_guiding_run(toy):
    model, _, _, harmful, harmless, _ = toy
    gen = torch.Generator().manual_seed(9)
    guide = torch.randint(0, 50, (2, 8), generator=gen)
    tokens = torch.randint(0, 50, (2, 8), generator=gen)
    units = [UnitSet(Site(1, "resid_pre"), tuple(range(model.cfg.d_model)))]
    own = generate(model, guide, 6)
    assert not torch.equal(generate(model, tokens, 6)[:, 8:], own[:, 8:]), "the runs should differ unguided"
    for cache in (True, False):
        out = guided_generate(model, tokens, guide, 6, units, copy_from=0, use_kv_cache=cache)
        assert torch.equal(out.tokens[:, 8:], own[:, 8:]) and torch.equal(out.guide_tokens, own)


def test_guided_generation_cached_equals_uncached_with_unequal_lengths(toy):
    model, site, sae, *_ = toy
    gen = torch.Generator().manual_seed(11)
    tokens, guide = torch.randint(0, 50, (2, 10), generator=gen), torch.randint(0, 50, (2, 7), generator=gen)
    units = [UnitSet(Site(2, "mlp_post"), tuple(range(0, 32, 2))), UnitSet(site, tuple(range(0, 40, 3)), sae)]
    a = guided_generate(model, tokens, guide, 5, units, copy_from=3)
    b = guided_generate(model, tokens, guide, 5, units, copy_from=3, use_kv_cache=False)
    assert torch.equal(a.tokens, b.tokens) and torch.allclose(a.first_logits, b.first_logits, atol=1e-4)
    assert not torch.equal(a.tokens, generate(model, tokens, 5)), "copying 16 neurons and 14 latents should matter"
    with pytest.raises(PatchingError, match="out of range"):
        guided_generate(model, tokens, guide, 5, [UnitSet(Site(2, "mlp_post"), (32,))], copy_from=3)


def test_hooks_restored_after_a_fault_mid_guided_generation(toy, monkeypatch):
    model, site, sae, harmful, harmless, _ = toy
    before = snapshot(model)
    calls = {"n": 0}
    real_encode = sae.encode

    def failing_encode(x):
        calls["n"] += 1
        if calls["n"] == 4:
            raise RuntimeError("encode failed mid-generation")
        return real_encode(x)

    monkeypatch.setattr(sae, "encode", failing_encode)
    with pytest.raises(RuntimeError, match="mid-generation"):
        guided_generate(model, harmless, harmful, 5, [UnitSet(site, (1, 2), sae)], copy_from=2)
    assert calls["n"] == 4 and snapshot(model) == before


@pytest.mark.parametrize("overrides, match", [
    (dict(max_new_tokens=-1), "max_new_tokens"), (dict(max_pairs=-1), "max_pairs"), (dict(max_pairs=0), "max_pairs"),
    (dict(span_threshold=0.0), "span_threshold"), (dict(percents=(0.0, 5.0)), "percents"),
    (dict(dynamic_ns=(-1,)), "dynamic_ns"), (dict(direction_layers=(99,)), "n_layers"), (dict(counts=(1,)), "counts"),
])
def test_safety_settings_refused_before_any_forward(toy, overrides, match):
    model, site, sae, *_ = toy
    counter = CountingHook(model)
    try:
        with pytest.raises(PatchingError, match=match):
            find_safety_latents(model, sae, **overrides)
    finally:
        counter.remove()
    assert counter.count == 0


def test_unit_sets_refuse_bad_indices(toy):
    _, site, sae, *_ = toy
    with pytest.raises(PatchingError):
        UnitSet(site, (40,), sae)
    with pytest.raises(PatchingError):
        UnitSet(site, ())
    assert SafetyConfig().span_threshold == 1.0


@pytest.mark.default_model
def test_find_safety_latents_end_to_end_on_the_truncated_default_model(default_model_4l, tmp_path):
    model = default_model_4l
    sae = make_sae(model.cfg.d_model, 256, hook_name=Site(2).hook_name, model_name=model.cfg.model_name, seed=1)
    # On 4 layers most pairs' refusal-score spans are negative; these three were measured positive
    # (0.159, 0.115, 0.087), so the curves below always run.
    full = SafetySuite()
    suite = SafetySuite(pairs=tuple(full.pairs[i] for i in (17, 23, 9)), jailbreak_templates=full.jailbreak_templates[:1],
                        controls=full.controls[:2])
    before = snapshot(model)
    report = find_safety_latents(model, sae, suite, percents=(1.0, 100.0), span_threshold=1e-3, max_pairs=1,
                                 direction_layers=(0, 1), dynamic_ns=(5,), max_new_tokens=2, progress=False)
    assert snapshot(model) == before
    assert len(report.spans) == 3 and min(report.spans) > 1e-3
    assert report.pairs_used == [0]  # the widest span, max_pairs=1
    kinds = [c.kind for c in report.curves]
    assert kinds == ["latents@blocks.2.hook_resid_pre", "mlp_post@layer 2", "mlp_post@all layers",
                     "resid_pre@layer 2", "direction@layer 2"]
    # Every residual dimension at every query position restores the whole span.
    assert report.curves[3].fraction[0, -1].item() == pytest.approx(1.0, abs=1e-3)
    assert [row["n"] for row in report.dynamic["rows"]] == [0, 5]
    assert report.direction is not None and report.direction.layers == [0, 1, 2]
    # Layer 0 sees only each prompt's last token, the same template token for all: no direction there.
    assert report.direction.norms[0] == 0 and report.direction.ablated_score[0] is None
    assert report.direction.added_score[0] is None and report.direction.best_layer in (1, 2)
    assert all(isinstance(x, float) for x in report.direction.ablated_score[1:])
    assert "pairs have a refusal-score span" in report.paragraph()
    report.save(tmp_path / "safety")
    assert (tmp_path / "safety" / "curves.png").exists() and (tmp_path / "safety" / "report.json").exists()


def test_the_claim_counts_as_reproduced_only_without_overshoot():
    from patching.safety.report import SafetyReport

    fractions = torch.tensor([[0.3, 0.95, 1.0], [0.2, 0.92, 1.0], [0.1, 0.5, 1.0]])
    clean = UnitCurve("mlp_post@all layers", [0.1, 1.0, 100.0], fractions, [1000] * 3, [0, 1, 2])
    over = UnitCurve("mlp_post@all layers", [0.1, 1.0, 100.0], fractions * torch.tensor([1.0, 4.0, 1.0]), [1000] * 3, [0, 1, 2])
    for curve, expected in ((clean, "is reproduced here"), (over, "is met on the numbers but not reproduced")):
        report = SafetyReport(["s"], SafetyConfig(), SafetySuite(), "m", spans=[2.0, 2.0, 2.0], pairs_used=[0, 1, 2],
                              curves=[curve])
        assert expected in report.paragraph()
