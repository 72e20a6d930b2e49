"""Attribution, steering with generation, and harvesting on the bridge backend, each against a
reference computed without the code under test: the Bridge's own full forward pass, a naive
greedy loop, transformers' hidden states, and (in the hooked suite) the hooked backend on the same
weights."""

from __future__ import annotations

import pytest
import torch

from patching import LogitDiff, Site, attribute_latents, generate_steered
from patching.model import tl_compat
from tests.conftest import make_sae
from tests.test_bridge import boot_tiny, tiny_hf_folder

METRIC = LogitDiff(answer=3, wrong=4)
CLEAN = torch.randint(3, 64, (1, 7), generator=torch.Generator().manual_seed(5))
CORRUPTED = CLEAN.clone()
CORRUPTED[0, 3] = (CLEAN[0, 3] + 13) % 61 + 3
SITE = Site(1)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return tiny_hf_folder(tmp_path_factory.mktemp("tiny-hf"), n_layers=3)


@pytest.fixture(scope="module")
def bridge(folder):
    return boot_tiny(folder).eval()


@pytest.fixture(scope="module")
def sae():
    return make_sae(32, 48, hook_name=SITE.hook_name, model_name="tiny", seed=4)


def test_run_blocks_from_a_layer_equals_the_full_forward(bridge):
    """The door's `run_blocks` on the Bridge (its blocks driven from the layer, `tl_bridge_blocks`)
    against the final residual of the Bridge's own forward of the real tokens."""
    with torch.no_grad():
        final, acts = tl_compat.run_until_end_with_cache(bridge, CLEAN, [SITE.hook_name])
        torch.testing.assert_close(tl_compat.run_blocks(bridge, acts[SITE.hook_name], 1), final, atol=1e-5, rtol=0)


def test_ig_with_many_steps_adds_up_to_the_exact_effect(bridge, sae):
    """Integrated gradients is complete: over every latent and error node of a site that carries the
    whole residual stream, the attributions add up to M(clean) - M(corrupted) (denoising the site at
    every position is the clean run), up to the midpoint rule's error."""
    result = attribute_latents(bridge, sae, CLEAN, CORRUPTED, METRIC, method="ig", steps=32, progress=False)
    total = (result.metric[0] - result.metric_corrupted[0]).sum().item()
    span = (result.metric_clean[0] - result.metric_corrupted[0]).item()
    assert total == pytest.approx(span, abs=0.02 * abs(span) + 1e-4)


def test_greedy_generation_on_the_bridge_equals_a_naive_argmax_loop(bridge, sae):
    """Steered and unsteered greedy continuations (the Bridge decodes without a key-value cache)
    against one full forward per new token, the steering vector added at the site by a plain hook."""
    out = generate_steered(bridge, sae, [5], CLEAN, max_new_tokens=4, coefficient=6.0)
    vector = 6.0 * sae.W_dec[5].detach() / sae.W_dec[5].detach().norm()
    for steered, tokens in ((False, out.unsteered_tokens), (True, out.steered_tokens)):
        expected = CLEAN.clone()
        hooks = [(SITE.hook_name, lambda x, hook: x + vector)] if steered else []
        for _ in range(4):
            with torch.no_grad():
                logits = bridge.run_with_hooks(expected, fwd_hooks=hooks)
            expected = torch.cat([expected, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
        assert torch.equal(tokens, expected), steered


def test_harvest_on_the_bridge_equals_transformers_hidden_states(folder, bridge):
    """Harvesting stops the Bridge's forward at the site; the reference is transformers' own
    hidden state entering decoder layer 1."""
    from transformers import AutoModelForCausalLM

    from training.activations.harvest import harvest

    reference = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, attn_implementation="eager")
    with torch.no_grad():
        hidden = reference(CLEAN, output_hidden_states=True).hidden_states[1]
    torch.testing.assert_close(harvest(bridge, SITE, CLEAN), hidden.reshape(-1, 32), atol=1e-5, rtol=0)


HOOKED = "converts the folder into a HookedTransformer (TransformerLens 3.x)"


@pytest.fixture(scope="module")
def hooked(folder):
    """The same weights on the hooked backend (only the hooked_only tests ask for it)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    hf_model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    return tl_compat.build_from_local_folder(folder, hf_model, AutoTokenizer.from_pretrained(folder), model_name="tiny",
                                             flags=dict.fromkeys(("fold_ln", "center_writing_weights", "center_unembed",
                                                                  "fold_value_biases"), False),
                                             n_layers=None, n_ctx=64, device="cpu", dtype=torch.float32).eval()


@pytest.mark.hooked_only(reason=HOOKED)
@pytest.mark.parametrize("method", ["atp", "ig"])
def test_attribution_equals_the_hooked_backend_on_the_same_weights(hooked, bridge, sae, method):
    ours = attribute_latents(bridge, sae, CLEAN, CORRUPTED, METRIC, method=method, steps=4, progress=False)
    theirs = attribute_latents(hooked, sae, CLEAN, CORRUPTED, METRIC, method=method, steps=4, progress=False)
    assert [u.label() for u in ours.units] == [u.label() for u in theirs.units]
    torch.testing.assert_close(ours.metric, theirs.metric, atol=2e-4, rtol=1e-4)


@pytest.mark.hooked_only(reason=HOOKED)
def test_self_repair_equals_the_hooked_backend(hooked, bridge):
    """Self-repair's direct and total effects and compensation on both backends, same weights."""
    from patching import self_repair

    ours, theirs = (self_repair(m, CLEAN, METRIC) for m in (bridge, hooked))
    assert ours.components == theirs.components
    for field in ("direct", "total", "compensation"):
        torch.testing.assert_close(getattr(ours, field), getattr(theirs, field), atol=2e-4, rtol=1e-4, msg=field)
