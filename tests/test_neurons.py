"""Neurons through an SAE: exact decomposition, top contexts against a brute-force scan, scores,
validation before any forward pass, restoration curves for neurons."""

from __future__ import annotations

import math

import pytest
import torch
from tests.conftest import make_sae, unchecked
from tests.hooks_snapshot import CountingHook, snapshot

from patching import PatchingError, Site
from patching.errors import SiteError
from patching.inspect.latents import InspectConfig
from patching.inspect.neuron_cards import NeuronConfig, inspect_units, unit_scores
from patching.inspect.neurons import (
    NeuronDirection,
    Neuron,
    TopKTracker,
    check_units,
    cluster_concentration,
    decompose,
    group_by_dominant,
    readout,
    token_concentration,
)
from patching.model import tl_compat

LAYER = 1


def _model(**overrides):
    model = tl_compat.random_model(n_layers=2, d_vocab=50, n_ctx=32, **overrides)
    model.eval()
    return model


@pytest.fixture(scope="module", params=["ln_gelu", "rms_gated", "ln_float64"])
def setup(request):
    if request.param == "ln_gelu":
        model = _model()
    elif request.param == "rms_gated":
        model = _model(normalization_type="RMS", gated_mlp=True, act_fn="silu")
    else:
        model = _model(dtype=torch.float64)
    with torch.no_grad():  # random norm weights and biases, so that every folded term matters
        gen = torch.Generator().manual_seed(4)
        ln2 = model.blocks[LAYER].ln2
        ln2.w.copy_(1 + 0.5 * torch.randn(ln2.w.shape, generator=gen).to(ln2.w.dtype))
        if hasattr(ln2, "b"):
            ln2.b.copy_(0.3 * torch.randn(ln2.b.shape, generator=gen).to(ln2.b.dtype))
        if not model.cfg.gated_mlp:
            model.blocks[LAYER].mlp.b_in.copy_(0.2 * torch.randn(model.cfg.d_mlp, generator=gen).to(ln2.w.dtype))
    site = Site(LAYER, "resid_mid")
    sae = make_sae(16, 40, hook_name=site.hook_name, model_name=model.cfg.model_name, seed=5).to(model.cfg.dtype)
    return request.param, model, sae


@pytest.fixture(scope="module")
def corpus():
    return torch.randint(0, 50, (5, 9), generator=torch.Generator().manual_seed(6))


def _hooks(model, tokens, names):
    _, cache = model.run_with_cache(tokens, names_filter=names)
    return {name: cache[name] for name in names}


def test_decomposition_sums_to_the_neuron_pre_activation(setup, corpus):
    name, model, sae = setup
    acts = _hooks(model, corpus, [f"blocks.{LAYER}.hook_resid_mid", f"blocks.{LAYER}.mlp.hook_pre"])
    x, pre = acts[f"blocks.{LAYER}.hook_resid_mid"], acts[f"blocks.{LAYER}.mlp.hook_pre"]
    tol = 1e-10 if name == "ln_float64" else 2e-5
    for index in (0, 7, model.cfg.d_mlp - 1):
        read = readout(model, Neuron(LAYER, index))
        parts = decompose(sae, read, x.double() if name == "ln_float64" else x)
        rebuilt = parts.latents.sum(-1) + parts.b_dec + parts.error + parts.constant
        torch.testing.assert_close(parts.total.double(), pre[..., index].double(), rtol=tol, atol=tol)
        torch.testing.assert_close(rebuilt.double(), pre[..., index].double(), rtol=tol, atol=tol)
        assert parts.error.abs().max() > 0 and parts.latents.abs().max() > 0  # every term is exercised


def test_direction_decomposition_is_exact_with_unit_scale(tiny_model, corpus):
    site = Site(1, "resid_pre")
    sae = make_sae(16, 30, hook_name=site.hook_name, model_name=tiny_model.cfg.model_name, seed=8)
    vector = torch.randn(16, generator=torch.Generator().manual_seed(9))
    x = _hooks(tiny_model, corpus, [site.hook_name])[site.hook_name]
    parts = decompose(sae, readout(tiny_model, NeuronDirection(site, vector)), x)
    torch.testing.assert_close(parts.total, x @ vector, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(parts.latents.sum(-1) + parts.b_dec + parts.error, x @ vector, rtol=1e-5, atol=1e-5)


def test_top_k_tracker_equals_a_brute_force_scan():
    gen = torch.Generator().manual_seed(10)
    rows = [torch.randn(n, 6, generator=gen) for n in (5, 9, 3, 7)]
    rows[1][2, 0] = rows[0][1, 0]  # a tie: the earlier position must come first
    keeps = [torch.rand(len(r), generator=gen) > 0.2 for r in rows]
    tracker = TopKTracker(4, 6)
    for i, (values, keep) in enumerate(zip(rows, keeps)):
        tracker.update(i, torch.arange(len(values)) + 100 * i, values, keep)
    top = tracker.result()
    for j in range(6):
        entries = [(float(v[p, j]), i, p) for i, (v, keep) in enumerate(zip(rows, keeps)) for p in range(len(v)) if keep[p]]
        best = sorted(entries, key=lambda e: -e[0])[:4]  # sorted() is stable: scan order breaks ties
        assert top.values[:, j].tolist() == [e[0] for e in best]
        assert list(zip(top.rows[:, j].tolist(), top.positions[:, j].tolist())) == [(e[1], e[2]) for e in best]
        assert top.tokens[:, j].tolist() == [100 * e[1] + e[2] for e in best]


def test_inspect_units_contexts_match_a_brute_force_scan(setup, corpus):
    name, model, sae = setup
    acts = _hooks(model, corpus, [f"blocks.{LAYER}.mlp.hook_post", f"blocks.{LAYER}.hook_resid_mid"])
    post, x = acts[f"blocks.{LAYER}.mlp.hook_post"], acts[f"blocks.{LAYER}.hook_resid_mid"]
    config = NeuronConfig(InspectConfig(k_contexts=3, bins=5), k=6)
    reports = inspect_units(model, sae, [Neuron(LAYER, 3), Neuron(LAYER, 11)], corpus, config=config)
    for report in reports:
        column = post[..., report.unit.index].flatten()
        best = torch.sort(column, descending=True, stable=True)
        assert [c.activation for c in report.contexts] == pytest.approx(best.values[:3].tolist(), rel=1e-5, abs=1e-6)
        assert [(c.row, c.position) for c in report.contexts] == [divmod(int(i), corpus.shape[1]) for i in best.indices[:3]]
        # The stored residual at each scored context is the right one: its decomposition equals a fresh one.
        for terms, i in zip(report.terms, best.indices[:6].tolist()):
            r, p = divmod(i, corpus.shape[1])
            fresh = decompose(sae, readout(model, report.unit), x[r, p])
            assert terms.total == pytest.approx(float(fresh.total), rel=1e-4, abs=1e-5)
            assert terms.dominant == int(fresh.latents.argmax())
        assert report.n_tokens == corpus.numel() and float(report.counts.sum()) == corpus.numel()
        shares = sum(s for s in report.variance_terms.values())
        assert shares == pytest.approx(1.0, abs=1e-4)  # latents + b_dec + error explain all the variance
        assert sum(len(m) for _, m in report.groups) <= 6 and "groups" in report.to_text()


def test_scores_on_hand_made_inputs():
    assert token_concentration([4, 4, 4, 4]) == pytest.approx(1.0)
    assert token_concentration([1, 2, 3, 4]) == pytest.approx(0.0)
    assert token_concentration([1, 1, 2, 2]) == pytest.approx(1 - math.log(2) / math.log(4))
    assert token_concentration([3]) is None
    assert group_by_dominant([5, 2, 5, 9, 2, 5]) == [(5, [0, 2, 5]), (2, [1, 4]), (9, [3])]
    assert cluster_concentration([5, 2, 5, 9]) == pytest.approx(0.5)


def test_unit_scores_match_per_unit_scans(tiny_model, corpus):
    site = Site(1, "resid_pre")
    sae = make_sae(16, 30, hook_name=site.hook_name, model_name=tiny_model.cfg.model_name, seed=8)
    scores = unit_scores(tiny_model, sae, 1, corpus, k=4)
    post = _hooks(tiny_model, corpus, ["blocks.1.mlp.hook_post"])["blocks.1.mlp.hook_post"]
    for j in (0, 5, 31):
        column = post[..., j].flatten()
        best = torch.sort(column, descending=True, stable=True).indices[:4]
        expected = token_concentration(corpus.flatten()[best].tolist()) if (column[best] > 0).all() else None
        assert (math.isnan(scores.neurons[j]) if expected is None else scores.neurons[j].item() == pytest.approx(expected))
        assert scores.neuron_max[j].item() == pytest.approx(column.max().item(), rel=1e-5)
    assert scores.latents.shape == (30,) and scores.n_tokens == corpus.numel()
    z = sae.encode(_hooks(tiny_model, corpus, [site.hook_name])[site.hook_name]).detach()
    checked = 0
    for j in range(30):
        column = z[..., j].flatten()
        best = torch.sort(column, descending=True, stable=True).indices[:4]
        expected = token_concentration(corpus.flatten()[best].tolist()) if (column[best] > 0).all() else None
        assert (math.isnan(scores.latents[j]) if expected is None else scores.latents[j].item() == pytest.approx(expected))
        assert scores.latent_max[j].item() == pytest.approx(column.max().item(), rel=1e-5, abs=1e-6)
        checked += expected is not None
    assert checked > 0  # some latents fire at four contexts: their scores are numbers, not NaN


@pytest.mark.parametrize("units, message", [
    ([Neuron(LAYER, 32)], "out of range"),
    ([Neuron(5, 0)], "out of range"),
    ([NeuronDirection(Site(1, "resid_mid"), torch.ones(15))], "expected d_model=16"),
    ([], "at least one unit"),
])
def test_bad_units_raise_before_any_forward(setup, corpus, units, message):
    _, model, sae = setup
    before, counter = snapshot(model), CountingHook(model)
    try:
        with pytest.raises((PatchingError, SiteError), match=message):
            inspect_units(model, sae, units, corpus)
    finally:
        counter.remove()
    assert counter.count == 0 and snapshot(model) == before


def test_wrong_sae_site_and_bad_values_raise_before_any_forward(tiny_model, corpus):
    sae = make_sae(16, 30, hook_name="blocks.1.hook_resid_pre", model_name=tiny_model.cfg.model_name)
    counter = CountingHook(tiny_model)
    try:
        with pytest.raises(PatchingError, match="resid_mid"):
            inspect_units(tiny_model, sae, [Neuron(1, 0)], corpus)
        with pytest.raises(PatchingError, match="non-negative"):
            unchecked(Neuron)(1, -1)
        with pytest.raises(PatchingError, match="finite"):
            NeuronDirection(Site(1, "resid_pre"), torch.tensor([float("nan")] * 16))
        with pytest.raises(PatchingError, match="residual Site"):
            NeuronDirection(Site(1, "mlp_post"), torch.ones(16))
        with pytest.raises(PatchingError, match="Neuron or NeuronDirection"):
            unchecked(check_units)(tiny_model, [3])
        with pytest.raises(PatchingError, match=r"NeuronConfig.k \(4\)"):
            NeuronConfig(InspectConfig(k_contexts=8), k=4)
    finally:
        counter.remove()
    assert counter.count == 0


def test_a_failure_mid_pass_leaves_the_model_as_it_was(setup, corpus):
    _, model, sae = setup
    before = snapshot(model)

    class Faulty(torch.nn.Module):
        """Delegates to the SAE but fails on its second encode, mid-corpus."""

        def __init__(self):
            super().__init__()
            self.inner, self.calls = sae, 0
            self.cfg, self.W_dec, self.b_dec, self.d_in, self.d_sae = sae.cfg, sae.W_dec, sae.b_dec, sae.d_in, sae.d_sae

        def encode(self, x):
            self.calls += 1
            if self.calls == 2:
                raise RuntimeError("injected")
            return self.inner.encode(x)

        def decode(self, z):
            return self.inner.decode(z)

    with pytest.raises(RuntimeError, match="injected"):
        inspect_units(model, Faulty(), [Neuron(LAYER, 1)], corpus, config=NeuronConfig(InspectConfig(batch_size=1)), site=Site(LAYER, "resid_mid"))
    assert snapshot(model) == before


def test_neuron_restoration_of_every_element_equals_patching_the_mlp_output(tiny_model):
    from patching.attribution.restoration import raw_restoration
    from patching.sweep.objectives import LogitDiff
    from patching.sweep.patch import patch_residual
    from patching.sweep.units import PatchUnit, UnitPart

    clean = torch.tensor([[1, 8, 9, 3, 4, 5, 6, 7]])
    corrupted = clean.clone()
    corrupted[0, 2] = 30
    metric = LogitDiff(3, 4)
    n_all = tiny_model.cfg.d_mlp * (clean.shape[1] - 2)
    curve = raw_restoration(tiny_model, Site(1, "mlp_post"), clean, corrupted, metric, (1, 5, n_all), start=2)
    assert curve.n_elements == n_all
    whole = patch_residual(tiny_model, clean, corrupted, metric, progress=False,
                           units=[PatchUnit((UnitPart(Site(1, "mlp_out"), "raw", tuple(range(2, 8))),))])
    # mlp_out is W_out applied to mlp_post: patching every neuron at those positions is patching mlp_out there.
    assert curve.fraction[-1].item() == pytest.approx(whole.effect[0, 0].item(), abs=1e-4)
    assert curve.fraction[0].item() != pytest.approx(curve.fraction[-1].item(), abs=1e-6)


@pytest.mark.default_model
def test_decomposition_is_exact_on_the_default_model(default_model_4l):
    model = default_model_4l
    sae = make_sae(576, 128, hook_name="blocks.2.hook_resid_mid", model_name=model.cfg.model_name, seed=11)
    assert model.cfg.normalization_type == "RMS" and model.cfg.gated_mlp
    tokens = model.to_tokens("The Eiffel Tower is located in the city of")
    acts = _hooks(model, tokens, ["blocks.2.hook_resid_mid", "blocks.2.mlp.hook_pre"])
    for index in (0, 100, 1535):
        parts = decompose(sae, readout(model, Neuron(2, index)), acts["blocks.2.hook_resid_mid"].double())
        rebuilt = parts.latents.sum(-1) + parts.b_dec + parts.error + parts.constant
        torch.testing.assert_close(rebuilt, acts["blocks.2.mlp.hook_pre"][..., index].double(), rtol=1e-4, atol=1e-4)


def test_latents_with_the_error_node_restore_everything_at_the_largest_count(tiny_model):
    from patching.attribution.restoration import latent_restoration
    from patching.sweep.objectives import LogitDiff

    site = Site(1, "resid_pre")
    sae = make_sae(16, 30, hook_name=site.hook_name, model_name=tiny_model.cfg.model_name, seed=8)
    clean = torch.tensor([[1, 8, 9, 3, 4, 5, 6, 7]])
    corrupted = clean.clone()
    corrupted[0, 2] = 30
    plain = latent_restoration(tiny_model, sae, clean, corrupted, LogitDiff(3, 4), (1, 10_000), 0, site=site)
    both = latent_restoration(tiny_model, sae, clean, corrupted, LogitDiff(3, 4), (1, 10_000), 0, with_error=True, site=site)
    assert both.fraction[-1].item() == pytest.approx(1.0, abs=1e-4) and plain.full == pytest.approx(1.0, abs=1e-4)
    assert plain.fraction[-1].item() != pytest.approx(1.0, abs=1e-3)  # without the error node, latents fall short


@pytest.mark.parametrize("cls,old,new,value", [(NeuronConfig, "n_top", "k", 12), (InspectConfig, "batch_rows", "batch_size", 3)])
def test_renamed_config_fields_keep_working_for_one_release(cls, old, new, value):
    """`n_top` → `k`, `batch_rows` → `batch_size` (issue 25: one name per concept): the old keyword and
    the old attribute warn and mean the new field; `dataclasses.replace` with the new name stays silent."""
    import dataclasses
    import warnings

    with pytest.warns(DeprecationWarning, match=rf"{cls.__name__}\({old}=\.\.\.\) is deprecated.*use {new}="):
        config = cls(**{old: value})
    assert config == cls(**{new: value}) and getattr(config, new) == value
    assert old not in {f.name for f in dataclasses.fields(cls)} and old not in dataclasses.asdict(config)
    with warnings.catch_warnings():
        warnings.simplefilter("error", DeprecationWarning)
        replaced = dataclasses.replace(config, **{new: value + 1})
        assert getattr(replaced, new) == value + 1 and replaced == cls(**{new: value + 1})
    with pytest.warns(DeprecationWarning, match=rf"{cls.__name__}\.{old} is deprecated"):
        assert getattr(replaced, old) == value + 1
    with pytest.warns(DeprecationWarning, match=old):
        assert getattr(dataclasses.replace(config, **{old: value + 2}), new) == value + 2
    with pytest.warns(DeprecationWarning, match=old), pytest.raises(PatchingError, match=rf"{cls.__name__}\.{new} must be"):
        cls(**{old: 0})


def test_old_config_keywords_of_the_inspect_functions_give_the_same_reports(tiny_model, corpus):
    """`inspect_units(..., n_top=)` and `inspect_latents(..., batch_rows=)` (overrides under the old
    names) warn and equal the new names' reports."""
    from patching.inspect.latents import inspect_latents

    sae = make_sae(tiny_model.cfg.d_model, 24, hook_name=f"blocks.{LAYER}.hook_resid_mid",
                   model_name=tiny_model.cfg.model_name, seed=3)
    units = [Neuron(LAYER, 2)]
    new = inspect_units(tiny_model, sae, units, corpus, k=9)
    with pytest.warns(DeprecationWarning, match="n_top"):
        old = inspect_units(tiny_model, sae, units, corpus, n_top=9)
    assert len(new[0].terms) == len(old[0].terms) == 9 and new[0].contexts == old[0].contexts
    latents = inspect_latents(tiny_model, sae, [1, 5], corpus, batch_size=2)
    with pytest.warns(DeprecationWarning, match="batch_rows"):
        again = inspect_latents(tiny_model, sae, [1, 5], corpus, batch_rows=2)
    for a, b in zip(latents, again):
        assert torch.equal(a.counts, b.counts) and a.contexts == b.contexts
