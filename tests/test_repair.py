"""Self-repair: direct versus total effects, on a tiny model built to self-repair (the answer is
known) and against independent computations on a random model."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

from patching.errors import PatchingError
from patching.model import Site, tl_compat
from patching.sweep import (CallableMetric, KLFromClean, LogitDiff, PatchUnit, TokenLogProb, TokenProb, UnitPart,
                            patch_residual)
from patching.tracing.repair import Component, self_repair
from tests.conftest import unchecked
from tests.hooks_snapshot import assert_refused_before_any_forward

METRIC = LogitDiff(answer=2, wrong=3)


@pytest.fixture(scope="module")
def hydra():
    """MLP0 writes the answer's direction; MLP1 writes it only to the extent it is missing
    (relu(1 − x·answer)), so ablating MLP0 is fully repaired by MLP1. Attention writes nothing."""
    model = tl_compat.random_model(n_layers=2, d_model=4, d_head=2, n_heads=2, d_mlp=2, d_vocab=5,
                                   act_fn="relu", normalization_type=None)
    with torch.no_grad():
        for param in model.parameters():
            param.zero_()
        model.embed.W_E[:, 0] = 1.0  # dim 0: a constant 1 at every position
        model.blocks[0].mlp.W_in[0, 0] = 1.0
        model.blocks[0].mlp.W_out[0, 1] = 1.0  # dim 1: the answer's direction
        model.blocks[1].mlp.W_in[0, 0], model.blocks[1].mlp.W_in[1, 0] = 1.0, -1.0
        model.blocks[1].mlp.W_out[0, 1] = 1.0
        model.unembed.W_U[1, 2] = 1.0
    return model.eval()


def test_built_self_repair_is_found(hydra):
    tokens = torch.tensor([[0, 1, 4, 1]])
    result = self_repair(hydra, tokens, METRIC)
    labels = [c.label() for c in result.components]
    assert labels == ["ATTN0", "MLP0", "ATTN1", "MLP1"]
    torch.testing.assert_close(result.direct, torch.tensor([0.0, 1.0, 0.0, 0.0]))
    torch.testing.assert_close(result.total, torch.zeros(4))
    torch.testing.assert_close(result.repair, torch.tensor([0.0, 1.0, 0.0, 0.0]))
    assert result.compensation[1, 3] == 1.0 and result.compensation.abs().sum() == 1.0
    table = result.to_dataframe()
    assert table.loc[1, "top_compensator"] == "MLP1" and table.loc[1, "top_compensation"] == 1.0


@pytest.fixture(scope="module")
def model():
    return tl_compat.random_model(n_layers=3, d_vocab=50, n_ctx=32).eval()


def test_total_effect_equals_engine_and_direct_equals_frozen_norm_readout(model):
    g = torch.Generator().manual_seed(3)
    tokens = torch.randint(0, 50, (1, 7), generator=g)
    corrupted = tokens.clone()
    corrupted[0, 2] = (corrupted[0, 2] + 7) % 50
    comps = [Component(0, "head", head=1), Component(1, "mlp"), Component(2, "attn")]
    result = self_repair(model, tokens, METRIC, components=comps, ablation="resample", corrupted=corrupted)
    units = [PatchUnit((UnitPart(c.site, "raw", None),)) for c in comps]
    engine = patch_residual(model, tokens, corrupted, METRIC, direction="noise", units=units, progress=False)
    torch.testing.assert_close(result.total, engine.metric_clean[0] - engine.metric[0], atol=1e-5, rtol=0)
    # direct effect: the final norm applied to the residual minus the component's change, scale frozen
    _, clean = model.run_with_cache(tokens)
    _, corr = model.run_with_cache(corrupted)
    final = clean["blocks.2.hook_resid_post"][0, -1]
    scale = clean["ln_final.hook_scale"][0, -1]
    for i, comp in enumerate(comps):
        if comp.kind == "head":
            change = (clean[comp.site.hook_name][0, -1, 1] - corr[comp.site.hook_name][0, -1, 1]) @ model.blocks[0].attn.W_O[1]
        else:
            change = clean[comp.site.hook_name][0, -1] - corr[comp.site.hook_name][0, -1]

        def frozen(x):
            x = x - x.mean()
            return (x / scale * model.ln_final.w + model.ln_final.b) @ model.W_U + model.b_U

        expected = METRIC(frozen(final)[None], torch.tensor([0])) - METRIC(frozen(final - change)[None], torch.tensor([0]))
        assert result.direct[i].item() == pytest.approx(expected.item(), abs=1e-5), comp.label()


def test_mean_ablation_and_plot(model, tmp_path):
    tokens = torch.randint(0, 50, (1, 6), generator=torch.Generator().manual_seed(4))
    corpus = torch.randint(0, 50, (3, 9), generator=torch.Generator().manual_seed(5))
    result = self_repair(model, tokens, METRIC, ablation="mean", corpus=corpus)
    assert len(result.components) == 6 and torch.isfinite(result.total).all()
    # Against plain hooks: each output set to its mean over every corpus position, at every position.
    _, corpus_cache = model.run_with_cache(corpus)
    _, clean = model.run_with_cache(tokens)
    m_base = METRIC(model(tokens)[:, -1], torch.tensor([0]))[0]
    scale = clean["ln_final.hook_scale"][0, -1]

    def frozen(x):
        x = x - x.mean()
        return (x / scale * model.ln_final.w + model.ln_final.b) @ model.W_U + model.b_U

    final = clean[f"blocks.{model.cfg.n_layers - 1}.hook_resid_post"][0, -1]
    for i, comp in enumerate(result.components):
        name = f"blocks.{comp.layer}.hook_{comp.kind}_out"
        mean = corpus_cache[name].mean((0, 1))
        logits = model.run_with_hooks(tokens, fwd_hooks=[(name, lambda x, hook, m=mean: m.expand_as(x).clone())])
        expected_total = m_base - METRIC(logits[:, -1], torch.tensor([0]))[0]
        assert result.total[i].item() == pytest.approx(expected_total.item(), abs=1e-5), comp.label()
        change = clean[name][0, -1] - mean
        expected_direct = METRIC(frozen(final)[None], torch.tensor([0])) - METRIC(frozen(final - change)[None], torch.tensor([0]))
        assert result.direct[i].item() == pytest.approx(expected_direct.item(), abs=1e-5), comp.label()
    assert (result.compensation.tril() == 0).all()  # only downstream components respond
    assert result.plot(tmp_path / "repair.png").stat().st_size > 0


@pytest.mark.parametrize("kwargs,pattern", [
    (dict(ablation="resample"), "corrupted tokens"), (dict(ablation="mean"), "corpus"),
    (dict(ablation="knockout"), "ablation must be"), (dict(components=[Component(5, "mlp")]), "out of range"),
])
def test_bad_inputs_raise(model, kwargs, pattern):
    from patching.errors import SiteError

    with pytest.raises((PatchingError, SiteError), match=pattern):
        unchecked(self_repair)(model, torch.zeros(1, 4, dtype=torch.long), METRIC, **kwargs)
    with pytest.raises(PatchingError, match="head= is needed"):
        Component(0, "head")
    assert Site(0, "head_out", head=0).hook_name == Component(0, "head", head=0).site.hook_name


@dataclass(frozen=True)
class PlainLogitDiff:
    """The logit difference as a user would write it: a `Metric` that is not a `LogitDiff`."""

    readout: int = -1

    def __call__(self, logits, pair):
        return (logits[:, 2] - logits[:, 3]).float()


@pytest.mark.parametrize("metric", [PlainLogitDiff(), lambda logits: logits[:, 2] - logits[:, 3]],
                         ids=["metric", "bare-callable"])
def test_any_metric_equals_the_logit_diff_path_where_they_coincide(model, metric):
    """A general metric takes the M(base + Δ) − M(base) path; for a logit difference it is LogitDiff's."""
    tokens = torch.randint(0, 50, (1, 7), generator=torch.Generator().manual_seed(6))
    corrupted = torch.randint(0, 50, (1, 7), generator=torch.Generator().manual_seed(7))
    comps = [Component(0, "head", head=1), Component(1, "attn"), Component(1, "mlp"), Component(2, "mlp")]
    expected = self_repair(model, tokens, METRIC, components=comps, ablation="resample", corrupted=corrupted)
    result = self_repair(model, tokens, metric, components=comps, ablation="resample", corrupted=corrupted)
    for name in ("direct", "total", "compensation"):
        torch.testing.assert_close(getattr(result, name), getattr(expected, name), atol=1e-5, rtol=0, msg=name)
    assert expected.compensation.abs().sum() > 0 and expected.direct.abs().min() > 0  # nothing vacuous


def test_token_log_prob_direct_and_total_against_hooks_and_the_engine(model):
    """A non-linear metric: direct = M(frozen(final)) − M(frozen(final − change)), read by hand."""
    metric = TokenLogProb(token=5, position=-2)
    tokens = torch.randint(0, 50, (1, 6), generator=torch.Generator().manual_seed(8))
    corrupted = torch.randint(0, 50, (1, 6), generator=torch.Generator().manual_seed(9))
    comps = [Component(0, "mlp"), Component(1, "head", head=0), Component(2, "attn")]
    result = self_repair(model, tokens, metric, components=comps, ablation="resample", corrupted=corrupted)
    units = [PatchUnit((UnitPart(c.site, "raw", None),)) for c in comps]
    engine = patch_residual(model, tokens, corrupted, metric, direction="noise", units=units, progress=False)
    torch.testing.assert_close(result.total, engine.metric_clean[0] - engine.metric[0], atol=1e-5, rtol=0)
    _, clean = model.run_with_cache(tokens)
    _, corr = model.run_with_cache(corrupted)
    final, scale = clean["blocks.2.hook_resid_post"][0, -2], clean["ln_final.hook_scale"][0, -2]

    def frozen(x):
        x = x - x.mean()
        return ((x / scale * model.ln_final.w + model.ln_final.b) @ model.W_U + model.b_U)[None]

    for i, comp in enumerate(comps):
        name, pick = comp.site.hook_name, (lambda t: t[0, -2, 0]) if comp.kind == "head" else (lambda t: t[0, -2])
        change = pick(clean[name]) - pick(corr[name])
        if comp.kind == "head":
            change = change @ model.blocks[1].attn.W_O[0]
        pair = torch.tensor([0])
        expected = metric(frozen(final), pair) - metric(frozen(final - change), pair)
        assert result.direct[i].item() == pytest.approx(expected.item(), abs=1e-5), comp.label()
    assert result.direct.abs().min() > 0


@pytest.mark.parametrize("metric,pattern", [
    (KLFromClean(), "reference runs"), (CallableMetric(lambda logits: logits[:, 0]), "readout=None"),
    (TokenLogProb(token=50), r"TokenLogProb.token must be one token id in \[0, 50\)"),
    (TokenProb(token=1, position=9), r"TokenProb.readout must be an int in \[-4, 4\)"),
    (LogitDiff(answer=[1, 2], wrong=3), "LogitDiff.answer must be one token id"), ("logit", "metric must be"),
])
def test_unsupported_metrics_are_refused_before_any_forward_pass(model, metric, pattern):
    tokens = torch.zeros(1, 4, dtype=torch.long)
    assert_refused_before_any_forward(model, lambda: unchecked(self_repair)(model, tokens, metric), PatchingError, pattern)
