"""Latent patching sweeps against a naive hook-by-hook reference, and their invariants."""

from __future__ import annotations

import math

import pytest
import torch

from patching.splice.splicer import SpliceChecks
from patching import LatentEdit, Site, splice
from patching.errors import PatchingError, SiteError, SpliceError
from patching.splice.edits import ErrorPatch
from patching.sweep.objectives import CallableMetric, KLFromClean, LogitDiff, TokenLogProb, TokenProb
from patching.sweep.patch import patch_latents, patch_residual
from patching.sweep.results import METRIC_TOLERANCE, PatchResult
from patching.sweep.units import PatchUnit, UnitPart
from tests.conftest import make_sae, unchecked
from tests.hooks_snapshot import assert_refused_before_any_forward, snapshot

SITE = Site(1)


@pytest.fixture(scope="module")
def model(tiny_model):
    return tiny_model  # conftest's tiny random model, under the name these tests use


@pytest.fixture(scope="module")
def sae(model):
    return make_sae(16, 40, hook_name=SITE.hook_name, model_name=model.cfg.model_name, seed=3)


@pytest.fixture(scope="module")
def prompts():
    g = torch.Generator().manual_seed(7)
    clean = torch.randint(0, 50, (2, 9), generator=g)
    corrupted = clean.clone()
    corrupted[:, 3] = (corrupted[:, 3] + 11) % 50
    corrupted[1, 6] = (corrupted[1, 6] + 5) % 50
    return clean, corrupted


METRIC = LogitDiff(answer=[3, 5], wrong=[4, 6])


def naive_metric(model, saes, tokens, edits, i, metric=METRIC):
    """One full forward per patch, edits through the splice: the reference."""
    with torch.inference_mode(), splice(model, saes, edits=edits):
        logits = model(tokens[i : i + 1])
    return metric(logits[:, metric.readout], torch.tensor([i]))[0].item()


def naive_latents(model, saes, tokens, i):
    with torch.inference_mode(), splice(model, saes, cache=True) as state:
        model(tokens[i : i + 1])
    return {site: (r.latents[0], r.error[0]) for site, r in state.records.items()}


def naive_unit_value(model, saes, base, source, unit, i, metric=METRIC):
    src = naive_latents(model, saes, source, i)
    edits = []
    for part in unit.parts:
        z_src, e_src = src[part.site]
        positions = list(part.positions) if part.positions is not None else list(range(base.shape[1]))
        for p in positions:
            if part.kind == "error":
                edits.append(ErrorPatch(part.site, torch.tensor([0]), torch.tensor([p]), e_src[p][None]))
            else:
                lat = part.latents if part.latents is not None else tuple(range(z_src.shape[1]))
                edits.append(LatentEdit(part.site, lat, z_src[p, list(lat)], positions=p))
    return naive_metric(model, saes, base, edits, i, metric)


@pytest.mark.parametrize("direction", ["denoise", "noise"])
@pytest.mark.parametrize("unit", ["latent_position", "latent", "position", "error"])
def test_sweep_matches_naive_reference(model, sae, prompts, direction, unit):
    clean, corrupted = prompts
    result = patch_latents(model, sae, clean, corrupted, METRIC, direction=direction, units=unit, progress=False)
    base, source = (corrupted, clean) if direction == "denoise" else (clean, corrupted)
    assert len(result.units) > 0
    for j in range(0, len(result.units), max(1, len(result.units) // 12)):
        for i in range(2):
            expected = naive_unit_value(model, sae, base, source, result.units[j], i)
            assert result.metric[i, j].item() == pytest.approx(expected, abs=1e-4)
    m_base = [naive_metric(model, sae, base, [], i) for i in range(2)]
    m_src = [naive_metric(model, sae, source, [], i) for i in range(2)]
    m_clean, m_corr = (m_src, m_base) if direction == "denoise" else (m_base, m_src)
    torch.testing.assert_close(result.metric_clean, torch.tensor(m_clean), atol=1e-5, rtol=0)
    torch.testing.assert_close(result.metric_corrupted, torch.tensor(m_corr), atol=1e-5, rtol=0)
    span = torch.tensor(m_clean) - torch.tensor(m_corr)
    expected_effect = ((result.metric - torch.tensor(m_corr)[:, None]) if direction == "denoise"
                       else (torch.tensor(m_clean)[:, None] - result.metric)) / span[:, None]
    torch.testing.assert_close(result.effect, expected_effect, atol=1e-5, rtol=1e-5)


def test_only_differing_latents_are_units(model, sae, prompts):
    clean, corrupted = prompts
    result = patch_latents(model, sae, clean, corrupted, METRIC, progress=False)
    z_clean = [naive_latents(model, sae, clean, i)[SITE][0] for i in range(2)]
    z_corr = [naive_latents(model, sae, corrupted, i)[SITE][0] for i in range(2)]
    differ = (z_clean[0] != z_corr[0]) | (z_clean[1] != z_corr[1])
    assert {(u.position, u.latent) for u in result.units} == {tuple(x) for x in torch.nonzero(differ).tolist()}
    assert all(u.position >= 3 for u in result.units)  # causal: nothing differs before the corruption


@pytest.mark.parametrize("direction", ["denoise", "noise"])
def test_everything_with_error_node_gives_effect_one(model, sae, prompts, direction):
    clean, corrupted = prompts
    everything = PatchUnit((UnitPart(SITE, "latent", None, None), UnitPart(SITE, "error", None)))
    latents_only = PatchUnit((UnitPart(SITE, "latent", None, None),))
    result = patch_latents(model, sae, clean, corrupted, METRIC, direction=direction, units=[everything, latents_only],
                           progress=False)
    torch.testing.assert_close(result.effect[:, 0], torch.ones(2), atol=1e-4, rtol=0)
    assert not torch.allclose(result.effect[:, 1], torch.ones(2), atol=1e-3)  # the error node matters


def test_patching_own_value_gives_zero(model, sae, prompts):
    clean, corrupted = prompts
    # Before the first corrupted token every latent is equal in both runs: nothing to patch.
    unit = PatchUnit((UnitPart(SITE, "latent", (0, 1, 2), None),))
    result = patch_latents(model, sae, clean, corrupted, METRIC, units=[unit], progress=False)
    assert torch.equal(result.effect, torch.zeros(2, 1))
    assert result.provenance["patched_rows_evaluated"] == 0


def test_joint_sets_and_several_sites(model, prompts):
    clean, corrupted = prompts
    saes = {Site(0, "resid_post"): make_sae(16, 24, hook_name=None, model_name=None, seed=1),
            Site(2): make_sae(16, 24, hook_name=None, model_name=None, seed=2)}
    sets = [{Site(0, "resid_post"): [1, 2, 3]}, {Site(2): [0, 5]}, {Site(0, "resid_post"): [4], Site(2): [7, 8]}]
    result = patch_latents(model, saes, clean, corrupted, METRIC, units="joint", latent_sets=sets, progress=False)
    for j, unit in enumerate(result.units):
        for i in range(2):
            assert result.metric[i, j].item() == pytest.approx(naive_unit_value(model, saes, corrupted, clean, unit, i), abs=1e-4)
    per_site = patch_latents(model, saes, clean, corrupted, METRIC, units="latent", progress=False)
    assert {u.site for u in per_site.units} == set(saes)


def test_batch_size_does_not_change_results(model, sae, prompts):
    # R13 as stated in results.py: raw metric values within METRIC_TOLERANCE, effects within
    # METRIC_TOLERANCE / |span| per pair.
    clean, corrupted = prompts
    results = [patch_latents(model, sae, clean, corrupted, METRIC, batch_size=b, progress=False) for b in (1, 7, None)]
    for other in results[1:]:
        torch.testing.assert_close(other.metric, results[0].metric, atol=METRIC_TOLERANCE, rtol=0)
        assert ((other.effect - results[0].effect).abs() <= results[0].effect_tolerance[:, None]).all()
    assert results[0].provenance["small_span_pairs"] == []


def test_pairs_with_a_small_span_are_flagged(model, sae, prompts, caplog):
    clean, corrupted = prompts
    tiny = CallableMetric(lambda logits: 1e-4 * (logits[:, 3] - logits[:, 5]), readout=-1)
    with caplog.at_level("WARNING", logger="patching.sweep.patch"):
        result = patch_latents(model, sae, clean, corrupted, tiny, units="position", progress=False)
    spans = (result.metric_clean - result.metric_corrupted).abs()
    assert (spans < 1e-2).all() and (spans > 0).all()
    assert result.small_span_pairs == [0, 1] and result.provenance["small_span_pairs"] == [0, 1]
    torch.testing.assert_close(result.effect_tolerance, METRIC_TOLERANCE / spans.double())
    assert "pairs [0, 1] have clean-corrupted spans" in caplog.text


def test_residual_patching_equals_transformer_lens(model, prompts):
    from transformer_lens import patching as tl_patching

    clean, corrupted = prompts
    metric = LogitDiff(answer=3, wrong=4)
    ours = patch_residual(model, clean[:1], corrupted[:1], metric, progress=False)
    _, clean_cache = model.run_with_cache(clean[:1])
    reference = tl_patching.get_act_patch_resid_pre(
        model, corrupted[:1], clean_cache, lambda logits: (logits[0, -1, 3] - logits[0, -1, 4]))
    torch.testing.assert_close(ours.metric[0].reshape(3, 9), reference, atol=1e-5, rtol=0)


def test_alignment_on_end_and_explicit_map(model, sae):
    clean = torch.tensor([[1, 2, 3, 4, 5, 6, 7]])
    corrupted = torch.tensor([[9, 2, 3, 8, 5, 6, 7, 10, 11]])
    with pytest.raises(PatchingError, match="different token lengths"):
        patch_latents(model, sae, clean, corrupted, LogitDiff(3, 4), progress=False)
    result = patch_latents(model, sae, clean, corrupted, LogitDiff(3, 4), align="end", units="position", progress=False)
    assert min(u.position for u in result.units) >= 2  # base (corrupted) positions 0, 1 have no clean partner
    mapped = patch_latents(model, sae, clean, corrupted, LogitDiff(3, 4), align={8: 6, 7: 5}, units="position",
                           progress=False)
    assert {u.position for u in mapped.units} <= {7, 8}


def test_metric_definitions_on_hand_made_logits():
    """Closed forms (R14): TokenProb is defined as TokenLogProb's exp, so comparing the two
    checks neither; these numbers do."""
    logits = torch.tensor([[math.log(1.0), math.log(3.0), 0.0 - 50.0], [0.0, 0.0, 0.0]])
    pair = torch.tensor([0, 1])
    torch.testing.assert_close(TokenProb(1)(logits, pair), torch.tensor([0.75, 1 / 3]), atol=1e-6, rtol=0)
    torch.testing.assert_close(TokenLogProb([0, 2])(logits, pair), torch.tensor([math.log(0.25), math.log(1 / 3)]),
                               atol=1e-5, rtol=0)
    clean = torch.tensor([[0.0, 0.0, -1e4], [math.log(1.0), math.log(3.0), -1e4]])  # p = (1/2, 1/2), (1/4, 3/4)
    patched = torch.tensor([[math.log(1.0), math.log(3.0), -1e4], [0.0, 0.0, -1e4]])  # q = (1/4, 3/4), (1/2, 1/2)
    kl = KLFromClean().bind(clean)(patched, pair)
    expected = [0.5 * math.log(0.5 / 0.25) + 0.5 * math.log(0.5 / 0.75),  # KL(p || q), not KL(q || p)
                0.25 * math.log(0.25 / 0.5) + 0.75 * math.log(0.75 / 0.5)]
    torch.testing.assert_close(kl, torch.tensor(expected), atol=1e-6, rtol=0)


def naive_last_log_probs(model, saes, base, source, unit, i):
    """Log-probabilities at the last position of pair i's base run with `unit` patched from the source."""
    captured = {}
    capture = CallableMetric(lambda logits: captured.setdefault("x", logits.log_softmax(-1))[:, 0], readout=-1)
    naive_unit_value(model, saes, base, source, unit, i, metric=capture)
    return captured["x"][0]


def test_metrics_library(model, sae, prompts):
    clean, corrupted = prompts
    kl = patch_latents(model, sae, clean, corrupted, KLFromClean(), units="position", progress=False)
    assert torch.equal(kl.metric_clean, torch.zeros(2)) and (kl.metric_corrupted > 0).all()
    prob = patch_latents(model, sae, clean, corrupted, TokenProb(3), units="position", progress=False)
    logp = patch_latents(model, sae, clean, corrupted, TokenLogProb(3), units="position", progress=False)
    torch.testing.assert_close(prob.metric, logp.metric.exp())
    # Each sweep value against log-probabilities from a naive patched forward, KL(clean || patched)
    # from the clean run's own logits.
    with torch.inference_mode():
        clean_log_p = model(clean)[:, -1].log_softmax(-1)
    assert kl.units == logp.units and len(kl.units) > 0
    for j, unit in enumerate(kl.units):
        for i in range(2):
            log_q = naive_last_log_probs(model, sae, corrupted, clean, unit, i)
            assert logp.metric[i, j].item() == pytest.approx(log_q[3].item(), abs=1e-4)
            expected_kl = (clean_log_p[i].exp() * (clean_log_p[i] - log_q)).sum().item()
            assert kl.metric[i, j].item() == pytest.approx(expected_kl, abs=1e-4)
    custom = patch_latents(model, sae, clean, corrupted, lambda logits: logits[:, -1, 3] - logits[:, -1, 4],
                           units="position", progress=False)
    reference = patch_latents(model, sae, clean, corrupted, LogitDiff(3, 4), units="position", progress=False)
    # the custom metric reads every position (full-length rows), LogitDiff one (suffix rows, pooled
    # under the earliest cut): the same rounding, divided by the clean-corrupted span
    span = (reference.metric_clean - reference.metric_corrupted).abs().min().item()
    torch.testing.assert_close(custom.metric, reference.metric, atol=1e-5, rtol=0)
    torch.testing.assert_close(custom.effect, reference.effect, atol=1e-5 / min(1.0, span), rtol=0)


@pytest.mark.parametrize("call,error,pattern", [
    (lambda m, s, c, r: patch_latents(m, s, c, r[:1], METRIC), PatchingError, "no broadcasting"),
    (lambda m, s, c, r: patch_latents(m, s, c, r[:, :-1], METRIC), PatchingError, "different token lengths"),
    (lambda m, s, c, r: patch_latents(m, s, c + 100, r, METRIC), PatchingError, r"lie in \[0, 50\)"),
    (lambda m, s, c, r: patch_latents(m, s, c, r, METRIC, positions=[-1]), PatchingError, "positions must be ints"),
    (lambda m, s, c, r: patch_latents(m, s, c, r, METRIC, positions=[9]), PatchingError, "positions must be ints"),
    (lambda m, s, c, r: unchecked(patch_latents)(m, s, c, r, METRIC, direction="sideways"), PatchingError, "direction"),
    (lambda m, s, c, r: patch_latents(m, s, c, r, METRIC, batch_size=0), PatchingError, "batch_size"),
    (lambda m, s, c, r: patch_latents(m, s, c, r, LogitDiff(99, 4)), PatchingError, "token ids outside"),
    (lambda m, s, c, r: patch_latents(m, s, c, r, LogitDiff([1, 2, 3], 4)), PatchingError, "3 token ids for 2 pairs"),
    (lambda m, s, c, r: patch_latents(m, {SITE: make_sae(12, 8, hook_name=None, model_name=None)}, c, r, METRIC),
     SpliceError, "d_in=12"),
    (lambda m, s, c, r: patch_latents(m, {Site(5): s}, c, r, METRIC, checks=SpliceChecks(allow_model_mismatch=True)), SiteError, "out of range"),
    (lambda m, s, c, r: patch_latents(m, s, c, r, METRIC, units="joint", latent_sets=[[1, 40]]), PatchingError, r"ints in 0..39 \(d_sae=40\); got \[1, 40\]"),
    (lambda m, s, c, r: patch_latents(m, s, c, r, METRIC, units="joint"), PatchingError, "needs latent_sets"),
    (lambda m, s, c, r: unchecked(patch_latents)(m, s, c, r, METRIC, units="neuron"), PatchingError, "units must be a list of PatchUnit values or a kind"),
    (lambda m, s, c, r: patch_residual(m, c, r, METRIC, layers=[3]), SiteError, "out of range"),
])
def test_bad_input_raises_before_any_forward(model, sae, prompts, call, error, pattern):
    clean, corrupted = prompts
    assert_refused_before_any_forward(model, lambda: call(model, sae, clean, corrupted), error, pattern)


def test_metric_that_cannot_tell_pairs_apart_is_refused(model, sae, prompts):
    clean, _ = prompts
    with pytest.raises(PatchingError, match="same value on the clean and corrupted"):
        patch_latents(model, sae, clean, clean.clone(), METRIC, progress=False)


def test_hooks_restored_after_exception_in_metric(model, sae, prompts):
    clean, corrupted = prompts
    calls = {"n": 0}

    def flaky(logits):
        calls["n"] += 1
        if calls["n"] > 4:
            raise RuntimeError("metric failed")
        return logits[:, -1, 3]

    before = snapshot(model)
    with pytest.raises(RuntimeError, match="metric failed"):
        patch_latents(model, sae, clean, corrupted, flaky, progress=False)
    assert snapshot(model) == before


def test_result_save_load_top_dataframe_plot(model, sae, prompts, tmp_path):
    clean, corrupted = prompts
    result = patch_latents(model, sae, clean, corrupted, METRIC, progress=False)
    loaded = PatchResult.load(result.save(tmp_path / "r"))
    assert torch.equal(loaded.effect, result.effect) and loaded.units == result.units
    assert loaded.provenance["saes"][SITE.hook_name] == result.provenance["saes"][SITE.hook_name]
    assert loaded.provenance["metric"].startswith("LogitDiff") and loaded.provenance["direction"] == "denoise"
    top = result.top(3)
    assert [t.effect for t in top] == sorted([t.effect for t in top], key=abs, reverse=True)
    assert abs(top[0].effect) == result.mean_effect.abs().max().item()
    frame = result.to_dataframe()
    assert len(frame) == len(result.units) and {"effect_pair0", "effect_pair1", "token"} <= set(frame.columns)
    png = result.plot(tmp_path / "heat.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    resid = patch_residual(model, clean, corrupted, METRIC, progress=False)
    assert resid.plot(tmp_path / "resid.png").exists()


def test_raw_units_patch_chosen_dimensions_and_neurons(model, prompts):
    clean, corrupted = prompts
    neurons = Site(1, "mlp_post")
    units = [PatchUnit((UnitPart(neurons, "raw", None, (0, 5, 9)),)),
             PatchUnit((UnitPart(Site(2), "raw", (3, 4), (1, 2)), UnitPart(neurons, "raw", (6,), None)))]
    result = patch_residual(model, clean, corrupted, METRIC, units=units, progress=False)
    _, cache = model.run_with_cache(clean)
    for j, unit in enumerate(units):
        for i in range(2):
            def make_hook(part):
                def hook(x, hook):
                    x = x.clone()
                    pos = list(part.positions) if part.positions is not None else list(range(x.shape[1]))
                    dims = list(part.latents) if part.latents is not None else list(range(x.shape[2]))
                    for p in pos:
                        x[0, p, dims] = cache[part.site.hook_name][i, p, dims]
                    return x
                return hook
            hooks = [(part.site.hook_name, make_hook(part)) for part in unit.parts]
            logits = model.run_with_hooks(corrupted[i : i + 1], fwd_hooks=hooks)
            assert result.metric[i, j].item() == pytest.approx(METRIC(logits[:, -1], torch.tensor([i]))[0].item(), abs=1e-4)
    with pytest.raises(PatchingError, match=r"dimensions must lie in \[0, 32\)"):
        patch_residual(model, clean, corrupted, METRIC, units=[PatchUnit((UnitPart(neurons, "raw", None, (32,)),))])


@pytest.fixture(scope="module")
def llama_like():
    """Rotary positions, RMSNorm and a gated SiLU MLP with grouped keys and values, like the
    default model (the engine starts mid-model and reuses the prefix's keys and values: both
    depend on the position scheme)."""
    from patching.model import tl_compat
    from tests.conftest import BACKEND

    if BACKEND == "bridge":  # backend-specific: on the Bridge, test_bridge_sweeps.py runs these families
        pytest.skip("hooked backend only: a random HookedTransformer (rotary, RMS, gated, GQA)")
    model = tl_compat.random_model(n_layers=3, d_vocab=50, positional_embedding_type="rotary", rotary_dim=4,
                                   normalization_type="RMS", act_fn="silu", gated_mlp=True, n_key_value_heads=2)
    model.eval()
    sae = make_sae(16, 40, hook_name=SITE.hook_name, model_name=model.cfg.model_name, seed=5)
    return model, sae


def naive_aligned_value(model, sae, base, source, unit, offset):
    """The naive reference with the source read `offset` positions later (align="end")."""
    src = naive_latents(model, sae, source, 0)
    edits = []
    for part in unit.parts:
        z_src, e_src = src[part.site]
        for p in (part.positions if part.positions is not None else range(base.shape[1])):
            if p + offset < 0:
                continue
            if part.kind == "error":
                edits.append(ErrorPatch(part.site, torch.tensor([0]), torch.tensor([p]), e_src[p + offset][None]))
            else:
                lat = part.latents if part.latents is not None else tuple(range(z_src.shape[1]))
                edits.append(LatentEdit(part.site, lat, z_src[p + offset, list(lat)], positions=p))
    return naive_metric(model, sae, base, edits, 0, metric=ONE_PAIR)


ONE_PAIR = LogitDiff(answer=3, wrong=4)


@pytest.mark.parametrize("direction", ["denoise", "noise"])
@pytest.mark.parametrize("unit", ["latent_position", "error", "position"])
def test_sweep_matches_naive_reference_on_a_rotary_rmsnorm_gated_model(llama_like, prompts, direction, unit):
    model, sae = llama_like
    clean, corrupted = prompts
    result = patch_latents(model, sae, clean, corrupted, METRIC, direction=direction, units=unit, progress=False)
    base, source = (corrupted, clean) if direction == "denoise" else (clean, corrupted)
    assert len(result.units) > 0
    for j in range(0, len(result.units), max(1, len(result.units) // 10)):
        for i in range(2):
            assert result.metric[i, j].item() == pytest.approx(
                naive_unit_value(model, sae, base, source, result.units[j], i), abs=1e-4)


@pytest.mark.parametrize("direction", ["denoise", "noise"])
def test_sweep_matches_naive_reference_with_end_alignment(llama_like, direction):
    """Prompts of different lengths aligned on their final positions."""
    model, sae = llama_like
    clean = torch.tensor([[1, 8, 3, 9, 4, 7, 2, 6, 5]])
    corrupted = torch.tensor([[1, 3, 9, 11, 7, 2, 6, 5]])  # one token shorter, differs at the aligned position 2
    result = patch_latents(model, sae, clean, corrupted, ONE_PAIR, direction=direction, align="end", progress=False)
    base, source = (corrupted, clean) if direction == "denoise" else (clean, corrupted)
    offset = source.shape[1] - base.shape[1]
    assert len(result.units) > 0
    assert max(u.position for u in result.units) < base.shape[1]
    for j in range(0, len(result.units), max(1, len(result.units) // 12)):
        expected = naive_aligned_value(model, sae, base, source, result.units[j], offset)
        assert result.metric[0, j].item() == pytest.approx(expected, abs=1e-4)


@pytest.mark.parametrize("per_row_cache", [False, True])
def test_rows_joining_at_their_layers_equal_separate_runs(llama_like, per_row_cache):
    """`run_blocks_joining`: rows that join at layers 0, 1 and 2, after a shared (or per-row) prefix
    cache, end where each would alone; joins out of layer order are refused."""
    from patching.model import tl_compat

    model, _ = llama_like
    g = torch.Generator().manual_seed(3)
    tokens = torch.randint(0, 50, (3, 8), generator=g)
    if not per_row_cache:
        tokens[:] = tokens[0]
    whole = tl_compat.prefix_cache(model, tokens)
    prefix = tl_compat.slice_cache(whole, 5)
    _, acts = tl_compat.run_until_end_with_cache(model, tokens, [Site(layer).hook_name for layer in range(3)])
    residual = {layer: acts[Site(layer).hook_name][:, 5:] + 0.1 * torch.randn(3, 3, model.cfg.d_model, generator=g)
                for layer in range(3)}
    rows = [0, 1, 2]  # row i joins at layer i
    joins = [(layer, residual[layer][[layer]] if per_row_cache else residual[layer][:1]) for layer in rows]
    cache = prefix if per_row_cache else tl_compat.slice_cache(tl_compat.prefix_cache(model, tokens[:1]), 5)
    joined = tl_compat.run_blocks_joining(model, joins, cache)
    for layer in rows:
        alone = tl_compat.select_cache_rows(prefix, torch.tensor([layer if per_row_cache else 0]))
        expected = model(joins[layer][1], start_at_layer=layer, stop_at_layer=model.cfg.n_layers, past_kv_cache=alone)
        torch.testing.assert_close(joined[layer], expected[0], atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="increasing layer order"):
        tl_compat.run_blocks_joining(model, joins[::-1], prefix)


def test_readout_of_chosen_columns_equals_the_full_readout_there_and_nan_elsewhere(llama_like):
    from patching.model import tl_compat

    model, _ = llama_like
    final = torch.randn(4, model.cfg.d_model, generator=torch.Generator().manual_seed(1))
    columns = LogitDiff(answer=[3, 7], wrong=4).columns()
    assert columns.tolist() == [3, 4, 7]
    full, part = tl_compat.readout(model, final), tl_compat.readout(model, final, columns)
    torch.testing.assert_close(part[:, columns], full[:, columns], atol=1e-5, rtol=0)
    others = torch.ones(part.shape[1], dtype=torch.bool)
    others[columns] = False
    assert part[:, others].isnan().all()
