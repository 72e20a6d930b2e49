"""Steering: exact invariants on tiny random models, cache-on ≡ cache-off generation, hooks
restored after errors, and validation before any forward pass."""

from __future__ import annotations

import pytest
import torch
from tests.conftest import construct_unchecked, make_sae
from tests.hooks_snapshot import CountingHook, snapshot

from patching import Site, SpliceError, splice
from patching.model import tl_compat
from patching.steering.choice import LatentChoice, contrast_latents, latents_from_result
from patching.steering.steer import SteeringConfig, SteeringError, generate_steered, steer, steering_vector
from patching.sweep.results import PatchResult
from patching.sweep.units import PatchUnit, UnitPart

SITE = Site(1, "resid_pre")


@pytest.fixture(scope="module")
def rotary_model():
    # Rotary positions, as in the default (Llama) model: TransformerLens 3.9's generate with the
    # key-value cache is only self-consistent for rotary models (see test_kv_cache_consistent_unsteered).
    model = tl_compat.random_model(n_layers=3, d_vocab=50, n_ctx=32, positional_embedding_type="rotary", rotary_dim=4)
    model.eval()
    return model


@pytest.fixture(scope="module")
def sae(rotary_model):
    return make_sae(16, 48, hook_name=SITE.hook_name, model_name=rotary_model.cfg.model_name)


@pytest.fixture(scope="module")
def tokens():
    return torch.randint(0, 50, (3, 8), generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def choice(rotary_model, sae, tokens):
    return contrast_latents(rotary_model, sae, tokens[:2], tokens[2:], k=6)


def test_coefficient_zero_gives_identical_logits(rotary_model, sae, tokens, choice):
    reference = rotary_model(tokens)
    for k in (1, 4):
        with steer(rotary_model, sae, choice.top(k), method="add", coefficient=0.0):
            assert torch.equal(rotary_model(tokens), reference)


def test_clamping_a_latent_to_its_own_value_gives_identical_logits(rotary_model, sae, tokens):
    row = tokens[:1]
    reference = rotary_model(row)
    with splice(rotary_model, sae, cache=True) as state:
        rotary_model(row)
    z = state.records[SITE].latents[0]
    position, latent = 5, int(z[5].argmax())
    assert z[position, latent] > 0  # a live latent: the clamp path really runs
    with steer(rotary_model, sae, [latent], method="clamp", coefficient=float(z[position, latent]), positions=(position,)):
        assert torch.equal(rotary_model(row), reference)
    with steer(rotary_model, sae, [latent], method="clamp", coefficient=float(z[position, latent]) + 1.0, positions=(position,)):
        changed = rotary_model(row)
    assert torch.equal(changed[:, :position], reference[:, :position]) and not torch.equal(changed, reference)


def _hand_hook(vector, positions=None):
    def hook(x, hook):
        out = x.clone()
        index = slice(None) if positions is None else list(positions)
        out[:, index] = out[:, index] + vector
        return out
    return hook


@pytest.mark.parametrize("scale", ["unit", "activation"])
def test_add_with_k1_equals_a_hand_written_hook(rotary_model, sae, tokens, choice, scale):
    latent, c = choice.latents[0], 2.5
    row = sae.W_dec[latent].detach()
    vector = c * (row / row.norm() if scale == "unit" else choice.typical_activations[0] * row)
    expected = rotary_model.run_with_hooks(tokens, fwd_hooks=[(SITE.hook_name, _hand_hook(vector))])
    with steer(rotary_model, sae, choice.top(1), method="add", coefficient=c, scale=scale):
        steered = rotary_model(tokens)
    torch.testing.assert_close(steered, expected, rtol=1e-6, atol=1e-6)
    expected_some = rotary_model.run_with_hooks(tokens, fwd_hooks=[(SITE.hook_name, _hand_hook(vector, (2, 6)))])
    with steer(rotary_model, sae, choice.top(1), method="add", coefficient=c, scale=scale, positions=(2, 6)):
        torch.testing.assert_close(rotary_model(tokens), expected_some, rtol=1e-6, atol=1e-6)


def test_topk_vector_is_unit_norm_and_weighted(sae, choice):
    config = SteeringConfig(scale="unit", weighting="score")
    vector = steering_vector(sae, choice.top(4), config)
    assert torch.isclose(vector.norm(), torch.tensor(1.0))
    rows = sae.W_dec[list(choice.latents[:4])].detach()
    weights = torch.tensor(choice.scores[:4]) / sum(choice.scores[:4])
    expected = weights @ (rows / rows.norm(dim=-1, keepdim=True))
    torch.testing.assert_close(vector, expected / expected.norm())


def test_contrast_latents_match_a_naive_mean_difference(rotary_model, sae, tokens):
    with splice(rotary_model, sae, cache=True) as state:
        rotary_model(tokens)
    z = state.records[SITE].latents
    difference = z[:2].reshape(-1, 48).mean(0) - z[2:].reshape(-1, 48).mean(0)
    choice = contrast_latents(rotary_model, sae, tokens[:2], tokens[2:], k=5)
    assert list(choice.latents) == torch.argsort(difference, descending=True, stable=True)[:5].tolist()
    torch.testing.assert_close(torch.tensor(choice.scores, dtype=torch.float32), difference[list(choice.latents)], rtol=1e-5, atol=1e-6)
    positive = z[:2].reshape(-1, 48)[:, choice.latents[0]]
    assert choice.typical_activations[0] == pytest.approx(float(positive[positive > 0].mean()), rel=1e-5)


def test_latents_from_a_patching_result_keep_the_best_positive_latents():
    units = [PatchUnit((UnitPart(SITE, "latent", (p,), (latent,)),)) for p, latent in [(0, 3), (1, 7), (2, 3), (0, 9), (1, 4)]]
    effect = torch.tensor([[0.2, 0.5, 0.9, -1.5, 0.1]])
    result = PatchResult(units, effect, effect, torch.ones(1), torch.zeros(1), "denoise", "exact", [["a", "b", "c"]])
    choice = latents_from_result(result, 3)
    assert choice.latents == (3, 7, 4) and choice.scores == pytest.approx((0.9, 0.5, 0.1)) and choice.site == SITE
    with pytest.raises(SteeringError, match="positive effect"):
        latents_from_result(result, 4)


@pytest.mark.parametrize("method", ["add", "clamp"])
@pytest.mark.parametrize("positions", ["all", "prompt", "generated", (3, 9, 11)])
def test_generation_with_the_kv_cache_equals_generation_without(rotary_model, sae, tokens, choice, method, positions):
    prompt_length, n_new = tokens.shape[1], 6
    with steer(rotary_model, sae, choice.top(2), method=method, coefficient=3.0, positions=positions) as state:
        cached = state.generate(tokens, max_new_tokens=n_new, use_kv_cache=True)
        uncached = state.generate(tokens, max_new_tokens=n_new, use_kv_cache=False)
    assert torch.equal(cached, uncached)
    # The same absolute positions steered in one full forward pass reproduce the greedy tokens.
    with steer(rotary_model, sae, choice.top(2), method=method, coefficient=3.0, positions=positions,
               prompt_length=prompt_length):
        logits = rotary_model(cached)
    assert torch.equal(logits[:, prompt_length - 1:-1].argmax(-1), cached[:, prompt_length:])
    plain = tl_compat.generate(rotary_model, tokens, max_new_tokens=n_new)
    assert not torch.equal(cached, plain)  # the steering is strong enough to matter


def test_position_modes_select_the_right_positions(rotary_model, sae, tokens, choice):
    n = tokens.shape[1]
    with steer(rotary_model, sae, choice.top(1), coefficient=4.0, positions="prompt") as state:
        by_mode = state.generate(tokens, max_new_tokens=5)
    with steer(rotary_model, sae, choice.top(1), coefficient=4.0, positions=tuple(range(n))) as state:
        by_index = state.generate(tokens, max_new_tokens=5)
    assert torch.equal(by_mode, by_index)
    plain = tl_compat.generate(rotary_model, tokens, max_new_tokens=5)
    with steer(rotary_model, sae, choice.top(1), coefficient=4.0, positions="generated") as state:
        generated_only = state.generate(tokens, max_new_tokens=5)
    # The first new token is read at the last prompt position, which "generated" leaves alone.
    assert torch.equal(generated_only[:, n], plain[:, n])


def test_kv_cache_consistent_unsteered(rotary_model, tokens):
    cached = tl_compat.generate(rotary_model, tokens, max_new_tokens=6, use_past_kv_cache=True)
    assert torch.equal(cached, tl_compat.generate(rotary_model, tokens, max_new_tokens=6, use_past_kv_cache=False))


def test_generate_steered_returns_both_sides(rotary_model, sae, tokens, choice):
    result = generate_steered(rotary_model, sae, choice.top(1), tokens, coefficient=5.0, max_new_tokens=5)
    assert torch.equal(result.unsteered_tokens, tl_compat.generate(rotary_model, tokens, max_new_tokens=5))
    assert not torch.equal(result.steered_tokens, result.unsteered_tokens)
    assert len(result.steered) == len(result.unsteered) == len(result.prompts) == 3
    assert "steered:" in result.side_by_side()


class Boom(RuntimeError):
    pass


@pytest.mark.parametrize("method", ["add", "clamp"])
@pytest.mark.parametrize("error", [Boom, KeyboardInterrupt])
def test_hooks_are_restored_when_generate_raises(rotary_model, sae, tokens, choice, method, error):
    before = snapshot(rotary_model)
    calls = []

    def fail_on_third_step(module, inputs, output):
        calls.append(1)
        if len(calls) == 3:
            raise error("injected")

    injector = rotary_model.blocks[2].register_forward_hook(fail_on_third_step)
    try:
        with pytest.raises(error):
            with steer(rotary_model, sae, choice.top(2), method=method, coefficient=2.0) as state:
                state.generate(tokens, max_new_tokens=6)
    finally:
        injector.remove()
    assert snapshot(rotary_model) == before
    with pytest.raises(Boom):
        with steer(rotary_model, sae, choice.top(1), method=method):
            raise Boom
    assert snapshot(rotary_model) == before


def _refused(model, match, fn, error=SteeringError):
    counter = CountingHook(model)
    try:
        with pytest.raises(error, match=match):
            fn()
    finally:
        counter.remove()
    assert counter.count == 0


def _enter(*args, **kwargs):
    with steer(*args, **kwargs):
        pass


def test_validation_runs_before_any_forward(rotary_model, sae, tokens, choice):
    m = rotary_model
    _refused(m, r"shape \(16,\)", lambda: _enter(m, sae, torch.ones(15)))
    _refused(m, "finite", lambda: _enter(m, sae, torch.tensor([float("nan")] + [0.0] * 15)))
    _refused(m, r"0\.\.47", lambda: _enter(m, sae, [3, 48]))
    _refused(m, r"0\.\.47", lambda: _enter(m, sae, [-1]))
    _refused(m, "needs site", lambda: _enter(m, None, torch.ones(16)))
    _refused(m, "clamp", lambda: _enter(m, sae, torch.ones(16), method="clamp"))
    _refused(m, "typical activations", lambda: _enter(m, sae, [3], scale="activation"))
    other = LatentChoice(Site(2), (1,), (1.0,))
    _refused(m, "trained on 'blocks.1.hook_resid_pre'", lambda: _enter(m, sae, other), error=SpliceError)
    _refused(m, "chosen at", lambda: _enter(m, sae, other, site=SITE))
    _refused(m, "k must be", lambda: choice.top(7))
    _refused(m, "k must be", lambda: contrast_latents(m, sae, tokens[:1], tokens[1:], k=0))
    _refused(m, "max_new_tokens", lambda: generate_steered(m, sae, choice.top(1), tokens, max_new_tokens=0))


@pytest.mark.parametrize("value", ["3", None, True, [1.0], float("inf")])
def test_a_coefficient_of_the_wrong_type_or_value_is_refused(value):
    with pytest.raises(SteeringError, match="coefficient"):
        construct_unchecked(SteeringConfig, coefficient=value)


@pytest.mark.parametrize("field,value,match", [("method", "steer", "method"), ("positions", "middle", "positions"),
                                               ("positions", (1, -2), "positions"), ("prompt_length", 0, "prompt_length"),
                                               ("scale", "norm", "scale"), ("weighting", "rank", "weighting")])
def test_config_fields_are_checked(field, value, match):
    with pytest.raises(SteeringError, match=match):
        construct_unchecked(SteeringConfig, **{field: value})


def test_an_sae_for_another_width_is_refused(rotary_model):
    wrong = make_sae(12, 20, hook_name=SITE.hook_name, model_name=rotary_model.cfg.model_name)
    counter = CountingHook(rotary_model)
    try:
        with pytest.raises(ValueError, match="d_in=12"):
            _enter(rotary_model, wrong, [0])
    finally:
        counter.remove()
    assert counter.count == 0


@pytest.mark.default_model
def test_default_model_batched_generation_cache_on_equals_off(default_model_4l):
    model = default_model_4l
    sae = make_sae(576, 256, hook_name="blocks.2.hook_resid_pre", model_name=model.cfg.model_name)
    prompts = ["The weather today is", "My favourite city in the whole world is"]  # left-padded batch
    choice = contrast_latents(model, sae, ["I love Paris."], ["I love London."], k=4)
    for method, positions in (("add", "generated"), ("clamp", "all")):
        with steer(model, sae, choice.top(4), method=method, coefficient=6.0, positions=positions) as state:
            cached = state.generate(prompts, max_new_tokens=6, use_kv_cache=True)
            uncached = state.generate(prompts, max_new_tokens=6, use_kv_cache=False)
        assert torch.equal(cached, uncached)
