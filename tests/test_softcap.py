"""The final logit soft-cap (Gemma 2: `logits = c * tanh(raw / c)`) applies to every readout, not only
to `readout`: `self_repair`'s direct effects and compensation, and `direction_logits`, are checked
against plain TransformerLens forwards with hooks on tiny soft-capped models."""

from __future__ import annotations

import pytest
import torch

from patching.model import tl_compat
from patching.sweep.objectives import LogitDiff, TokenLogProb
from patching.tracing.repair import Component, self_repair

CAP = 1.5
# Gemma 2's features as tests/test_architectures.py builds them (caps small enough to bite on random weights).
GEMMA2 = dict(positional_embedding_type="rotary", normalization_type="RMS", act_fn="gelu_pytorch_tanh", gated_mlp=True,
              n_key_value_heads=2, attn_scores_soft_cap=0.5, output_logits_soft_cap=CAP, use_local_attn=True, window_size=3,
              attn_types=["local", "global", "local"], use_normalization_before_and_after=True)
METRIC = LogitDiff(answer=3, wrong=4)


def _model(**overrides):
    model = tl_compat.random_model(n_layers=3, d_vocab=50, n_ctx=16, **overrides)
    model.eval()
    return model


@pytest.fixture(scope="module")
def tokens():
    return torch.randint(0, 50, (1, 7), generator=torch.Generator().manual_seed(5))


@pytest.fixture(scope="module")
def corrupted():
    return torch.randint(0, 50, (1, 7), generator=torch.Generator().manual_seed(6))


def _metric(model, tokens, hooks, metric=METRIC) -> float:
    with torch.inference_mode():
        logits = model.run_with_hooks(tokens, fwd_hooks=hooks)
    return float(metric(logits[:, -1], torch.zeros(1, dtype=torch.long))[0])


def _outputs(model, tokens, hook_name: str) -> torch.Tensor:
    with torch.inference_mode():
        _, cache = model.run_with_cache(tokens, names_filter=[hook_name, "ln_final.hook_scale"])
    return cache[hook_name]


def _set(value):
    return lambda x, hook: value.to(x.dtype).expand_as(x).clone()


def _ablated_value(model, tokens, corrupted, hook_name, ablation):
    base = _outputs(model, tokens, hook_name)
    if ablation == "zero":
        return torch.zeros_like(base)
    if ablation == "resample":
        return _outputs(model, corrupted, hook_name)
    return _outputs(model, corrupted, hook_name).mean((0, 1))[None, None]


@pytest.mark.parametrize("ablation", ["zero", "mean", "resample"])
def test_direct_effect_of_the_last_mlp_is_its_total_effect_through_the_cap(tokens, corrupted, ablation):
    """Without a final norm nothing can respond to the last MLP's ablation: its direct effect is its
    total effect, computed here by one forward with the MLP's output set by a hook."""
    model = _model(normalization_type=None, output_logits_soft_cap=CAP)
    hook = "blocks.2.hook_mlp_out"
    value = _ablated_value(model, tokens, corrupted, hook, ablation)
    expected = _metric(model, tokens, []) - _metric(model, tokens, [(hook, _set(value))])
    result = self_repair(model, tokens, METRIC, components=[Component(2, "mlp")], ablation=ablation,
                         corrupted=corrupted, corpus=corrupted)
    assert float(result.total[0]) == pytest.approx(expected, abs=1e-5)
    assert float(result.direct[0]) == pytest.approx(expected, abs=1e-5)
    uncapped = _model(normalization_type=None)
    loose = _metric(uncapped, tokens, []) - _metric(uncapped, tokens, [(hook, _set(value))])
    assert abs(loose - expected) > 1e-2, "the cap must bite for this test to mean anything"


def _frozen_scale(model, tokens):
    """A hook holding the final norm's scale at the base run's (the direct-effect convention)."""
    with torch.inference_mode():
        _, cache = model.run_with_cache(tokens, names_filter=["ln_final.hook_scale"])
    scale = cache["ln_final.hook_scale"]
    return ("ln_final.hook_scale", lambda x, hook: scale.clone())


@pytest.mark.parametrize("metric", [METRIC, TokenLogProb(token=3)], ids=["logit-diff", "log-prob"])
def test_direct_effect_and_compensation_on_gemma2_style_model(tokens, metric):
    """Gemma 2's tiny twin (RMSNorm before and after each sublayer, attention and logit soft-caps): the
    last MLP's direct effect equals the metric change when it alone is ablated with the final norm's
    scale frozen, and the compensation it shows when attention 0 is ablated equals the change from
    setting only its output to its value in that run (scale frozen), both through the cap; for the
    linear logit difference and for a non-linear log-probability."""
    model = _model(**GEMMA2)
    assert model.cfg.output_logits_soft_cap > 0 and model.cfg.normalization_type == "RMS"
    freeze = _frozen_scale(model, tokens)
    last, first = "blocks.2.hook_mlp_out", "blocks.0.hook_attn_out"
    base = _metric(model, tokens, [freeze], metric)
    zero = torch.zeros_like(_outputs(model, tokens, last))
    direct = base - _metric(model, tokens, [freeze, (last, _set(zero))], metric)
    with torch.inference_mode(), model.hooks(fwd_hooks=[(first, lambda x, hook: torch.zeros_like(x))]):
        _, run = model.run_with_cache(tokens, names_filter=[last])
    compensation = _metric(model, tokens, [freeze, (last, _set(run[last]))], metric) - base
    result = self_repair(model, tokens, metric, components=[Component(0, "attn"), Component(2, "mlp")])
    assert float(result.direct[1]) == pytest.approx(direct, abs=1e-5)
    assert float(result.compensation[0, 1]) == pytest.approx(compensation, abs=1e-5)


def test_direction_logits_go_through_the_cap():
    """`direction_logits(d)` is what the model outputs when its final residual is `d` (no final norm,
    zero unembedding bias): the hook sets every position of the last residual to `d`."""
    model = _model(normalization_type=None, output_logits_soft_cap=CAP)
    assert torch.equal(model.unembed.b_U, torch.zeros_like(model.unembed.b_U))
    direction = torch.randn(16, generator=torch.Generator().manual_seed(2)) * 3
    with torch.inference_mode():
        logits = model.run_with_hooks(torch.zeros(1, 2, dtype=torch.long),
                                      fwd_hooks=[("blocks.2.hook_resid_post", _set(direction[None, None]))])
    ours = tl_compat.direction_logits(model, direction)
    assert torch.allclose(ours, logits[0, -1], atol=1e-6)
    assert ours.abs().max() < CAP
