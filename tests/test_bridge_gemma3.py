"""Gemma 3 270M (the offline folder `load_model` converts from the gemma3 extra) on both backends,
cut to 4 layers: the logits agree within 1e-4, and a residual trace (the sweep engine's rows joining
at their layer after the base run's keys and values, on the Bridge through `tl_bridge_blocks`, its
local and global rotary bases and sliding-window masks included), a head-z sweep and a latent sweep
agree within 1e-4; AtP and integrated gradients agree, KV-cached steered generation gives the
same tokens, harvesting (the forward stopped at the deepest site) equals the full forward, and the
safety search's curves stage (bound few-shot prefix, refusal score, direction, unit curves) agrees.
Slow (two real models); `make test` runs it where the extra is installed."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from patching import LogitDiff, load_model, patch_residual
from patching.model import gemma3

pytestmark = [pytest.mark.gemma3, pytest.mark.slow,
              pytest.mark.hooked_only(reason="compares the Bridge with HookedTransformer (TransformerLens 3.x)")]
MISSING = [module for module, _ in gemma3.CHUNKS if importlib.util.find_spec(module) is None]
CLEAN = "When Mary and John went to the store, John gave a drink to"
CORRUPTED = "When Mary and John went to the store, Mary gave a drink to"


@pytest.fixture(scope="module")
def gemma():
    """The hooked and the bridge backend on the same 4 layers of Gemma 3 270M."""
    if MISSING:
        pytest.skip(f"the gemma3 extra is not installed: {gemma3.PIP_COMMAND}")
    return {backend: load_model(gemma3.MODEL_NAME, n_layers=4, backend=backend).eval() for backend in ("hooked", "bridge")}


def test_gemma3_logits_and_a_trace_agree_between_backends(gemma):
    hooked, bridge = gemma["hooked"], gemma["bridge"]
    clean, corrupted = hooked.to_tokens(CLEAN), hooked.to_tokens(CORRUPTED)
    assert torch.equal(bridge.to_tokens(CLEAN), clean)
    metric = LogitDiff(hooked.to_single_token(" Mary"), hooked.to_single_token(" John"))
    with torch.inference_mode():
        torch.testing.assert_close(bridge(clean), hooked(clean), atol=1e-4, rtol=0)
    ours, theirs = (patch_residual(m, clean, corrupted, metric, layers=[0, 2, 3], progress=False) for m in (bridge, hooked))
    torch.testing.assert_close(ours.metric, theirs.metric, atol=1e-4, rtol=0)
    assert ours.metric.max() - ours.metric.min() > 0.03  # measured 0.062: the patches moved the metric


def test_gemma3_head_and_latent_sweeps_agree_between_backends(gemma):
    """A head-z sweep (every head of layers 1 and 3: its query heads over GQA key/value heads, local and
    global attention) and a latent sweep (a seeded random SAE at `blocks.2.hook_resid_pre`, every
    differing latent at each position) agree between the backends within 1e-4."""
    from patching import patch_heads, patch_latents
    from tests.conftest import make_sae

    hooked, bridge = gemma["hooked"], gemma["bridge"]
    clean, corrupted = hooked.to_tokens(CLEAN), hooked.to_tokens(CORRUPTED)
    metric = LogitDiff(hooked.to_single_token(" Mary"), hooked.to_single_token(" John"))
    ours, theirs = (patch_heads(m, clean, corrupted, metric, kind="z", layers=[1, 3], progress=False) for m in (bridge, hooked))
    assert ours.metric.shape == (1, 2 * hooked.cfg.n_heads)
    torch.testing.assert_close(ours.metric, theirs.metric, atol=1e-4, rtol=0)
    assert ours.metric.max() - ours.metric.min() > 0.01  # the heads moved the metric
    sae = make_sae(hooked.cfg.d_model, 256, hook_name="blocks.2.hook_resid_pre", model_name=hooked.cfg.model_name, seed=3)
    ours, theirs = (patch_latents(m, sae, clean, corrupted, metric, units="position", progress=False) for m in (bridge, hooked))
    assert [u.label() for u in ours.units] == [u.label() for u in theirs.units] and len(ours.units) > 0
    torch.testing.assert_close(ours.metric, theirs.metric, atol=1e-4, rtol=0)


def test_gemma3_attribution_and_cached_steered_generation_agree_between_backends(gemma):
    """AtP and integrated gradients over a random SAE's latents and error nodes agree within 1e-4 plus 1e-3
    relative (normalised effects reach 1.9 here; the largest difference measured, 2.6e-4 on an error
    node, is fp32 gradients through two differently built graphs: 1.7e-4 of the largest), and
    greedy generation steered by its four contrast latents (the KV-cached loop on both backends:
    the Bridge's through `tl_bridge_decode`) gives the same tokens, steered and unsteered."""
    from patching import attribute_latents
    from patching.steering.choice import contrast_latents
    from patching.steering.steer import SteeringConfig, generate_steered
    from tests.conftest import make_sae

    hooked, bridge = gemma["hooked"], gemma["bridge"]
    metric = LogitDiff(hooked.to_single_token(" Mary"), hooked.to_single_token(" John"))
    sae = make_sae(hooked.cfg.d_model, 256, hook_name="blocks.2.hook_resid_pre", model_name=hooked.cfg.model_name, seed=3)
    for method in ("atp", "ig"):
        ours, theirs = (attribute_latents(m, sae, CLEAN, CORRUPTED, metric, method=method, progress=False) for m in (bridge, hooked))
        assert [u.label() for u in ours.units] == [u.label() for u in theirs.units]
        torch.testing.assert_close(ours.mean_effect, theirs.mean_effect, atol=1e-4, rtol=1e-3)
        assert ours.mean_effect.abs().max() > 1e-3  # the estimates are not all zero
    paris, rome = ["We walked along the Seine in Paris."], ["We walked along the Tiber in Rome."]
    choices = [contrast_latents(m, sae, paris, rome, k=4) for m in (bridge, hooked)]
    assert choices[0].latents == choices[1].latents
    runs = [generate_steered(m, sae, choice, "My favourite city to visit is", config=SteeringConfig(method="add", coefficient=8.0),
                             max_new_tokens=6) for m, choice in zip((bridge, hooked), choices)]
    assert torch.equal(runs[0].steered_tokens, runs[1].steered_tokens)
    assert torch.equal(runs[0].unsteered_tokens, runs[1].unsteered_tokens)


class _Rows:
    """`MultiSiteChunks`'s row source: the same fixed token rows every chunk."""

    def __init__(self, tokens):
        self.tokens = tokens

    def next_rows(self, n):
        return self.tokens[:n]

    def describe(self):
        return {}


def test_gemma3_harvesting_equals_the_full_forward_and_the_hooked_backend(gemma):
    """`harvest` (one site) and `MultiSiteChunks` (three sites, one forward stopped after the deepest
    site's hook: block 3 never runs) on the Bridge equal its own full forward's hook activations
    within 1e-5, and the hooked backend's harvest within 1e-4 plus 1e-5 relative (Gemma's residual
    stream reaches ~700 here, where fp32 rounds in steps of 6e-5; measured 4.3e-4 there, 6e-7
    relative); the BOS rows are dropped alike."""
    from patching import Site
    from training.activations.harvest import MultiSiteChunks, harvest

    hooked, bridge = gemma["hooked"], gemma["bridge"]
    tokens = torch.cat([hooked.to_tokens(CLEAN), hooked.to_tokens(CORRUPTED)])
    sites = [Site(1), Site(2, "attn_out"), Site(2, "mlp_out")]
    names = [site.hook_name for site in sites]
    keep = tokens.reshape(-1) != hooked.tokenizer.bos_token_id
    with torch.inference_mode():
        _, full = bridge.run_with_cache(tokens, names_filter=names)
    ran = []
    handle = bridge.blocks[3].register_forward_pre_hook(lambda module, args: ran.append(3))
    try:
        single = harvest(bridge, sites[0], tokens, drop_tokens=torch.tensor([hooked.tokenizer.bos_token_id]))
        multi = MultiSiteChunks(bridge, sites, _Rows(tokens), rows_per_chunk=2).next_chunks()
    finally:
        handle.remove()
    assert not ran and single.shape == (int(keep.sum()), hooked.cfg.d_model)
    torch.testing.assert_close(single, full[names[0]].reshape(-1, hooked.cfg.d_model)[keep], atol=1e-5, rtol=0)
    theirs = MultiSiteChunks(hooked, sites, _Rows(tokens), rows_per_chunk=2).next_chunks()
    for name in names:
        torch.testing.assert_close(multi[name], full[name].reshape(-1, hooked.cfg.d_model)[keep], atol=1e-5, rtol=0)
        torch.testing.assert_close(multi[name], theirs[name], atol=1e-4, rtol=1e-5)


GEMMA_CHAT = ("{{ bos_token }}{% for m in messages %}<start_of_turn>{{ 'model' if m['role'] == 'assistant' else 'user' }}\n"
              "{{ m['content'] }}<end_of_turn>\n{% endfor %}{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}")
"""Gemma's turn markup (the system message as a user turn): the 270M base folder has no chat template."""


def test_gemma3_safety_curves_agree_between_backends(gemma):
    """The safety search's core (`find_safety_latents`' curves stage): the suite's few-shot chat context
    bound as a prefix (`bound_prefix`), the refusal direction at layer 2 from the queries' mean
    residuals, and one pair's restoration curves (a random SAE's latents at `blocks.2.hook_resid_pre`,
    MLP neurons at one and every layer, residual dimensions, the direction) under the refusal score,
    on both backends: the refusal scores' spans within 1e-3 nats, the direction within 1e-3 of its
    norm, and every curve point as a restored score (the fraction times the pair's span) within 2e-3
    nats plus 1e-3 relative (measured: spans 1.7e-5, direction 1.1e-4 of its norm, restored scores
    8.4e-4 nats on scores up to 8 nats: this 4-layer cut's spans are small, 0.12 nats at most)."""
    from patching import Site
    from patching.model import tl_compat
    from patching.safety.direction import refusal_directions
    from patching.safety.prompts import SafetySuite
    from patching.safety.score import RefusalScore, query_start, tokenize_chat
    from patching.safety.units import pair_curves
    from tests.conftest import make_sae

    hooked, bridge = gemma["hooked"], gemma["bridge"]
    templates = [tl_compat.tokenizer(m).chat_template for m in (hooked, bridge)]
    for m in (hooked, bridge):
        tl_compat.tokenizer(m).chat_template = GEMMA_CHAT
    try:
        suite, metric = SafetySuite(), RefusalScore.for_model(hooked)
        harmful, harmless = (tokenize_chat(bridge, suite, [pair[i] for pair in suite.pairs[:3]]) for i in (0, 1))
        start = query_start(bridge, suite)
    finally:
        for m, template in zip((hooked, bridge), templates):
            tl_compat.tokenizer(m).chat_template = template
    site = Site(2)
    sae = make_sae(hooked.cfg.d_model, 256, hook_name=site.hook_name, model_name=hooked.cfg.model_name, seed=3)
    out = {}
    for name, m in (("bridge", bridge), ("hooked", hooked)):
        with tl_compat.bound_prefix(m, harmful[0][:, :start]):
            with torch.inference_mode():
                score = [[metric(tl_compat.forward_logits(m, t[:, start:])[:, -1], torch.zeros(1, dtype=torch.long))
                          for t in prompts] for prompts in (harmful, harmless)]
            spans = [float(h - s) for h, s in zip(*score)]
            direction = refusal_directions(m, [h[:, start:] for h in harmful], [s[:, start:] for s in harmless], [2]).float()[0]
            pair = max(range(len(spans)), key=lambda i: abs(spans[i]))
            curves = pair_curves(m, {site: sae}, harmful[pair][:, start:], harmless[pair][:, start:], metric, 0, 2,
                                 (20.0,), direction)
        out[name] = spans, direction, pair, curves
    ours, theirs = out["bridge"], out["hooked"]
    torch.testing.assert_close(torch.tensor(ours[0]), torch.tensor(theirs[0]), atol=1e-3, rtol=0)
    assert ours[2] == theirs[2] and abs(theirs[0][theirs[2]]) > 0.05  # the pair with the widest span, on both
    assert (ours[1] - theirs[1]).norm() <= 1e-3 * theirs[1].norm()
    assert ours[3].keys() == theirs[3].keys() and len(ours[3]) == 5
    span = theirs[0][theirs[2]]
    for kind, (fraction, active) in theirs[3].items():
        assert ours[3][kind][1] == active
        torch.testing.assert_close(ours[3][kind][0] * span, fraction * span, atol=2e-3, rtol=1e-3, msg=kind)
