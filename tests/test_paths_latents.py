"""SAE latents and error nodes as senders and receivers of exact path patching, against a naive
freeze-and-patch reference written here with TransformerLens hooks (separate forward passes per
path, Wang et al. 2022 §3.1), with two tiny SAEs at two residual sites of the learned-position and
rotary grouped-query models."""

from __future__ import annotations

import pytest
import torch

from conftest import affine_attention_model, edited_pair, make_sae, saes_at, unchecked
from hooks_snapshot import assert_refused_before_any_forward, snapshot
from patching.errors import PatchingError
from patching.model.sites import Site
from patching.paths import LatentNode, Node, Receiver, patch_paths
from patching.sweep import LogitDiff
from tests.conftest import learned_or_rotary_gqa

METRIC = LogitDiff(answer=3, wrong=4)
UP, DOWN = Site(0, "resid_post"), Site(2, "resid_pre")


@pytest.fixture(scope="module", params=["learned", "rotary_gqa"])
def model(request):
    return learned_or_rotary_gqa(request.param)


@pytest.fixture(scope="module")
def saes(model):
    return saes_at(model, (UP, DOWN))


@pytest.fixture(scope="module")
def prompts():
    return edited_pair(5, 2, 8, [(None, 2, 9), (1, 5, 3)])


def graph():
    senders = [LatentNode(UP, 0), LatentNode(UP, 3), LatentNode(UP, 5, pos=7), LatentNode(UP), LatentNode(UP, None, pos=6),
               Node("head", 0, 1), Node("mlp", 1), Node("head", 1, 2)]
    receivers = [LatentNode(DOWN, 1), LatentNode(DOWN, 4, pos=7), LatentNode(DOWN), LatentNode(DOWN, None, pos=7),
                 Receiver("q", 1, 2), Receiver("v", 2, 0), Receiver("mlp", 2), Receiver("logits")]
    return senders, receivers


def _codes(sae, x):
    z = sae.encode(x)
    return z, x - sae.decode(z)


def _at(node, tensor_shape):
    """A (1, pos, 1) float mask: the node's position, or every position."""
    mask = torch.zeros(1, tensor_shape[1], 1)
    mask[:, slice(None) if node.pos is None else node.pos] = 1
    return mask


def naive_path_metric(model, saes, base, source, sender, receivers, caches=None):
    """Step 2: the base run with every head's z and MLP output frozen at the base run's, and the
    sender moved to its source value (a latent through its decoder, the error node by its error);
    record every receiver's input. Step 3: the base run with only the receivers set: q / v / MLP
    pre-activations to step 2's, a latent at the later site to its SAE's encoding of step 2's stream
    (the stream moved by the latent's decoder row), an error node to step 2's error; the logits moved
    by step 2's change of the final residual. `caches`: the base and source runs' caches, if run already."""
    base_cache, src_cache = caches or (model.run_with_cache(base)[1], model.run_with_cache(source)[1])
    hooks = []
    for layer in range(model.cfg.n_layers):
        for name in (f"blocks.{layer}.attn.hook_z", f"blocks.{layer}.hook_mlp_out"):
            def freeze(x, hook, name=name, layer=layer):
                out = base_cache[name].clone()
                if isinstance(sender, Node) and sender.layer == layer and (sender.kind == "head") == ("hook_z" in name):
                    if sender.kind == "head":
                        out[:, :, sender.head] = src_cache[name][:, :, sender.head]
                    else:
                        out = src_cache[name].clone()
                return out
            hooks.append((name, freeze))
    if isinstance(sender, LatentNode):
        sae, name = saes[sender.site], sender.site.hook_name

        def move(x, hook):
            (z, e), (z_src, e_src) = _codes(sae, x), _codes(sae, src_cache[name])
            if sender.latent is None:
                shift = e_src - e
            else:
                z_new = z.clone()
                z_new[..., sender.latent] = z_src[..., sender.latent]
                shift = sae.decode(z_new) - sae.decode(z)
            return x + shift * _at(sender, x.shape)
        hooks.append((name, move))
    with model.hooks(fwd_hooks=hooks):
        _, step2 = model.run_with_cache(base)

    final = f"blocks.{model.cfg.n_layers - 1}.hook_resid_post"
    patches = []
    for r in receivers:
        if isinstance(r, LatentNode):
            continue
        if r.kind in ("q", "k", "v"):
            def set_head(x, hook, r=r):
                x = x.clone()
                x[:, :, r.head] = step2[hook.name][:, :, r.head]
                return x
            patches.append((f"blocks.{r.layer}.attn.hook_{r.kind}", set_head))
        elif r.kind == "mlp":
            names = ["mlp.hook_pre"] + (["mlp.hook_pre_linear"] if model.cfg.gated_mlp else [])
            patches += [(f"blocks.{r.layer}.{n}", lambda x, hook: step2[hook.name].clone()) for n in names]
        else:
            shift = step2[final] - base_cache[final]
            patches.append((final, lambda x, hook, shift=shift: x + shift))
    for site in {r.site for r in receivers if isinstance(r, LatentNode)}:
        def set_site(x, hook, site=site):
            sae = saes[site]
            (z, e), (z_frozen, e_frozen) = _codes(sae, x), _codes(sae, step2[site.hook_name])
            z_new, e_new = z.clone(), e.clone()
            for r in receivers:
                if isinstance(r, LatentNode) and r.site == site:
                    keep = _at(r, x.shape)
                    if r.latent is None:
                        e_new = keep * e_frozen + (1 - keep) * e_new
                    else:
                        z_new[..., r.latent] = keep[..., 0] * z_frozen[..., r.latent] + (1 - keep[..., 0]) * z_new[..., r.latent]
            return sae.decode(z_new) + e_new
        patches.append((site.hook_name, set_site))
    logits = model.run_with_hooks(base, fwd_hooks=patches)
    return (logits[0, -1, 3] - logits[0, -1, 4]).item()


@pytest.mark.parametrize("direction", ["denoise", "noise"])
def test_latent_edges_equal_naive_freeze_and_patch(model, saes, prompts, direction):
    clean, corrupted = prompts
    senders, receivers = graph()
    ours = patch_paths(model, clean, corrupted, METRIC, senders=senders, receivers=receivers, saes=saes, by="edge",
                       direction=direction, progress=False, batch_size=9)
    moved = 0
    for p in range(2):
        base, source = (corrupted[p:p + 1], clean[p:p + 1]) if direction == "denoise" else (clean[p:p + 1], corrupted[p:p + 1])
        with torch.inference_mode():
            caches = (model.run_with_cache(base)[1], model.run_with_cache(source)[1])
            for s, sender in enumerate(senders):
                for g, receiver in enumerate(receivers):
                    expected = naive_path_metric(model, saes, base, source, sender, [receiver], caches)
                    assert ours.metric[p, s, g].item() == pytest.approx(expected, abs=1e-4), (p, sender, receiver)
                    moved += abs(expected - float(base_metric(ours, p, direction))) > 1e-3
    assert moved >= len(senders) * len(receivers) // 2  # the comparison is not between unmoved base metrics


def base_metric(result, p, direction):
    return result.metric_corrupted[p] if direction == "denoise" else result.metric_clean[p]


def test_sender_into_every_receiver_at_once_equals_naive(model, saes, prompts):
    clean, corrupted = prompts
    senders, receivers = graph()
    ours = patch_paths(model, clean, corrupted, METRIC, senders=senders, receivers=receivers, saes=saes, progress=False)
    with torch.inference_mode():
        for s, sender in enumerate(senders):
            expected = naive_path_metric(model, saes, corrupted[1:2], clean[1:2], sender, receivers)
            assert ours.metric[1, s, 0].item() == pytest.approx(expected, abs=1e-4), sender


def test_latents_and_error_sum_to_the_nodes_before_the_site_where_the_model_is_affine(prompts):
    """On the affine toy (no norms, uniform attention) the logits are affine in the final residual,
    so paths into the logits add: a site's latents and its error node together carry exactly what
    every node writing before the site carries (the stream there is their sum, `x = Σ f_i W_dec[i] +
    b_dec + e`)."""
    clean, corrupted = prompts
    toy = affine_attention_model(3)
    sae = make_sae(toy.cfg.d_model, 10, hook_name=UP.hook_name, model_name=toy.cfg.model_name, seed=4)
    senders = [LatentNode(UP, i) for i in range(sae.d_sae)] + [LatentNode(UP)]
    ours = patch_paths(toy, clean, corrupted, METRIC, senders=senders, receivers=[Receiver("logits")], saes={UP: sae},
                       progress=False)
    before = [Node("embed")] + [Node("head", 0, h) for h in range(toy.cfg.n_heads)]
    whole = patch_paths(toy, clean, corrupted, METRIC, senders=before, receivers=[Receiver("logits")], progress=False)
    moved = (ours.metric[:, :, 0] - ours.metric_corrupted[:, None]).sum(1)
    expected = (whole.metric[:, :, 0] - whole.metric_corrupted[:, None]).sum(1)
    torch.testing.assert_close(moved, expected, atol=1e-4, rtol=1e-4)
    assert expected.abs().min() > 1e-2


@pytest.mark.parametrize("make, pattern", [
    (lambda s: dict(senders=[LatentNode(UP, 99)], receivers=[Receiver("logits")], saes=s), "latent out of range"),
    (lambda s: dict(senders=[LatentNode(Site(1, "resid_pre"), 0)], receivers=[Receiver("logits")], saes=s), "no SAE given"),
    (lambda s: dict(senders=[LatentNode(UP, 0)], receivers=[Receiver("logits")]), "pass saes="),
    (lambda s: dict(senders=[LatentNode(UP, 0, pos=8)], receivers=[Receiver("logits")], saes=s), "position out of range"),
    (lambda s: dict(senders=[Node("embed")], receivers=[LatentNode(DOWN, -1)], saes=s), "non-negative"),
    (lambda s: dict(senders=[Node("embed")], receivers=[LatentNode(Site(1, "attn_out"), 0)], saes=s), "residual"),
])
def test_bad_latent_nodes_refused_before_any_forward(model, saes, prompts, make, pattern):
    clean, corrupted = prompts
    assert_refused_before_any_forward(model, lambda: unchecked(patch_paths)(model, clean, corrupted, METRIC, progress=False,
                                                                            **make(saes)), PatchingError, pattern)


def test_sae_for_another_model_refused(model, prompts):
    clean, corrupted = prompts
    other = {UP: make_sae(model.cfg.d_model, 10, hook_name=UP.hook_name, model_name="gpt2", seed=0)}
    with pytest.raises(Exception, match="gpt2"):
        patch_paths(model, clean, corrupted, METRIC, senders=[LatentNode(UP, 0)], receivers=[Receiver("logits")], saes=other,
                    progress=False)


def test_model_left_as_found(model, saes, prompts):
    clean, corrupted = prompts
    senders, receivers = graph()
    before = snapshot(model)

    def bad_metric(logits):
        raise RuntimeError("user metric failed")

    with pytest.raises(RuntimeError):
        patch_paths(model, clean, corrupted, bad_metric, senders=senders, receivers=receivers, saes=saes, progress=False)
    assert snapshot(model) == before
