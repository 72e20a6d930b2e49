"""Attribution patching: exact on linear toys, IG completeness, gradient nodes, hook hygiene."""

from __future__ import annotations

import pytest
import torch

from patching import LogitDiff, PatchResult, PatchUnit, Site, UnitPart, patch_latents
from patching.attribution.estimators import attribute_latents
from patching.attribution.verify import spearman, verify
from patching.errors import PatchingError
from patching.model import tl_compat
from tests.conftest import make_sae, unchecked
from tests.hooks_snapshot import CountingHook, snapshot

MID, POST = Site(0, "resid_mid"), Site(0, "resid_post")


@pytest.fixture(scope="module")
def linear_model():
    """One layer, no norms, MLP input weights zero: resid_mid -> logits is affine."""
    model = tl_compat.random_model(n_layers=1, normalization_type=None, d_vocab=30)
    with torch.no_grad():
        model.blocks[0].mlp.W_in.zero_()
    model.eval()
    return model


@pytest.fixture(scope="module")
def linear_saes(linear_model):
    return {MID: make_sae(16, 32, hook_name=None, model_name=None, seed=4),
            POST: make_sae(16, 32, hook_name=None, model_name=None, seed=5)}


@pytest.fixture(scope="module")
def pair():
    clean = torch.tensor([[1, 7, 3, 9, 4, 2, 8]])
    corrupted = clean.clone()
    corrupted[0, 2] = 11
    return clean, corrupted


METRIC = LogitDiff(answer=3, wrong=4)


@pytest.mark.parametrize("direction", ["denoise", "noise"])
def test_atp_is_exact_when_the_metric_is_linear_in_the_latents(linear_model, linear_saes, pair, direction):
    clean, corrupted = pair
    estimate = attribute_latents(linear_model, linear_saes, clean, corrupted, METRIC, direction=direction, progress=False)
    exact = patch_latents(linear_model, linear_saes, clean, corrupted, METRIC, direction=direction,
                          units=estimate.units, progress=False)
    assert any(u.kind == "error" for u in estimate.units) and any(u.site == MID for u in estimate.units)
    torch.testing.assert_close(estimate.effect, exact.effect, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(estimate.metric, exact.metric, atol=1e-4, rtol=1e-4)


def test_site_totals_sum_to_patching_the_whole_site(linear_model, linear_saes, pair):
    clean, corrupted = pair
    estimate = attribute_latents(linear_model, linear_saes, clean, corrupted, METRIC, progress=False)
    everything = [PatchUnit((UnitPart(site, "latent", None, None), UnitPart(site, "error", None))) for site in (MID, POST)]
    exact = patch_latents(linear_model, linear_saes, clean, corrupted, METRIC, units=everything, progress=False)
    for j, site in enumerate((MID, POST)):
        total = sum(estimate.effect[0, i] for i, u in enumerate(estimate.units) if u.site == site)
        assert total.item() == pytest.approx(exact.effect[0, j].item(), abs=1e-4)
        assert exact.effect[0, j].item() == pytest.approx(1.0, abs=1e-4)  # each site carries everything
    errors = [estimate.effect[0, i].item() for i, u in enumerate(estimate.units) if u.kind == "error"]
    assert max(map(abs, errors)) > 1e-3  # gradients reach the error nodes


@pytest.fixture(scope="module")
def tiny():
    model = tl_compat.random_model(n_layers=3)
    model.eval()
    sae = make_sae(16, 40, hook_name="blocks.1.hook_resid_pre", model_name=model.cfg.model_name, seed=3)
    g = torch.Generator().manual_seed(7)
    clean = torch.randint(0, 50, (2, 9), generator=g)
    corrupted = clean.clone()
    corrupted[:, 3] = (corrupted[:, 3] + 11) % 50
    return model, sae, clean, corrupted, LogitDiff(answer=[3, 5], wrong=[4, 6])


def test_integrated_gradients_converge_to_the_exact_path_effect(tiny):
    model, sae, clean, corrupted, metric = tiny
    site = Site(1)
    everything = PatchUnit((UnitPart(site, "latent", None, None), UnitPart(site, "error", None)))
    exact = patch_latents(model, sae, clean, corrupted, metric, units=[everything], progress=False).effect[:, 0]
    errors = []
    for steps in (1, 4, 32):
        ig = attribute_latents(model, sae, clean, corrupted, metric, method="ig", steps=steps, progress=False)
        errors.append((ig.effect.sum(1) - exact).abs().max().item())
    assert errors[2] < 2e-3 and errors[2] < errors[0]  # completeness: the attributions sum to the path's effect


def test_graddrop_is_unsigned_and_equals_abs_atp_without_downstream_paths(linear_model, linear_saes, pair):
    clean, corrupted = pair
    saes = {MID: linear_saes[MID]}
    atp = attribute_latents(linear_model, saes, clean, corrupted, METRIC, progress=False)
    gd = attribute_latents(linear_model, saes, clean, corrupted, METRIC, method="atp_gd", progress=False)
    # Block 0's only write after resid_mid is the constant MLP: dropping it changes nothing.
    torch.testing.assert_close(gd.effect, atp.effect.abs(), atol=1e-5, rtol=1e-5)


def test_graddrop_equals_a_naive_mean_of_absolute_dropped_estimates(tiny):
    """AtP* GradDrop by hand on a model with downstream blocks: for each block from the SAE's on,
    that block's attention and MLP writes detached by plain hooks, AtP from the splice's latent and
    error gradients; the mean of the absolute values over the blocks, over the pair's span."""
    from patching import splice

    model, sae, clean, corrupted, metric = tiny
    site = Site(1)
    gd = attribute_latents(model, sae, clean, corrupted, metric, method="atp_gd", progress=False)
    assert any(u.kind == "error" for u in gd.units) and any(u.kind == "latent" for u in gd.units)
    detach = lambda x, hook: x.detach()  # noqa: E731
    for i in range(2):
        pair = torch.tensor([i])
        with torch.inference_mode():
            span = (metric(model(clean[i:i + 1])[:, -1], pair) - metric(model(corrupted[i:i + 1])[:, -1], pair)).item()
            with splice(model, sae, cache=True) as state:
                model(clean[i:i + 1])
        z_clean, e_clean = state.records[site].latents[0], state.records[site].error[0]
        latent_scores, error_scores = [], []
        for layer in (1, 2):
            hooks = [(f"blocks.{layer}.hook_attn_out", detach), (f"blocks.{layer}.hook_mlp_out", detach)]
            with splice(model, sae, cache=True, track_grads=True) as state, model.hooks(fwd_hooks=hooks):
                metric(model(corrupted[i:i + 1])[:, -1], pair).sum().backward()
            record = state.records[site]
            latent_scores.append(((z_clean - record.latents[0].detach()) * record.latents_grad[0]).abs())
            error_scores.append(((e_clean - record.error[0].detach()) * record.error_grad[0]).sum(-1).abs())
        model.zero_grad(set_to_none=True)
        latent_gd, error_gd = torch.stack(latent_scores).mean(0), torch.stack(error_scores).mean(0)
        for j, unit in enumerate(gd.units):
            part = unit.parts[0]
            p = part.positions[0]
            expected = (latent_gd[p, part.latents[0]] if part.kind == "latent" else error_gd[p]) / abs(span)
            assert gd.effect[i, j].item() == pytest.approx(expected.item(), abs=1e-5, rel=1e-4), unit.label()
    atp = attribute_latents(model, sae, clean, corrupted, metric, progress=False)
    assert (gd.effect - atp.effect.abs()).abs().max() > 1e-3  # dropping the blocks matters here


def test_flags_and_hooks_restored_after_call_and_exception(tiny):
    model, sae, clean, corrupted, metric = tiny
    model.blocks[0].attn.W_Q.requires_grad_(False)  # a user's own freezing must survive
    before = snapshot(model)
    attribute_latents(model, sae, clean, corrupted, metric, progress=False)
    assert snapshot(model) == before
    calls = {"n": 0}

    def failing(logits, pair):
        calls["n"] += 1
        if calls["n"] > 4:
            raise RuntimeError("metric failed in the backward-pass run")
        return logits[torch.arange(logits.shape[0]), 3]

    from patching.sweep.objectives import CallableMetric

    with pytest.raises(RuntimeError, match="metric failed"):
        attribute_latents(model, sae, clean, corrupted, CallableMetric(failing, readout=-1), progress=False)
    assert snapshot(model) == before
    model.blocks[0].attn.W_Q.requires_grad_(True)


@pytest.mark.parametrize("kwargs,pattern", [
    (dict(method="shap"), "method must be one of"),
    (dict(steps=0), "steps must be a positive int"),
    (dict(metric=lambda logits: logits[:, -1, 0]), "reads one position"),
])
def test_bad_input_is_refused_before_any_forward(tiny, kwargs, pattern):
    model, sae, clean, corrupted, metric = tiny
    counter = CountingHook(model)
    try:
        with pytest.raises(PatchingError, match=pattern):
            unchecked(attribute_latents)(model, sae, clean, corrupted, kwargs.pop("metric", metric), **kwargs)
        assert counter.count == 0
    finally:
        counter.remove()


def test_verify_reports_agreement_and_survives_save_load(tiny, tmp_path):
    model, sae, clean, corrupted, metric = tiny
    estimate = attribute_latents(model, sae, clean, corrupted, metric, progress=False)
    check = verify(estimate, k=10, random_k=10)
    assert check.n_checked == 20
    direct = patch_latents(model, sae, clean, corrupted, metric, units=check.exact.units, progress=False)
    torch.testing.assert_close(check.exact.effect, direct.effect)
    # The agreement figures, recomputed by hand from the checked units' two effect vectors.
    estimated, exact = check.estimate, direct.mean_effect
    assert check.spearman == pytest.approx(_pearson(_ranks(estimated), _ranks(exact)), abs=1e-6)
    k = check.k
    top_exact = set(torch.argsort(exact.abs(), descending=True)[:k].tolist())
    top_estimated = set(torch.argsort(estimated.abs(), descending=True)[:k].tolist())
    assert check.recall_at_k == pytest.approx(len(top_exact & top_estimated) / k)
    loaded = PatchResult.load(estimate.save(tmp_path / "atp"))
    assert loaded.method == "atp" and torch.equal(loaded.effect, estimate.effect)
    with pytest.raises(PatchingError, match="carries no inputs"):
        verify(loaded)
    again = verify(loaded, k=10, random_k=10, context=estimate.context)
    assert again.spearman == check.spearman


def _ranks(values: torch.Tensor) -> torch.Tensor:
    """Average ranks (ties share the mean of their positions), by a plain loop."""
    items = values.tolist()
    return torch.tensor([sum(1.0 for w in items if w < v) + (sum(1.0 for w in items if w == v) + 1) / 2 for v in items])


def _pearson(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double() - a.double().mean(), b.double() - b.double().mean()
    return float((a * b).sum() / (a.norm() * b.norm()))


def test_spearman_closed_form():
    assert spearman(torch.tensor([1.0, 2.0, 3.0]), torch.tensor([10.0, 20.0, 30.0])) == pytest.approx(1.0)
    assert spearman(torch.tensor([1.0, 2.0, 3.0]), torch.tensor([3.0, 2.0, 1.0])) == pytest.approx(-1.0)
    # Ties get average ranks: ranks (1.5, 1.5, 3) against (1, 2, 3).
    assert spearman(torch.tensor([5.0, 5.0, 9.0]), torch.tensor([1.0, 2.0, 3.0])) == pytest.approx(0.8660254, abs=1e-6)
