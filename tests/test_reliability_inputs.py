"""Bad inputs are typed errors before any forward pass (issue 30, item 8).

Each case below ran the model first and failed later (after 34 block calls for a clamp
coefficient of 1e39), or failed untyped (a list as a release name, an empty safety suite). The
counting hook proves that nothing ran.
"""

from __future__ import annotations

import pytest
import torch

from hooks_snapshot import assert_refused_before_any_forward
from patching import LogitDiff, PatchingError, SteeringError, compare_steering, patch_heads, patch_latents
from patching.safety import SafetySuite
from patching.steering import CompareSettings, Concept
from patching.tracing import Component, NoiseConfig, causal_trace, self_repair
from sae.registry import UnknownReleaseError, load_release
from tests.conftest import construct_unchecked, make_sae, unchecked
from worded_model import worded_model


@pytest.fixture(scope="module")
def worded(tmp_path_factory):
    return worded_model(tmp_path_factory.mktemp("tokenizer"), n_ctx=32)


@pytest.fixture(scope="module")
def sae(worded):
    return make_sae(worded.cfg.d_model, 24, hook_name="blocks.1.hook_resid_pre", model_name=worded.cfg.model_name)


CONCEPT = Concept("w9", positive=["w1 w9", "w2 w9"], negative=["w1 w3", "w2 w3"], target_tokens=["w9"],
                  heldout=["w4 w5", "w6 w7"], neutral=["w8 w10 w11"])


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), 1e39])
def test_compare_steering_checks_every_coefficient_before_the_first_cell(worded, sae, bad):
    assert_refused_before_any_forward(
        worded, lambda: compare_steering(worded, sae, CONCEPT, k_values=(1,), coefficients=(1.0, bad), methods=("clamp",),
                                         max_new_tokens=1, seeds=(0,), progress=False),
        SteeringError, "coefficients must be finite in the model's dtype")


@pytest.mark.parametrize("field,value", [("temperature", float("inf")), ("temperature", True), ("seeds", (2 ** 70,)),
                                         ("seeds", (-1,))])
def test_compare_settings_refuse_absurd_numbers(field, value):
    with pytest.raises(SteeringError, match=f"CompareSettings.{field}"):
        construct_unchecked(CompareSettings, **{field: value})


@pytest.mark.parametrize("seed", [1.5, 2 ** 70, "x", -1, True])
def test_noise_config_seed_is_a_generator_seed(seed):
    with pytest.raises(PatchingError, match=r"NoiseConfig.seed must be an int in \[0, 2\*\*63\)"):
        construct_unchecked(NoiseConfig, scale=1.0, seed=seed)
    assert NoiseConfig(scale=1.0, n_samples=1, seed=2 ** 63 - 1).draw(1, 2).shape == (1, 1, 2)  # the largest seed works


def test_self_repair_refuses_empty_components_and_bad_metrics_before_running(worded):
    tokens = torch.tensor([[0, 4, 5, 6, 7]])
    for call, pattern in [
        (lambda: self_repair(worded, tokens, LogitDiff(3, 4), components=[]), "non-empty list of Component"),
        (lambda: self_repair(worded, tokens, LogitDiff(50, 4)), r"LogitDiff.answer must be one token id in \[0, 50\)"),
        (lambda: self_repair(worded, tokens, LogitDiff(3, -1)), "LogitDiff.wrong must be one token id"),
        (lambda: self_repair(worded, tokens, LogitDiff(3, [4, 5])), "LogitDiff.wrong must be one token id"),
        (lambda: self_repair(worded, tokens, LogitDiff(3, 4, position=5)), r"position must be an int in \[-5, 5\)"),
        (lambda: self_repair(worded, tokens, LogitDiff(3, 4, position=-6)), "position must be an int"),
        (lambda: self_repair(worded, torch.tensor([[0, 4, 99]]), LogitDiff(3, 4)), r"tokens must lie in \[0, 50\)"),
    ]:
        assert_refused_before_any_forward(worded, call, PatchingError, pattern)
    assert self_repair(worded, tokens, LogitDiff(3, 4), components=[Component(0, "attn")]).total.shape == (1,)


def test_patching_refuses_a_metric_position_outside_the_prompts(worded, sae):
    clean, corrupted = torch.tensor([[0, 4, 5, 6]]), torch.tensor([[0, 4, 7, 6]])
    for position in (99, 4, -5):
        for call in (lambda: patch_latents(worded, sae, clean, corrupted, LogitDiff(3, 4, position=position), progress=False),
                     lambda: patch_heads(worded, clean, corrupted, LogitDiff(3, 4, position=position), progress=False)):
            assert_refused_before_any_forward(worded, call, PatchingError, f"reads position {position}, outside the "
                                              r"shortest prompt \(4 tokens\)")
    result = patch_heads(worded, clean, corrupted, LogitDiff(3, 4, position=3), progress=False)  # the last position: fine
    assert result.effect.shape[0] == 1


@pytest.mark.parametrize("tokens", [torch.tensor([[0, 4, 50]]), torch.tensor([[0, -1, 4]]), torch.tensor([[0.0, 4.0, 5.0]])])
def test_causal_trace_refuses_bad_token_tensors(worded, tokens):
    assert_refused_before_any_forward(worded, lambda: causal_trace(worded, tokens, [1], 3, noise=NoiseConfig(scale=0.1)),
                                      PatchingError, "prompt tokens must")


@pytest.mark.parametrize("field,value", [("pairs", ()), ("pairs", (("w1 w2",),)), ("pairs", (("w1", ""),)),
                                         ("jailbreak_templates", ()), ("controls", ("",)), ("few_shot", (("u",),))])
def test_an_empty_or_malformed_safety_suite_is_refused_when_built(field, value):
    with pytest.raises(PatchingError, match="SafetySuite"):
        construct_unchecked(SafetySuite, **{field: value})
    SafetySuite(few_shot=())  # no few-shot context is allowed


def test_find_safety_latents_refuses_a_suite_that_is_not_one(worded, sae):
    from patching.safety import find_safety_latents

    assert_refused_before_any_forward(worded, lambda: unchecked(find_safety_latents)(worded, sae, suite=[("a", "b")],
                                                                                     progress=False),
                                      PatchingError, "suite must be a SafetySuite")


@pytest.mark.parametrize("release,sae_id", [(["smollm2-135m-res"], "blocks.5.hook_resid_pre"),
                                            ("smollm2-135m-res", ["blocks.5.hook_resid_pre"]), (None, "x")])
def test_load_release_refuses_non_string_names_with_its_typed_error(release, sae_id):
    with pytest.raises(UnknownReleaseError, match="is not shipped with latentpatch; available"):
        unchecked(load_release)(release, sae_id)
