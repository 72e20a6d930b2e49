"""Attention heads as sites and units: equal to TransformerLens's patching functions and to a
naive one-forward-per-patch hook reference, with learned and rotary positions and grouped-query
attention."""

from __future__ import annotations

import pytest
import torch

from patching import Site, SiteError
from patching.errors import PatchingError
from patching.model import tl_compat
from patching.sweep import LogitDiff, PatchUnit, UnitPart, patch_heads, patch_residual
from tests.conftest import learned_or_rotary_gqa

METRIC = LogitDiff(answer=3, wrong=4)


@pytest.fixture(scope="module", params=["learned", "rotary_gqa"])
def model(request):
    return learned_or_rotary_gqa(request.param)


@pytest.fixture(scope="module")
def prompts():
    g = torch.Generator().manual_seed(5)
    clean = torch.randint(0, 50, (1, 8), generator=g)
    corrupted = clean.clone()
    corrupted[0, 2] = (corrupted[0, 2] + 9) % 50
    corrupted[0, 5] = (corrupted[0, 5] + 3) % 50
    return clean, corrupted


def tl_metric(logits):
    return logits[0, -1, 3] - logits[0, -1, 4]


# TransformerLens's hook names and layouts, written out here rather than read from Site (whose
# hook_name and select are under test): q/k/v/z are (batch, pos, head, d_head), the pattern
# (batch, head, query_pos, key_pos); head_out is patched through z.
TL_HOOKS = {"q": "attn.hook_q", "k": "attn.hook_k", "v": "attn.hook_v", "z": "attn.hook_z", "head_out": "attn.hook_z",
            "pattern": "attn.hook_pattern", "resid_pre": "hook_resid_pre"}


def _copy(x, source, site, pos):
    """x with `site`'s slice at positions `pos` taken from `source`."""
    if site.kind == "pattern":
        x[:, site.head, pos] = source[:, site.head, pos]
    elif site.kind in ("q", "k", "v", "z", "head_out"):
        head = slice(None) if site.head is None else site.head
        x[:, pos, head] = source[:, pos, head]
    else:
        x[:, pos] = source[:, pos]


def naive_value(model, base, source, unit):
    """One full forward with the unit's parts copied from the source run by hooks."""
    _, cache = model.run_with_cache(source)
    hooks = []
    for part in unit.parts:
        site = part.site
        name = f"blocks.{site.layer}.{TL_HOOKS[site.kind]}"

        def hook(x, hook, site=site, part=part, name=name):
            x = x.clone()
            _copy(x, cache[name], site, slice(None) if part.positions is None else list(part.positions))
            return x

        hooks.append((name, hook))
    with torch.inference_mode():
        return tl_metric(model.run_with_hooks(base, fwd_hooks=hooks)).item()


def test_head_sweeps_equal_transformer_lens(model, prompts):
    from transformer_lens import patching as tl_patching

    clean, corrupted = prompts
    _, clean_cache = model.run_with_cache(clean)
    n_layers, n_heads = model.cfg.n_layers, model.cfg.n_heads
    cases = [("z", "all", tl_patching.get_act_patch_attn_head_out_all_pos, (n_layers, n_heads)),
             ("z", "position", tl_patching.get_act_patch_attn_head_out_by_pos, (n_layers, 8, n_heads)),
             ("pattern", "all", tl_patching.get_act_patch_attn_head_pattern_all_pos, (n_layers, n_heads)),
             ("q", "all", tl_patching.get_act_patch_attn_head_q_all_pos, (n_layers, n_heads))]
    for kind, by, reference_fn, shape in cases:
        ours = patch_heads(model, clean, corrupted, METRIC, kind=kind, by=by, progress=False, batch_size=5)
        with torch.inference_mode():
            reference = reference_fn(model, corrupted, clean_cache, tl_metric)
        torch.testing.assert_close(ours.metric[0].reshape(shape), reference, atol=1e-5, rtol=0, msg=f"{kind} {by}")
        assert ours.provenance["patched_rows_evaluated"] < ours.metric.numel() + 1


@pytest.mark.parametrize("direction", ["denoise", "noise"])
def test_every_head_kind_equals_naive_hooks(model, prompts, direction):
    clean, corrupted = prompts
    base, source = (corrupted, clean) if direction == "denoise" else (clean, corrupted)
    kv = tl_compat.n_kv_heads(model)
    units = [PatchUnit((UnitPart(Site(1, "k", head=kv - 1), "raw", None),)),
             PatchUnit((UnitPart(Site(0, "v", head=0), "raw", (2,)),)),
             PatchUnit((UnitPart(Site(2, "head_out", head=1), "raw", (5, 7)),)),
             PatchUnit((UnitPart(Site(1, "pattern", head=2), "raw", (6,)),)),
             PatchUnit((UnitPart(Site(0, "z"), "raw", (2,)),)),  # every head concatenated
             PatchUnit((UnitPart(Site(0, "q", head=3), "raw", None), UnitPart(Site(2, "z", head=0), "raw", None),
                        UnitPart(Site(1, "resid_pre"), "raw", (5,))))]  # a joint set across sites and layers
    ours = patch_residual(model, clean, corrupted, METRIC, direction=direction, units=units, progress=False)
    for j, unit in enumerate(units):
        assert ours.metric[0, j].item() == pytest.approx(naive_value(model, base, source, unit), abs=1e-5), unit.label()


def test_gqa_key_value_heads_are_their_own_count():
    model = tl_compat.random_model(n_layers=1, n_key_value_heads=2)
    assert Site(0, "k", head=1).check(model).n_heads(model) == 2
    assert Site(0, "z", head=3).check(model).n_heads(model) == 4
    with pytest.raises(SiteError, match=r"key/value heads 0\.\.1"):
        Site(0, "v", head=2).check(model)
    assert Site(0, "k").width(model) == 2 * model.cfg.d_head


@pytest.mark.parametrize("make,pattern", [
    (lambda: Site(0, "resid_pre", head=1), "has no heads"),
    (lambda: Site(0, "pattern"), "needs head"),
    (lambda: Site(0, "z", head=-1), "non-negative"),
])
def test_bad_head_sites_raise(make, pattern):
    with pytest.raises(SiteError, match=pattern):
        make()


def test_bad_head_inputs_raise_before_any_forward(model, prompts):
    from tests.hooks_snapshot import CountingHook

    clean, corrupted = prompts
    counter = CountingHook(model)
    try:
        with pytest.raises(PatchingError, match="per-head kind"):
            patch_heads(model, clean, corrupted, METRIC, kind="resid_pre", progress=False)
        with pytest.raises(SiteError, match="out of range"):
            patch_residual(model, clean, corrupted, METRIC, units=[PatchUnit((UnitPart(Site(0, "z", head=9), "raw", None),))],
                           progress=False)
    finally:
        counter.remove()
    assert counter.count == 0


def test_hook_z_sae_splices_patches_and_attributes(model, prompts):
    """An attention-output SAE on hook_z (every head concatenated, as SAELens stores them)."""
    from patching import attribute_latents, patch_latents, splice
    from tests.conftest import make_sae

    clean, corrupted = prompts
    site = Site.from_hook_name("blocks.1.attn.hook_z")
    assert site == Site(1, "z") and site.width(model) == model.cfg.n_heads * model.cfg.d_head
    sae = make_sae(site.width(model), 24, hook_name=site.hook_name, model_name=model.cfg.model_name, seed=2)
    with torch.inference_mode():
        plain = model(clean)
        with splice(model, sae):
            spliced = model(clean)
    assert torch.equal(plain, spliced)  # error-term splice without edits is the identity
    # every latent and the error node at a position is the whole z there (every head)
    units = [PatchUnit((UnitPart(site, "latent", (p,)), UnitPart(site, "error", (p,)))) for p in (2, 5, 7)]
    ours = patch_latents(model, sae, clean, corrupted, METRIC, units=units, progress=False)
    raw = patch_residual(model, clean, corrupted, METRIC, units=[PatchUnit((UnitPart(site, "raw", (p,)),)) for p in (2, 5, 7)],
                         progress=False)
    torch.testing.assert_close(ours.metric, raw.metric, atol=1e-5, rtol=0)
    estimate = attribute_latents(model, sae, clean, corrupted, METRIC, progress=False)
    assert len(estimate.units) > 0 and torch.isfinite(estimate.effect).all()
