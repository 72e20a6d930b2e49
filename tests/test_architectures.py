"""Every common architecture, checked: the engine's invariants on tiny random TransformerLens models.

Each architecture touches something latentpatch relies on — starting mid-model from a cached
residual, reusing a prefix's keys and values, steering through `generate`'s cache — so each is
built here (random weights, d_model 16) and run through the same invariants.
"""

from __future__ import annotations

import pytest
import torch

from patching import LogitDiff, PatchUnit, Site, UnitPart, patch_latents, patch_residual, steer
from patching.attribution.estimators import attribute_latents
from patching.model import tl_compat
from tests.conftest import make_sae
from tests.hooks_snapshot import assert_splice_identity
from tests.test_patching import naive_unit_value
from training.activations.harvest import harvest

SITE = Site(1)
VOCAB = 50
METRIC = LogitDiff(answer=[3, 5], wrong=[4, 6])

# HookedTransformerConfig overrides (field names as in TransformerLens 3.9's hooked_transformer_config.py).
ARCHITECTURES: dict[str, dict] = {
    # Learned absolute positions, LayerNorm, GELU.
    "gpt2": dict(positional_embedding_type="standard", normalization_type="LN", act_fn="gelu"),
    # Rotary on every head dimension, RMSNorm, gated SiLU MLP.
    "llama": dict(positional_embedding_type="rotary", normalization_type="RMS", act_fn="silu", gated_mlp=True),
    # Rotary on half of each head, attention and MLP both reading the block's input.
    "neox": dict(positional_embedding_type="rotary", rotary_dim=2, parallel_attn_mlp=True, normalization_type="LN",
                 act_fn="gelu"),
    # Two key/value heads shared by four query heads.
    "gqa": dict(positional_embedding_type="rotary", normalization_type="RMS", act_fn="silu", gated_mlp=True,
                n_key_value_heads=2),
    # Soft-capped attention scores and logits (caps small enough to bite on random weights), local
    # (window 3) and global layers alternating, norms before and after each sublayer.
    "gemma2": dict(positional_embedding_type="rotary", normalization_type="RMS", act_fn="gelu_pytorch_tanh",
                   gated_mlp=True, n_key_value_heads=2, attn_scores_soft_cap=0.5, output_logits_soft_cap=1.5,
                   use_local_attn=True, window_size=3, attn_types=["local", "global", "local"],
                   use_normalization_before_and_after=True),
    # RMSNorm on queries and keys, local and global layers.
    "gemma3": dict(positional_embedding_type="rotary", normalization_type="RMS", act_fn="gelu_pytorch_tanh",
                   gated_mlp=True, n_key_value_heads=2, use_qk_norm=True, use_local_attn=True, window_size=3,
                   attn_types=["local", "global", "local"], use_normalization_before_and_after=True),
}
NAMES = list(ARCHITECTURES)


def build(name: str, **extra):
    model = tl_compat.random_model(n_layers=3, d_vocab=VOCAB, n_ctx=32, **{**ARCHITECTURES[name], **extra})
    model.eval()
    return model


@pytest.fixture(scope="module")
def zoo():
    """`{name: (model, sae at SITE)}`, built once for the module."""
    built = {}
    for seed, name in enumerate(NAMES):
        model = build(name)
        built[name] = model, make_sae(16, 24, hook_name=SITE.hook_name, model_name=model.cfg.model_name, seed=seed)
    return built


@pytest.fixture(scope="module")
def prompts():
    g = torch.Generator().manual_seed(7)
    clean = torch.randint(0, VOCAB, (2, 7), generator=g)
    corrupted = clean.clone()
    corrupted[:, 2] = (corrupted[:, 2] + 11) % VOCAB
    corrupted[1, 5] = (corrupted[1, 5] + 5) % VOCAB
    return clean, corrupted


@pytest.mark.parametrize("name", NAMES)
def test_configuration_is_the_architecture_it_claims(zoo, name):
    """A typo'd override would silently build the default model: read each feature back."""
    cfg = zoo[name][0].cfg
    for field, value in ARCHITECTURES[name].items():
        assert getattr(cfg, field) == value, field


@pytest.mark.parametrize("name", NAMES)
def test_splice_identity_is_bit_exact(zoo, prompts, name):
    model, sae = zoo[name]
    clean, _ = prompts
    assert_splice_identity(model, sae, clean)


@pytest.mark.parametrize("direction", ["denoise", "noise"])
@pytest.mark.parametrize("unit", ["latent_position", "error"])
@pytest.mark.parametrize("name", NAMES)
def test_sweep_matches_naive_reference(zoo, prompts, name, unit, direction):
    model, sae = zoo[name]
    clean, corrupted = prompts
    result = patch_latents(model, sae, clean, corrupted, METRIC, direction=direction, units=unit, progress=False)
    base, source = (corrupted, clean) if direction == "denoise" else (clean, corrupted)
    assert len(result.units) > 0
    # First, middle and last unit, on alternating rows: each naive value costs two forwards.
    for i, j in enumerate((0, len(result.units) // 2, len(result.units) - 1)):
        expected = naive_unit_value(model, sae, base, source, result.units[j], i % 2)
        assert result.metric[i % 2, j].item() == pytest.approx(expected, abs=1e-4)


def naive_raw_value(model, base, source, unit, i, metric=METRIC):
    """Copy the unit's raw dimensions from the source run into the base run, one full forward."""
    _, cache = model.run_with_cache(source[i : i + 1])

    def make_hook(part):
        def hook(x, hook):
            x = x.clone()
            positions = list(part.positions) if part.positions is not None else list(range(x.shape[1]))
            dims = list(part.latents) if part.latents is not None else list(range(x.shape[2]))
            for p in positions:
                x[0, p, dims] = cache[part.site.hook_name][0, p, dims]
            return x
        return hook

    with torch.inference_mode():
        logits = model.run_with_hooks(base[i : i + 1], fwd_hooks=[(p.site.hook_name, make_hook(p)) for p in unit.parts])
    return metric(logits[:, -1], torch.tensor([i]))[0].item()


@pytest.mark.parametrize("direction", ["denoise", "noise"])
@pytest.mark.parametrize("name", NAMES)
def test_raw_residual_and_neuron_units_match_naive_reference(zoo, prompts, name, direction):
    model, _ = zoo[name]
    clean, corrupted = prompts
    neurons = Site(1, "mlp_post")
    units = [PatchUnit((UnitPart(Site(1), "raw", (2,), None),)),
             PatchUnit((UnitPart(neurons, "raw", None, (0, 5, 9)),)),
             PatchUnit((UnitPart(Site(2), "raw", (2, 5), (1, 3)), UnitPart(neurons, "raw", (5,), None)))]
    result = patch_residual(model, clean, corrupted, METRIC, units=units, direction=direction, progress=False)
    base, source = (corrupted, clean) if direction == "denoise" else (clean, corrupted)
    for j, unit in enumerate(units):
        for i in range(2):
            assert result.metric[i, j].item() == pytest.approx(naive_raw_value(model, base, source, unit, i), abs=1e-4)


def affine_toy(name: str):
    """The architecture made affine downstream of SITE: no norms, zero queries and keys (uniform
    attention over each head's allowed keys, local windows included), zero MLP input weights. The
    final-logit soft-cap is a tanh, so Gemma 2's is switched off: there AtP is exact only without it."""
    extra = dict(normalization_type=None)
    if ARCHITECTURES[name].get("output_logits_soft_cap"):
        extra["output_logits_soft_cap"] = -1.0
    model = build(name, **extra)
    with torch.no_grad():
        for block in model.blocks:
            for param in ("W_Q", "W_K", "_W_K", "b_Q", "b_K", "_b_K"):
                if isinstance(getattr(block.attn, param, None), torch.nn.Parameter):
                    getattr(block.attn, param).zero_()
            for param in ("W_in", "W_gate"):
                if hasattr(block.mlp, param):
                    getattr(block.mlp, param).zero_()
    return model


@pytest.mark.parametrize("direction", ["denoise", "noise"])
@pytest.mark.parametrize("name", NAMES)
def test_atp_is_exact_on_the_affine_toy(prompts, name, direction):
    model = affine_toy(name)
    saes = {SITE: make_sae(16, 32, hook_name=None, model_name=None, seed=4),
            Site(2, "resid_post"): make_sae(16, 32, hook_name=None, model_name=None, seed=5)}
    clean, corrupted = prompts
    estimate = attribute_latents(model, saes, clean, corrupted, METRIC, direction=direction, progress=False)
    exact = patch_latents(model, saes, clean, corrupted, METRIC, direction=direction, units=estimate.units,
                          progress=False)
    assert any(u.kind == "error" for u in estimate.units) and any(u.site == SITE for u in estimate.units)
    torch.testing.assert_close(estimate.metric, exact.metric, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(estimate.effect, exact.effect, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("site", [Site(1), Site(1, "resid_mid"), Site(1, "mlp_post"), Site(2, "attn_out")],
                         ids=str)
@pytest.mark.parametrize("name", NAMES)
def test_harvest_equals_the_full_forward_activation(zoo, prompts, name, site):
    model, _ = zoo[name]
    clean, _ = prompts
    if site.hook_name not in tl_compat.hook_names(model):
        pytest.skip(f"{name} has no {site.hook_name}")  # parallel attention and MLP: no resid_mid
    with torch.inference_mode():
        _, cache = model.run_with_cache(clean, names_filter=[site.hook_name])
    assert torch.equal(harvest(model, site, clean), cache[site.hook_name].flatten(0, 1).float())


@pytest.mark.parametrize("method", ["add", "clamp"])
@pytest.mark.parametrize("name", NAMES)
def test_steered_generation_with_the_cache_equals_without(zoo, prompts, name, method):
    model, sae = zoo[name]
    clean, _ = prompts
    n_new, prompt_length = 8, clean.shape[1]
    with steer(model, sae, [1, 7], method=method, coefficient=4.0, positions="generated") as state:
        cached = state.generate(clean, max_new_tokens=n_new, use_kv_cache=True)
        uncached = state.generate(clean, max_new_tokens=n_new, use_kv_cache=False)
    assert torch.equal(cached, uncached)
    # Both equal the greedy tokens of one full forward steered at the same absolute positions.
    with steer(model, sae, [1, 7], method=method, coefficient=4.0, positions="generated",
               prompt_length=prompt_length), torch.inference_mode():
        logits = model(cached)
    assert torch.equal(logits[:, prompt_length - 1 : -1].argmax(-1), cached[:, prompt_length:])


def test_transformer_lens_cached_generate_is_still_wrong_for_learned_positions(zoo, prompts):
    """Why `tl_compat.generate` runs learned-position models uncached. On TransformerLens 3.9 the
    cached loop gives the new token at position p (after the first) the embedding W_pos[2p]; when
    this test fails, TransformerLens has fixed it and the workaround can go."""
    model, _ = zoo["gpt2"]
    clean, _ = prompts
    used: list[list[int]] = []

    def record(x):
        used.append([int((model.W_pos - x[0, p]).abs().sum(-1).argmin()) for p in range(x.shape[1])])

    with tl_compat.hooks(model, [("hook_pos_embed", record)]):
        raw = model.generate(clean[:1], max_new_tokens=3, use_past_kv_cache=True, do_sample=False, stop_at_eos=False,
                             verbose=False)
    n = clean.shape[1]
    assert [rows[-1] for rows in used] == [n - 1, 2 * n, 2 * (n + 1)]
    uncached = model.generate(clean[:1], max_new_tokens=3, use_past_kv_cache=False, do_sample=False, stop_at_eos=False,
                              verbose=False)
    assert not torch.equal(raw, uncached)
    assert torch.equal(tl_compat.generate(model, clean[:1], max_new_tokens=3, use_past_kv_cache=True), uncached)


# SAE architectures: the model architectures above use ReLU SAEs; TopK (the per-token selection the
# trainer's `topk` objective trains) and JumpReLU (SAELens's form of BatchTopK) go through the same
# splice, sweep and attribution code on one model.
SAE_KINDS = {"topk": dict(architecture="topk", k=5), "jumprelu": dict(architecture="jumprelu")}


@pytest.mark.parametrize("direction", ["denoise", "noise"])
@pytest.mark.parametrize("sae_kind", list(SAE_KINDS))
def test_patching_and_atp_run_through_topk_and_jumprelu_saes(prompts, sae_kind, direction):
    """Splice identity, the sweep against the naive reference, and AtP exact on the affine toy.

    AtP never differentiates the TopK selection or the JumpReLU step: the splice's gradient probes
    sit on the latents themselves (`out = x + decode_delta(z' + dz, z)`), the encoder's output
    cancels out of the gradient, and decoding is linear in z, so `(z_source - z_base) · dM/dz` is
    exact wherever the model is affine downstream, as for a ReLU SAE. The selection enters only
    through the two runs' latent values, which the encoder computes exactly. What AtP cannot see is
    that patching one TopK latent leaves the others as they were (k+1 active latents at that
    position): exact patching does the same, so the two agree.
    """
    clean, corrupted = prompts
    model = build("llama")
    sae = make_sae(16, 24, hook_name=SITE.hook_name, model_name=model.cfg.model_name, seed=3, **SAE_KINDS[sae_kind])
    assert_splice_identity(model, sae, clean)
    result = patch_latents(model, sae, clean, corrupted, METRIC, direction=direction, units="latent_position",
                           progress=False)
    base, source = (corrupted, clean) if direction == "denoise" else (clean, corrupted)
    assert len(result.units) > 0
    for i, j in enumerate((0, len(result.units) // 2, len(result.units) - 1)):
        expected = naive_unit_value(model, sae, base, source, result.units[j], i % 2)
        assert result.metric[i % 2, j].item() == pytest.approx(expected, abs=1e-4)
    toy = affine_toy("llama")
    saes = {SITE: make_sae(16, 32, hook_name=None, model_name=None, seed=4, **SAE_KINDS[sae_kind]),
            Site(2, "resid_post"): make_sae(16, 32, hook_name=None, model_name=None, seed=5, **SAE_KINDS[sae_kind])}
    estimate = attribute_latents(toy, saes, clean, corrupted, METRIC, direction=direction, progress=False)
    exact = patch_latents(toy, saes, clean, corrupted, METRIC, direction=direction, units=estimate.units,
                          progress=False)
    assert any(u.kind == "latent" for u in estimate.units)
    torch.testing.assert_close(estimate.metric, exact.metric, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(estimate.effect, exact.effect, atol=1e-4, rtol=1e-4)
