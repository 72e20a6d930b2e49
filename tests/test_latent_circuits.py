"""Faithfulness of latent circuits (Marks et al. 2024): the whole set of nodes is faithful and its
complement empty; one kept latent equals a run written plainly with TransformerLens hooks (every other
latent and error node of both sites set to its corrupted value, the kept one recomputed live)."""

from __future__ import annotations

import pytest
import torch

from conftest import make_sae
from hooks_snapshot import assert_refused_before_any_forward
from patching.errors import PatchingError
from patching.model.sites import Site
from patching.paths.latent_circuits import latent_faithfulness
from patching.paths.latents import LatentNode
from patching.sweep import LogitDiff
from tests.conftest import learned_or_rotary_gqa

METRIC = LogitDiff(answer=3, wrong=4)
SITES = (Site(0, "resid_post"), Site(2, "resid_pre"))


@pytest.fixture(scope="module", params=["learned", "rotary_gqa"])
def model(request):
    return learned_or_rotary_gqa(request.param)


@pytest.fixture(scope="module")
def setup(model):
    g = torch.Generator().manual_seed(7)
    clean = torch.randint(0, 50, (2, 6), generator=g)
    corrupted = clean.clone()
    corrupted[:, 1] = (corrupted[:, 1] + 11) % 50
    saes = {site: make_sae(model.cfg.d_model, 12, hook_name=site.hook_name, model_name=model.cfg.model_name, seed=s)
            for s, site in enumerate(SITES)}
    return clean, corrupted, saes


def everything(saes, n_pos):
    return ({LatentNode(site, latent) for site, sae in saes.items() for latent in range(sae.d_sae)}
            | {LatentNode(site) for site in saes})


def test_whole_circuit_is_faithful_and_its_complement_empty(model, setup):
    clean, corrupted, saes = setup
    f = latent_faithfulness(model, saes, clean, corrupted, METRIC, everything(saes, 6))
    torch.testing.assert_close(f.faithfulness, torch.ones(2))
    torch.testing.assert_close(f.completeness, torch.zeros(2))
    torch.testing.assert_close(f.metric_empty, f.metric_corrupted, atol=1e-4, rtol=0)  # resample: all ablated = corrupted
    empty = latent_faithfulness(model, saes, clean, corrupted, METRIC, set())
    torch.testing.assert_close(empty.faithfulness, torch.zeros(2))
    torch.testing.assert_close(empty.completeness, torch.ones(2))


def naive(model, saes, clean, corrupted, kept):
    """Every node of both sites at its corrupted value except the `kept` (site, latent, pos or None), live."""
    _, cache = model.run_with_cache(corrupted)

    def hook_for(site):
        sae = saes[site]

        def hook(x, hook):
            z, z_corr = sae.encode(x), sae.encode(cache[site.hook_name])
            e_corr = cache[site.hook_name] - sae.decode(z_corr)
            z_new, e_new = z_corr.clone(), e_corr.clone()
            for kept_site, latent, pos in kept:
                if kept_site == site:
                    where = slice(None) if pos is None else pos
                    if latent is None:
                        e_new[0, where] = (x - sae.decode(z))[0, where]
                    else:
                        z_new[0, where, latent] = z[0, where, latent]
            return sae.decode(z_new) + e_new
        return hook

    with torch.no_grad(), model.hooks(fwd_hooks=[(site.hook_name, hook_for(site)) for site in saes]):
        logits = model(clean)
    return float(logits[0, -1, 3] - logits[0, -1, 4])


def moving_latent(model, saes, site, clean, corrupted):
    """The latent at `site` that moves most between the runs."""
    _, c_clean = model.run_with_cache(clean)
    _, c_corr = model.run_with_cache(corrupted)
    moves = (saes[site].encode(c_clean[site.hook_name]) - saes[site].encode(c_corr[site.hook_name])).abs().sum((0, 1))
    return int(moves.argmax())


@pytest.mark.parametrize("second_pos", [None, 4, "error"])
def test_kept_latents_equal_plain_hooks(model, setup, second_pos):
    """A latent kept at the first site, and one latent (at every position or one) or the error node
    at the second, whose live values are computed from the partly ablated stream."""
    clean, corrupted, saes = setup
    kept = [(SITES[0], moving_latent(model, saes, SITES[0], clean, corrupted), None)]
    if second_pos == "error":
        kept.append((SITES[1], None, None))
    else:
        kept.append((SITES[1], moving_latent(model, saes, SITES[1], clean, corrupted), second_pos))
    f = latent_faithfulness(model, saes, clean, corrupted, METRIC, {LatentNode(*k) for k in kept})
    moved = 0.0
    for p in range(2):
        expected = naive(model, saes, clean[p:p + 1], corrupted[p:p + 1], kept)
        assert float(f.metric_circuit[p]) == pytest.approx(expected, abs=1e-5)
        moved = max(moved, abs(expected - float(f.metric_empty[p])))
    assert moved > 1e-4  # the kept latents change the metric: the comparison can fail


@pytest.mark.parametrize("circuit, kwargs, pattern", [
    ({LatentNode(Site(1, "resid_pre"), 0)}, {}, "not a LatentNode at one of the sites"),
    ({LatentNode(SITES[0], 99)}, {}, "latent out of range"),
    ({LatentNode(SITES[0], 1, 9)}, {}, "position out of range"),
    (set(), dict(ablation="position_mean"), "ablation must be one of"),
])
def test_bad_input_refused_before_any_forward(model, setup, circuit, kwargs, pattern):
    clean, corrupted, saes = setup
    assert_refused_before_any_forward(
        model, lambda: latent_faithfulness(model, saes, clean, corrupted, METRIC, circuit, **kwargs), PatchingError, pattern)


@pytest.fixture(scope="module")
def planted():
    """An affine model (no norms, zero queries, attention only) with two always-active SAEs whose
    decoder rows are scaled down a thousandfold except latents 3 and 7 at the first site and 2 at the
    second: only those latents, and the error nodes that carry what the small rows leave out, move the
    metric more than noise."""

    from tests.conftest import affine_attention_model

    model = affine_attention_model(3)
    saes = {}
    for seed, (site, keep) in enumerate(zip(SITES, ({3, 7}, {2}))):
        sae = make_sae(model.cfg.d_model, 12, hook_name=site.hook_name, model_name=model.cfg.model_name, seed=seed)
        with torch.no_grad():
            sae.b_enc.add_(50.0)
            scale = torch.full((12, 1), 1e-3)
            scale[list(keep)] = 3.0
            sae.W_dec.mul_(scale)
        saes[site] = sae
    truth = {LatentNode(SITES[0], 3), LatentNode(SITES[0], 7), LatentNode(SITES[1], 2), LatentNode(SITES[0]),
             LatentNode(SITES[1])}
    return model, saes, truth


def test_planted_latent_circuit_recovered(planted, setup):
    from patching.paths.latents import attribute_latent_edges

    model, saes, truth = planted
    clean, corrupted, _ = setup
    graph = attribute_latent_edges(model, saes, clean, corrupted, METRIC, k=None, direction="noise", progress=False)
    found = graph.circuit(0.02)
    assert found == truth  # recall 1 at the threshold, and nothing else clears it
    assert graph.circuit(0.0) == set(graph.nodes) and len(graph.nodes) == 26
    f = latent_faithfulness(model, saes, clean, corrupted, METRIC, found)
    assert f.faithfulness.min() > 0.99 and f.completeness.abs().max() < 0.01
    strongest = graph.top_edges(1)[0]
    assert {strongest[0], strongest[1]} <= {n.label() for n in truth}
