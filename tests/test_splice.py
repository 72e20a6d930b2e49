"""The splicer: exact identity, exact edits, gradient nodes, validation and hook hygiene."""

from __future__ import annotations

import pytest
import torch

from patching.splice.splicer import SpliceChecks
from patching import LatentEdit, Site, SiteError, SpliceError, splice
from patching.model import tl_compat
from sae import NotAnSAEError
from tests.conftest import construct_unchecked, make_sae
from tests.hooks_snapshot import CountingHook, snapshot


def site_input(model, site: Site, tokens: torch.Tensor) -> torch.Tensor:
    _, cache = model.run_with_cache(tokens, names_filter=site.hook_name)
    return cache[site.hook_name]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("cache", [False, True])
def test_splice_without_edit_is_exact_identity(dtype, cache, tiny_tokens):
    model = tl_compat.random_model(n_layers=3, dtype=dtype)
    sae = make_sae(16, 40, hook_name="blocks.1.hook_resid_mid", model_name=model.cfg.model_name)
    reference = model(tiny_tokens)
    with splice(model, sae, cache=cache) as state:
        assert torch.equal(model(tiny_tokens), reference)
    assert (Site(1, "resid_mid") in state.records) == cache


def test_known_edit_changes_only_its_position_by_exact_amount(tiny_model, tiny_sae, tiny_tokens):
    site, j, v, p = Site(1), 7, 3.25, 5
    x = site_input(tiny_model, site, tiny_tokens)
    z = tiny_sae.encode(x)
    seen = {}
    with splice(tiny_model, tiny_sae, edits=[LatentEdit(site, j, v, positions=p)]):
        with tiny_model.hooks(fwd_hooks=[(site.hook_name, lambda out, hook: seen.update(out=out.clone()))]):
            tiny_model(tiny_tokens)
    expected = x.clone()
    expected[:, p] = x[:, p] + (v - z[:, p, j])[:, None] * tiny_sae.W_dec[j]
    assert torch.equal(seen["out"], expected)
    mask = torch.ones(x.shape[1], dtype=torch.bool)
    mask[p] = False
    assert torch.equal(seen["out"][:, mask], x[:, mask])


def test_edit_modes_batch_rows_and_tensor_values(tiny_model, tiny_sae, tiny_tokens):
    site = Site(1)
    z = tiny_sae.encode(site_input(tiny_model, site, tiny_tokens))
    values = torch.tensor([[1.0, 2.0]])  # broadcast over the two selected positions
    edits = [LatentEdit(site, [2, 4], 2.0, mode="scale", batch=0),
             LatentEdit(site, 9, values.T, mode="add", positions=[1, 3], batch=[1])]
    with splice(tiny_model, tiny_sae, edits=edits, cache=True) as state:
        tiny_model(tiny_tokens)
    edited = state.records[site].edited_latents
    expected = z.clone()
    expected[0, :, [2, 4]] *= 2
    expected[1, [1, 3], 9] += torch.tensor([1.0, 2.0])
    assert torch.equal(edited, expected)


def test_bottleneck_runs_the_model_on_the_reconstruction(tiny_model, tiny_sae, tiny_tokens):
    site = Site(1)
    replace = lambda out, hook: tiny_sae.decode(tiny_sae.encode(out))  # noqa: E731
    with tiny_model.hooks(fwd_hooks=[(site.hook_name, replace)]):
        reference = tiny_model(tiny_tokens)
    with splice(tiny_model, tiny_sae, error_term=False):
        assert torch.equal(tiny_model(tiny_tokens), reference)


def test_gradients_reach_latents_and_error_node(tiny_model, tiny_sae, tiny_tokens):
    site = Site(1)
    grad_at_site = {}

    def keep_grad(out, hook):
        out.register_hook(lambda g: grad_at_site.update(g=g))

    with splice(tiny_model, tiny_sae, track_grads=True) as state:
        with tiny_model.hooks(fwd_hooks=[(site.hook_name, keep_grad)]):
            logits = tiny_model(tiny_tokens)
        logits[:, -1, 3].sum().backward()
    record = state.records[site]
    g = grad_at_site["g"]
    torch.testing.assert_close(record.error_grad, g)
    torch.testing.assert_close(record.latents_grad, g @ tiny_sae.W_dec.T, atol=1e-6, rtol=1e-5)
    # The gradient upstream of the splice is the unspliced model's.
    tiny_model.zero_grad()
    logits_plain = tiny_model(tiny_tokens)
    logits_plain[:, -1, 3].sum().backward()
    grads_plain = [p.grad.clone() for p in tiny_model.blocks[0].parameters()]
    tiny_model.zero_grad()
    with splice(tiny_model, tiny_sae, track_grads=True):
        tiny_model(tiny_tokens)[:, -1, 3].sum().backward()
    for plain, spliced in zip(grads_plain, [p.grad for p in tiny_model.blocks[0].parameters()]):
        torch.testing.assert_close(spliced, plain, atol=1e-6, rtol=1e-5)
    tiny_model.zero_grad(set_to_none=True)


def test_saelens_sae_is_accepted(tiny_model, tiny_tokens):
    from sae_lens import StandardSAE, StandardSAEConfig

    theirs = StandardSAE(StandardSAEConfig(d_in=16, d_sae=32))
    theirs.cfg.metadata.hook_name = "blocks.2.hook_resid_pre"
    reference = tiny_model(tiny_tokens)
    with splice(tiny_model, theirs, cache=True) as state:
        assert torch.equal(tiny_model(tiny_tokens), reference)
    z = state.records[Site(2)].latents
    assert torch.equal(z, theirs.encode(site_input(tiny_model, Site(2), tiny_tokens)))


def test_several_sites_at_once(tiny_model, tiny_tokens):
    saes = {Site(0): make_sae(16, 24, hook_name=None, model_name=None, seed=1),
            "blocks.2.hook_mlp_out": make_sae(16, 24, hook_name=None, model_name=None, seed=2)}
    with splice(tiny_model, saes, cache=True) as state:
        tiny_model(tiny_tokens)
    assert set(state.records) == {Site(0), Site(2, "mlp_out")}


@pytest.mark.parametrize("make_args,error,pattern", [
    (lambda m: ({Site(1): make_sae(17, 8, hook_name=None, model_name=None)},), SpliceError, r"d_in=17.*width 16"),
    (lambda m: (make_sae(16, 8, hook_name="blocks.1.hook_resid_pre", model_name="gpt2"),), SpliceError, "trained on model 'gpt2'"),
    (lambda m: ({Site(2): make_sae(16, 8, hook_name="blocks.1.hook_resid_pre", model_name=None)},), SpliceError, "allow_hook_mismatch"),
    (lambda m: ({Site(7): make_sae(16, 8, hook_name=None, model_name=None)},), SiteError, r"layers 0\.\.2"),
    (lambda m: (make_sae(16, 8, hook_name=None, model_name=None),), SpliceError, "records no hook_name"),
    (lambda m: (object(),), NotAnSAEError, "expected an SAE"),
    (lambda m: (make_sae(16, 8, hook_name="blocks.1.hook_resid_pre", model_name=None), [LatentEdit(Site(1), 8, 1.0)]), SpliceError, "latent index 8"),
    (lambda m: (make_sae(16, 8, hook_name="blocks.1.hook_resid_pre", model_name=None), [LatentEdit(Site(2), 1, 1.0)]), SpliceError, "spliced only at"),
])
def test_bad_input_raises_before_any_forward(tiny_model, tiny_tokens, make_args, error, pattern):
    args = make_args(tiny_model)
    before = snapshot(tiny_model)
    counter = CountingHook(tiny_model)
    try:
        with pytest.raises(error, match=pattern):
            edits = args[1] if len(args) > 1 else ()
            with splice(tiny_model, args[0], edits=edits):
                tiny_model(tiny_tokens)
        assert counter.count == 0
    finally:
        counter.remove()
    assert snapshot(tiny_model) == before


@pytest.mark.parametrize("bad", [dict(latents=-1), dict(positions=[0, -2]), dict(value=float("nan")),
                                 dict(value="big"), dict(mode="multiply"), dict(latents=[])])
def test_bad_edits_are_refused(bad):
    with pytest.raises(SpliceError):
        construct_unchecked(LatentEdit, **{"site": Site(0), "latents": 1, "value": 1.0, **bad})


def test_model_flag_mismatch_is_refused(tiny_model):
    sae = make_sae(16, 8, hook_name="blocks.1.hook_resid_pre", model_name=tiny_model.cfg.model_name,
                   model_from_pretrained_kwargs={"fold_ln": True})
    with pytest.raises(SpliceError, match="fold_ln: SAE True vs model False"):
        with splice(tiny_model, sae):
            pass
    with pytest.raises(SpliceError, match="fold_ln"):  # waiving the name does not waive the processing
        with splice(tiny_model, sae, checks=SpliceChecks(allow_model_mismatch=True)):
            pass
    with splice(tiny_model, sae, checks=SpliceChecks(allow_processing_mismatch=True)):
        pass


class Boom(Exception):
    pass


def raise_in_user_hook(model, tokens):
    def hook(out, hook):
        raise Boom

    with model.hooks(fwd_hooks=[("blocks.2.hook_resid_pre", hook)]):
        model(tokens)


def interrupt_mid_forward(model, tokens):
    handle = model.blocks[2].register_forward_pre_hook(lambda *a: (_ for _ in ()).throw(KeyboardInterrupt()))
    try:
        model(tokens)
    finally:
        handle.remove()


@pytest.mark.parametrize("fault,error", [
    (lambda m, t: (_ for _ in ()).throw(Boom()), Boom),
    (raise_in_user_hook, Boom),
    (interrupt_mid_forward, KeyboardInterrupt),
])
@pytest.mark.parametrize("track_grads", [False, True])
def test_hooks_restored_after_faults(tiny_model, tiny_sae, tiny_tokens, fault, error, track_grads):
    before = snapshot(tiny_model)
    reference = tiny_model(tiny_tokens)  # before the fault: a hook left behind would change what follows
    with pytest.raises(error):
        with splice(tiny_model, tiny_sae, cache=True, track_grads=track_grads,
                    edits=[LatentEdit(Site(1), 0, 1.0)]):
            fault(tiny_model, tiny_tokens)
    assert snapshot(tiny_model) == before
    assert torch.equal(tiny_model(tiny_tokens), reference)


def test_position_out_of_range_names_it(tiny_model, tiny_sae, tiny_tokens):
    with pytest.raises(SpliceError, match="positions index 40 out of range for size 12"):
        with splice(tiny_model, tiny_sae, edits=[LatentEdit(Site(1), 0, 1.0, positions=40)]):
            tiny_model(tiny_tokens)


@pytest.mark.parametrize("architecture,k", [("standard", None), ("topk", 5), ("jumprelu", None)])
def test_elementwise_edits_computed_on_touched_tokens_equal_the_full_computation(architecture, k):
    """The sweeps' edits (LatentPatch, ErrorPatch) encode only the tokens they touch: against the full
    encode and decode of every token by hand, with rows that repeat (an expanded, stride-0 input),
    two edits of one token's latent (the later edit wins) and an error patch beside latent patches."""
    from patching import ErrorPatch, LatentPatch
    from patching.splice.splicer import elementwise_output

    site, g = Site(1), torch.Generator().manual_seed(3)
    sae = make_sae(16, 40, hook_name=site.hook_name, model_name=None, architecture=architecture, k=k)
    x = torch.randn(1, 7, 16, generator=g).expand(4, -1, -1)
    long = lambda *v: torch.tensor(v, dtype=torch.long)  # noqa: E731
    edits = [LatentPatch(site, long(0, 2), long(3, 5), long(7, 1), torch.tensor([2.0, 0.5])),
             LatentPatch(site, long(2, 2), long(5, 5), long(9, 1), torch.tensor([4.0, -1.0])),  # (2, 5, 1) again
             ErrorPatch(site, long(3, 0), long(6, 3), torch.randn(2, 16, generator=g))]
    out = elementwise_output(sae, x, edits)

    z = sae.encode(x)
    z_edit = z.clone()
    for edit in edits[:2]:
        edit.apply_(z_edit)
    error = x - sae.decode(z)
    expected = x + sae.decode_delta(z_edit, z) + edits[2].delta(error)
    touched = torch.zeros(4, 7, dtype=torch.bool)
    touched[long(0, 2, 3), long(3, 5, 6)] = True
    assert torch.allclose(out, expected, atol=1e-5, rtol=1e-5)
    assert torch.equal(out[~touched], x[~touched])  # every other token is x itself, bit for bit
    assert not torch.equal(out[touched], x[touched])
    with pytest.raises(SpliceError, match="positions index 7 out of range for size 7"):
        elementwise_output(sae, x, [LatentPatch(site, long(0), long(7), long(0), torch.tensor([1.0]))])


def test_sweep_edits_in_a_splice_equal_the_general_path(tiny_model, tiny_sae, tiny_tokens):
    """Through a splice, element-wise edits give what the general path (taken while records are
    kept) gives, within float rounding of a smaller encode."""
    from patching import LatentPatch

    site = Site(1)
    long = lambda *v: torch.tensor(v, dtype=torch.long)  # noqa: E731
    edit = LatentPatch(site, long(0, 1, 1), long(2, 0, 9), long(3, 7, 7), torch.tensor([1.5, -0.5, 2.0]))
    outputs = {}
    for cache in (False, True):
        with splice(tiny_model, tiny_sae, edits=[edit], cache=cache):
            outputs[cache] = tiny_model(tiny_tokens)
    assert torch.allclose(outputs[False], outputs[True], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(outputs[False], tiny_model(tiny_tokens), atol=1e-3)
