"""R6 and R5 regressions from the hostile pass (issue 17): every bad input is refused with a typed
error naming expected versus actual, before a single forward pass (a counting hook proves it), and
the model keeps its hooks, flags and training modes."""

from __future__ import annotations

import pytest
import torch

from patching import Site, SpliceError, patch_latents
from patching.attribution.estimators import attribute_latents
from patching.errors import PatchingError
from patching.model import tl_compat
from patching.steering.choice import LatentChoice
from patching.steering.steer import SteeringError, generate_steered, steer
from patching.sweep.objectives import LogitDiff
from tests.conftest import make_sae, unchecked
from tests.hooks_snapshot import assert_refused_before_any_forward, snapshot

SITE = Site(1)
METRIC = LogitDiff(answer=3, wrong=4)


@pytest.fixture(scope="module")
def model():
    # Rotary, as the default model, and left in training mode on purpose: the fixtures elsewhere
    # call .eval() first, which hid that generation left models in eval mode.
    return tl_compat.random_model(n_layers=3, d_vocab=50, n_ctx=32, positional_embedding_type="rotary", rotary_dim=4)


@pytest.fixture(scope="module")
def sae(model):
    return make_sae(16, 40, hook_name=SITE.hook_name, model_name=model.cfg.model_name, seed=3)


@pytest.fixture(scope="module")
def pair():
    g = torch.Generator().manual_seed(7)
    clean = torch.randint(0, 50, (2, 9), generator=g)
    corrupted = clean.clone()
    corrupted[:, 3] = (corrupted[:, 3] + 11) % 50
    return clean, corrupted


def _sae_with(sae, fill):
    bad = make_sae(16, 40, hook_name=SITE.hook_name, model_name=sae.model_name, seed=3)
    with torch.no_grad():
        bad.W_enc[2, 5] = fill
    return bad


def _meta_sae(sae):
    return make_sae(16, 40, hook_name=SITE.hook_name, model_name=sae.model_name, seed=3).to("meta")


def _zero_row_sae(sae):
    bad = make_sae(16, 40, hook_name=SITE.hook_name, model_name=sae.model_name, seed=3)
    with torch.no_grad():
        bad.W_dec[7] = 0.0
    return bad


def _choice(latents, scores, acts=None):
    return LatentChoice(SITE, tuple(latents), tuple(scores), acts)


def _steer_once(m, s, target, tokens, **config):
    with steer(m, s, target, **config):
        m(tokens)


CASES = {
    # tokens
    "zero pairs": (lambda m, s, c, r: patch_latents(m, s, c[:0], r[:0], METRIC, progress=False),
                   PatchingError, r"at least one row and one position, got shape \(0, 9\)"),
    "zero pairs, attribution": (lambda m, s, c, r: attribute_latents(m, s, c[:0], r[:0], METRIC, progress=False),
                                PatchingError, r"got shape \(0, 9\)"),
    "zero positions": (lambda m, s, c, r: patch_latents(m, s, c[:1, :0], r[:1, :0], METRIC, progress=False),
                       PatchingError, r"got shape \(1, 0\)"),
    # latent sets
    "latent set of strings": (lambda m, s, c, r: unchecked(patch_latents)(m, s, c, r, METRIC, units="joint", latent_sets=[["x"]]),
                              PatchingError, r"ints in 0..39 \(d_sae=40\); got \['x'\]"),
    "latent set not a list": (lambda m, s, c, r: unchecked(patch_latents)(m, s, c, r, METRIC, units="joint", latent_sets=[5]),
                              PatchingError, r"latent_sets\[0\].*got 5"),
    "latent set of floats": (lambda m, s, c, r: unchecked(patch_latents)(m, s, c, r, METRIC, units="joint", latent_sets=[[1.9]]),
                             PatchingError, r"got \[1.9\]"),
    # SAE objects
    "SAE with NaN weight": (lambda m, s, c, r: patch_latents(m, _sae_with(s, float("nan")), c, r, METRIC),
                            SpliceError, "W_enc holds 1 non-finite values"),
    "SAE with inf weight, attribution": (
        lambda m, s, c, r: attribute_latents(m, _sae_with(s, float("inf")), c, r, METRIC, progress=False),
        SpliceError, "W_enc holds 1 non-finite"),
    "SAE with NaN weight, steering": (lambda m, s, c, r: _steer_once(m, _sae_with(s, float("nan")), [1], c),
                                      SpliceError, "non-finite"),
    "SAE on the meta device": (lambda m, s, c, r: patch_latents(m, _meta_sae(s), c, r, METRIC),
                               SpliceError, "meta device"),
    # steering values that overflow in the model's dtype
    "coefficient 1e39": (lambda m, s, c, r: _steer_once(m, s, [1, 2], c, coefficient=1e39),
                         SteeringError, r"coefficient 1e\+39 \* v\) must be finite in the model.s dtype torch.float32 "
                         r"\(\|value\| <= 3.4e\+38\); got max \|value\| inf"),
    "clamp coefficient 1e39": (lambda m, s, c, r: _steer_once(m, s, [1, 2], c, method="clamp", coefficient=1e39),
                               SteeringError, r"clamp values .*finite in the model's dtype"),
    "zero decoder row, unit": (lambda m, s, c, r: _steer_once(m, _zero_row_sae(s), [7, 2], c),
                               SteeringError, r"latent\(s\) \[7\] have a zero decoder row"),
    "NaN typical activation": (lambda m, s, c, r: _steer_once(m, s, _choice([1, 2], [1.0, 1.0], (1.0, float("nan"))), c,
                                                              scale="activation"),
                               SteeringError, "finite typical activations"),
    "NaN typical activation, clamp": (
        lambda m, s, c, r: _steer_once(m, s, _choice([1, 2], [1.0, 1.0], (float("nan"), 1.0)), c, scale="activation",
                                       method="clamp"),
        SteeringError, "finite typical activations"),
    "huge typical activation": (lambda m, s, c, r: _steer_once(m, s, _choice([1], [1.0], (1e38,)), c, scale="activation",
                                                               coefficient=10.0),
                                SteeringError, "finite in the model's dtype"),
    "inf score": (lambda m, s, c, r: _steer_once(m, s, _choice([1, 2], [float("inf"), 1.0]), c, weighting="score"),
                  SteeringError, "positive finite scores"),
    # generation settings
    "no prompts": (lambda m, s, c, r: generate_steered(m, s, [1], [], max_new_tokens=2),
                   SteeringError, r"non-empty list of strings .*got \[\]"),
    "top_p 5": (lambda m, s, c, r: unchecked(generate_steered)(m, s, [1], c, max_new_tokens=2, do_sample=True, top_p=5.0),
                SteeringError, r"top_p must be in \(0, 1\] or None, got 5.0"),
    "temperature -1": (lambda m, s, c, r: unchecked(generate_steered)(m, s, [1], c, max_new_tokens=2,
                                                                      do_sample=True, temperature=-1),
                       SteeringError, "temperature must be a positive finite number, got -1"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_is_refused_before_any_forward(model, sae, pair, case):
    call, error, pattern = CASES[case]
    clean, corrupted = pair
    assert_refused_before_any_forward(model, lambda: call(model, sae, clean, corrupted), error, pattern)


def test_a_metric_turning_nan_mid_sweep_is_refused_naming_the_unit(model, sae, pair):
    clean, corrupted = pair
    calls = {"n": 0}

    def flaky(logits):
        calls["n"] += 1
        value = logits[:, -1, 3] - logits[:, -1, 4]
        return value if calls["n"] <= 4 else torch.full_like(value, float("nan"))

    before = snapshot(model)
    with pytest.raises(PatchingError, match=r"returned nan \(expected a finite number\) for unit blocks\.1\.hook_resid_pre"):
        patch_latents(model, sae, clean, corrupted, flaky, units="position", batch_size=1, progress=False)
    assert calls["n"] > 4  # it failed mid-sweep, after good chunks
    assert snapshot(model) == before


def test_a_metric_that_is_nan_on_the_reference_run_is_refused(model, sae, pair):
    clean, corrupted = pair
    with pytest.raises(PatchingError, match="unpatched base run of pair 0"):
        patch_latents(model, sae, clean, corrupted, lambda logits: logits[:, -1, 3] * float("nan"), progress=False)


def test_generation_restores_training_modes(model, sae, pair):
    clean, _ = pair
    model.train()
    model.blocks[0].eval()  # a mixed state, restored module by module
    before = snapshot(model)
    assert model.training and not model.blocks[0].training
    out = generate_steered(model, sae, [1, 2], clean[:1], max_new_tokens=2)
    assert out.steered_tokens.shape == (1, 11)
    assert snapshot(model) == before
    assert model.training and not model.blocks[0].training
