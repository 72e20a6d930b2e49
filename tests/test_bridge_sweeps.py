"""The sweep engine on the bridge backend (its full-row path: every patched row reruns the prompt,
entering its first patched layer with the cached residual), against two independent references:
one naive `run_with_hooks` forward of the Bridge per patch, and the hooked backend's engine on the
same weights (a HookedTransformer converted from the same Hugging Face folder)."""

from __future__ import annotations

import pytest
import torch

from patching import LogitDiff, Site, patch_heads, patch_latents, patch_residual
from patching.model import tl_compat
from tests.conftest import make_sae
from tests.test_bridge import boot_tiny, tiny_hf_folder

METRIC = LogitDiff(answer=3, wrong=4)
CLEAN = torch.randint(3, 64, (1, 7), generator=torch.Generator().manual_seed(11))
CORRUPTED = CLEAN.clone()
CORRUPTED[0, 2] = (CLEAN[0, 2] + 17) % 61 + 3
CORRUPTED[0, 4] = (CLEAN[0, 4] + 5) % 61 + 3


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """A tiny random Llama (rotary, RMSNorm, gated SiLU MLP, 2 key/value heads for 4 query heads)."""
    return tiny_hf_folder(tmp_path_factory.mktemp("tiny-hf"), n_layers=3)


@pytest.fixture(scope="module")
def bridge(folder):
    return boot_tiny(folder).eval()


def naive(bridge, name, write):
    """The metric of one forward of the corrupted prompt with `write(activation)` at hook `name`."""
    with torch.no_grad():
        logits = bridge.run_with_hooks(CORRUPTED, fwd_hooks=[(name, lambda x, hook: write(x))])
    return (logits[0, -1, 3] - logits[0, -1, 4]).item()


def test_residual_trace_matches_one_hooked_forward_per_patch(bridge):
    result = patch_residual(bridge, CLEAN, CORRUPTED, METRIC, progress=False)
    _, cache = bridge.run_with_cache(CLEAN)
    n = CLEAN.shape[1]
    for layer in range(3):
        name = Site(layer).hook_name
        for position in range(n):
            def put(x, position=position, name=name):
                x = x.clone()
                x[:, position] = cache[name][:, position]
                return x
            assert result.metric[0, layer * n + position].item() == pytest.approx(naive(bridge, name, put), abs=1e-4)


def test_head_z_sweep_matches_one_hooked_forward_per_head(bridge):
    result = patch_heads(bridge, CLEAN, CORRUPTED, METRIC, kind="z", progress=False)
    _, cache = bridge.run_with_cache(CLEAN)
    assert result.metric.shape == (1, 3 * 4)
    for layer in range(3):
        name = f"blocks.{layer}.attn.hook_z"
        for head in range(4):
            def put(x, head=head, name=name):
                x = x.clone()
                x[:, :, head] = cache[name][:, :, head]
                return x
            assert result.metric[0, layer * 4 + head].item() == pytest.approx(naive(bridge, name, put), abs=1e-4)


def test_batch_size_does_not_change_bridge_results(bridge):
    """Full rows share a batch: one row per forward and everything at once agree."""
    one = patch_residual(bridge, CLEAN, CORRUPTED, METRIC, batch_size=1, progress=False)
    many = patch_residual(bridge, CLEAN, CORRUPTED, METRIC, progress=False)
    torch.testing.assert_close(one.metric, many.metric, atol=1e-5, rtol=0)


@pytest.mark.hooked_only(reason="converts the folder into a HookedTransformer (TransformerLens 3.x)")
def test_bridge_sweeps_equal_the_hooked_backend_on_the_same_weights(folder, bridge):
    """The same sweeps on a HookedTransformer built from the same folder: the hooked engine's
    shortcuts (start_at_layer, key/value prefixes) against the Bridge's full rows."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from patching.model import tl_compat

    hf_model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    hooked = tl_compat.build_from_local_folder(folder, hf_model, AutoTokenizer.from_pretrained(folder), model_name="tiny",
                                               flags={"fold_ln": False, "center_writing_weights": False,
                                                      "center_unembed": False, "fold_value_biases": False},
                                               n_layers=None, n_ctx=64, device="cpu", dtype=torch.float32).eval()
    sae = make_sae(32, 48, hook_name=Site(1).hook_name, model_name="tiny", seed=2)
    for run in (lambda m: patch_residual(m, CLEAN, CORRUPTED, METRIC, progress=False),
                lambda m: patch_heads(m, CLEAN, CORRUPTED, METRIC, kind="v", by="position", progress=False),
                lambda m: patch_latents(m, sae, CLEAN, CORRUPTED, METRIC, units="latent_position", progress=False)):
        ours, theirs = run(bridge), run(hooked)
        assert [u.label() for u in ours.units] == [u.label() for u in theirs.units]
        torch.testing.assert_close(ours.metric, theirs.metric, atol=2e-4, rtol=1e-4)
        torch.testing.assert_close(ours.effect, theirs.effect, atol=2e-3, rtol=1e-3)


FACT = ("The Eiffel Tower is located in the city of", "The Colosseum is located in the city of", " Paris", " Rome")


def fact_tokens(model):
    clean, corrupted = (model.to_tokens(text) for text in FACT[:2])
    answer, wrong = model.to_single_token(FACT[2]), model.to_single_token(FACT[3])
    return clean, corrupted, LogitDiff(answer, wrong), answer, wrong


@pytest.fixture(scope="module")
def bridge_4l():
    """The default model cut to 4 layers on the Bridge (one load for this module's tests)."""
    from patching import load_model

    return load_model(n_layers=4, backend="bridge")


@pytest.mark.default_model
def test_default_model_residual_trace_on_the_bridge_matches_naive_hooks(bridge_4l):
    """The default model cut to 4 layers, booted on the Bridge (in either suite): the engine's trace at
    two layers and three positions (the subject's, one after it, the last) against one run_with_hooks
    forward per (layer, position) (the Bridge's run_with_hooks costs seconds a call on a busy machine)."""
    bridge = bridge_4l
    clean, corrupted, metric, answer, wrong = fact_tokens(bridge)
    n = clean.shape[1]
    positions = [int(torch.nonzero(clean[0] != corrupted[0])[0]), n - 3, n - 1]
    result = patch_residual(bridge, clean, corrupted, metric, layers=[1, 3], positions=positions, progress=False)
    _, cache = bridge.run_with_cache(clean)
    for i, layer in enumerate([1, 3]):
        name = Site(layer).hook_name
        for j, position in enumerate(positions):
            def put(x, hook, position=position, name=name):
                x = x.clone()
                x[:, position] = cache[name][:, position]
                return x
            with torch.no_grad():
                logits = bridge.run_with_hooks(corrupted, fwd_hooks=[(name, put)])
            expected = (logits[0, -1, answer] - logits[0, -1, wrong]).item()
            assert result.metric[0, i * len(positions) + j].item() == pytest.approx(expected, abs=2e-4)


@pytest.mark.default_model
@pytest.mark.hooked_only(reason="compares against the hooked backend (HookedTransformer: TransformerLens 3.x)")
def test_default_model_sweeps_agree_between_backends(default_model_4l, bridge_4l):
    """The Eiffel residual trace and head-z sweep on both backends (4 layers, same weights)."""
    bridge = bridge_4l
    clean, corrupted, metric, _, _ = fact_tokens(bridge)
    for run in (lambda m: patch_residual(m, clean, corrupted, metric, progress=False),
                lambda m: patch_heads(m, clean, corrupted, metric, kind="z", layers=[0, 3], progress=False)):
        ours, theirs = run(bridge), run(default_model_4l)
        torch.testing.assert_close(ours.metric, theirs.metric, atol=5e-4, rtol=1e-4)


@pytest.mark.default_model
@pytest.mark.hooked_only(reason="compares against the hooked backend (HookedTransformer: TransformerLens 3.x)")
def test_default_model_cached_steered_generation_agrees_between_backends(default_model_4l, bridge_4l):
    """KV-cached greedy generation (the Bridge's through `tl_bridge_decode`) under a steering hook on
    `blocks.2.hook_resid_pre` at the prompt's last position, on both backends: the same tokens, and
    every step's logits within 1e-4."""
    from patching.splice.generate import Interventions, generate

    clean, *_ = fact_tokens(bridge_4l)
    last = clean.shape[1] - 1
    vector = 4.0 * torch.randn(bridge_4l.cfg.d_model, generator=torch.Generator().manual_seed(0))

    def steer(x, step):
        return x + vector * torch.tensor([p == last for p in step.positions], dtype=x.dtype)[:, None]

    out = {}
    for name, model in (("bridge", bridge_4l), ("hooked", default_model_4l)):
        logits = []
        with torch.no_grad():
            tokens = generate(model, clean, 6, interventions=Interventions(hooks={Site(2): steer}),
                              observe=lambda step, x: logits.append(x))
        out[name] = tokens, torch.stack(logits)
    assert torch.equal(out["bridge"][0], out["hooked"][0])
    torch.testing.assert_close(out["bridge"][1], out["hooked"][1], atol=1e-4, rtol=0)


@pytest.mark.default_model
@pytest.mark.hooked_only(reason="compares against the hooked backend (HookedTransformer: TransformerLens 3.x)")
def test_default_model_cached_generation_inside_a_bound_prefix_agrees_between_backends(default_model_4l, bridge_4l):
    """Inside `bound_prefix` (the prompt's first 4 tokens), KV-cached greedy generation under a
    steering hook at the prompt's last absolute position: the Bridge's cache starts from the bound
    prefix (`tl_bridge_decode`), the hooked binding fills its empty cache with it; the same tokens,
    every step's logits within 1e-4, and the same absolute positions seen by the hook."""
    from patching.splice.generate import Interventions, generate

    clean, *_ = fact_tokens(bridge_4l)
    last = clean.shape[1] - 1
    vector = 4.0 * torch.randn(bridge_4l.cfg.d_model, generator=torch.Generator().manual_seed(0))
    out = {}
    for name, model in (("bridge", bridge_4l), ("hooked", default_model_4l)):
        logits, seen = [], []

        def steer(x, step):
            seen.append(tuple(step.positions))
            return x + vector * torch.tensor([p == last for p in step.positions], dtype=x.dtype)[:, None]

        with torch.no_grad(), tl_compat.bound_prefix(model, clean[:, :4]):
            tokens = generate(model, clean[:, 4:], 6, interventions=Interventions(hooks={Site(2): steer}),
                              observe=lambda step, x: logits.append(x))
        out[name] = tokens, torch.stack(logits), seen
    assert torch.equal(out["bridge"][0], out["hooked"][0])
    torch.testing.assert_close(out["bridge"][1], out["hooked"][1], atol=1e-4, rtol=0)
    assert out["bridge"][2] == out["hooked"][2] and out["bridge"][2][1] == (clean.shape[1],)  # one position a step


@pytest.mark.default_model
@pytest.mark.hooked_only(reason="compares against the hooked backend (HookedTransformer: TransformerLens 3.x)")
def test_default_model_latent_sweep_and_steering_agree_between_backends():
    """The shipped layer-5 SAE on the default model cut to 6 layers: the Eiffel latent sweep (all
    latents at each position) and a steered greedy continuation on both backends."""
    from patching import generate_steered, load_model
    from sae import load_release

    sae = load_release("smollm2-135m-res", "blocks.5.hook_resid_pre")
    hooked, bridge = (load_model(n_layers=6, backend=backend) for backend in ("hooked", "bridge"))
    clean, corrupted, metric, _, _ = fact_tokens(bridge)
    ours, theirs = (patch_latents(m, sae, clean, corrupted, metric, units="position", progress=False) for m in (bridge, hooked))
    assert [u.label() for u in ours.units] == [u.label() for u in theirs.units]
    torch.testing.assert_close(ours.metric, theirs.metric, atol=5e-4, rtol=1e-4)
    ours, theirs = (generate_steered(m, sae, [100], clean, max_new_tokens=4, coefficient=60.0) for m in (bridge, hooked))
    assert torch.equal(ours.steered_tokens, theirs.steered_tokens)
    assert torch.equal(ours.unsteered_tokens, theirs.unsteered_tokens)
    assert not torch.equal(ours.steered_tokens, ours.unsteered_tokens)  # the steering changed the text
