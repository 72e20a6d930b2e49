"""The architecture matrix on the bridge backend: a tiny random Hugging Face model per family, built
offline from its config, booted through `TransformerBridge` (compatibility mode, no processing).
Each family's Bridge must give transformers' own logits, leave them bit-identical with an SAE spliced
and no edit, and apply a residual patch at `blocks.1.hook_resid_pre` exactly as the same patch put on
the input of transformers' decoder layer 1 (the reference: a plain PyTorch pre-hook, no TransformerLens)."""

from __future__ import annotations

import pytest
import torch

from patching import ModelFlags, splice
from patching.model import tl_bridge, tl_bridge_blocks, tl_bridge_rows, tl_compat
from tests.conftest import make_sae
from tests.test_bridge import TOKENS, tiny_tokenizer

COMMON = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=64)


def family_config(family: str):
    import transformers as hf

    return {
        "gpt2": lambda: hf.GPT2Config(vocab_size=64, n_embd=32, n_layer=2, n_head=4, n_positions=64),
        "gpt_neox": lambda: hf.GPTNeoXConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                             intermediate_size=64, max_position_embeddings=64),
        "llama": lambda: hf.LlamaConfig(**COMMON),
        "mistral": lambda: hf.MistralConfig(**COMMON),
        "qwen2": lambda: hf.Qwen2Config(**COMMON),
        "qwen3": lambda: hf.Qwen3Config(**COMMON, head_dim=8),
        "phi3": lambda: hf.Phi3Config(**COMMON, pad_token_id=0),
        "gemma2": lambda: hf.Gemma2Config(**COMMON, head_dim=8),
        "gemma3": lambda: hf.Gemma3TextConfig(**COMMON, head_dim=8),
        "olmo2": lambda: hf.Olmo2Config(**COMMON),
    }[family]()


FAMILIES = ["gpt2", "gpt_neox", "llama", "mistral", "qwen2", "qwen3", "phi3", "gemma2", "gemma3", "olmo2"]


@pytest.fixture(scope="module", params=FAMILIES)
def family(request, tmp_path_factory):
    """(bridge, transformers reference with eager attention as the Bridge forces) for one family."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = tmp_path_factory.mktemp(request.param)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(family_config(request.param)).save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    bridge = tl_bridge.boot_bridge(AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32),
                                   AutoTokenizer.from_pretrained(folder), model_name="tiny",
                                   flags=ModelFlags().as_kwargs(), n_layers=None, n_ctx=64, device="cpu",
                                   dtype=torch.float32)
    reference = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, attn_implementation="eager")
    return bridge.eval(), reference.eval()


def decoder_layers(hf_model) -> torch.nn.ModuleList:
    n = hf_model.config.num_hidden_layers
    (layers,) = [m for m in hf_model.modules() if isinstance(m, torch.nn.ModuleList) and len(m) == n]
    return layers


def test_bridge_logits_equal_transformers(family):
    bridge, reference = family
    with torch.no_grad():
        torch.testing.assert_close(bridge(TOKENS), reference(TOKENS).logits, atol=1e-5, rtol=0)


def test_splice_without_edit_is_exact_identity(family):
    bridge, _ = family
    sae = make_sae(32, 48, hook_name="blocks.1.hook_resid_pre", model_name="tiny")
    with torch.no_grad():
        before = bridge(TOKENS)
        with splice(bridge, sae):
            assert torch.equal(bridge(TOKENS), before)


@pytest.mark.parametrize("position", [0, 4, 8])
def test_residual_patch_matches_the_same_patch_on_transformers(family, position):
    """Clean row 0's resid_pre at layer 1, one position, into corrupted row 1."""
    bridge, reference = family
    name = "blocks.1.hook_resid_pre"
    with torch.no_grad():
        _, cache = bridge.run_with_cache(TOKENS[:1], names_filter=name)
        clean = cache[name][0, position]

        def bridge_patch(resid, hook):
            resid[:, position] = clean
            return resid

        ours = bridge.run_with_hooks(TOKENS[1:], fwd_hooks=[(name, bridge_patch)])

        def hf_patch(module, args, kwargs):
            hidden = (args[0] if args else kwargs["hidden_states"]).clone()
            hidden[:, position] = clean
            return ((hidden, *args[1:]), kwargs) if args else (args, {**kwargs, "hidden_states": hidden})

        handle = decoder_layers(reference)[1].register_forward_pre_hook(hf_patch, with_kwargs=True)
        try:
            expected = reference(TOKENS[1:]).logits
        finally:
            handle.remove()
        unpatched = reference(TOKENS[1:]).logits
    torch.testing.assert_close(ours, expected, atol=1e-5, rtol=0)
    assert not torch.allclose(expected, unpatched, atol=1e-4)  # the patch changed something to compare


def test_blocks_from_a_layer_after_a_prefix_equal_the_full_forward(family):
    """The sweep engine's shortcuts on the Bridge (`tl_bridge_blocks`): rows entering at layer 0 or 1
    with the full forward's residual, after its keys and values of the first p positions, give the
    full forward's final residual stream at the positions after p (p = 0 runs every position),
    rows joining at two layers share one batch, and the hook points inside the blocks see the full
    forward's tensors."""
    bridge, _ = family
    tokens, names = TOKENS[:1], ["blocks.0.hook_resid_pre", "blocks.1.hook_resid_pre", "blocks.1.attn.hook_z"]
    with torch.no_grad():
        final, acts, kv = tl_bridge_rows.run_until_end_with_keys_values(bridge, tokens, names)
        for layer in (0, 1):
            for p in (0, 3, 8):
                out = tl_bridge_blocks.run_layers(bridge, [(layer, acts[names[layer]][:, p:])], kv.sliced(p) if p else None)
                torch.testing.assert_close(out, final[:, p:], atol=1e-5, rtol=0)
        seen = {}
        with tl_compat.hooks(bridge, [(names[2], lambda z: seen.setdefault("z", z.clone()))]):
            out = tl_bridge_blocks.run_layers(bridge, [(0, acts[names[0]][:, 5:]), (1, acts[names[1]][:, 5:].expand(2, -1, -1))],
                                              kv.sliced(5))
    torch.testing.assert_close(out, final[:, 5:].expand(3, -1, -1), atol=1e-5, rtol=0)
    torch.testing.assert_close(seen["z"], acts[names[2]][:, 5:].expand(3, -1, -1, -1), atol=1e-5, rtol=0)


def test_blocks_after_a_prefix_keep_sliding_windows(tmp_path):
    """Gemma 3 with a 3-token window on its sliding layers: the mask each layer takes is the full
    forward's (cut to the rows' positions), so a suffix after the prefix attends as in the full forward."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    config = family_config("gemma3")
    config.sliding_window = 3
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path)
    tiny_tokenizer().save_pretrained(tmp_path)
    bridge = tl_bridge.boot_bridge(AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32),
                                   AutoTokenizer.from_pretrained(tmp_path), model_name="tiny", flags=ModelFlags().as_kwargs(),
                                   n_layers=None, n_ctx=64, device="cpu", dtype=torch.float32).eval()
    with torch.no_grad():
        final, acts, kv = tl_bridge_rows.run_until_end_with_keys_values(bridge, TOKENS[:1], ["blocks.1.hook_resid_pre"])
        out = tl_bridge_blocks.run_layers(bridge, [(1, acts["blocks.1.hook_resid_pre"][:, 6:])], kv.sliced(6))
        wide, _ = tl_bridge_rows.run_until_end_with_cache(tl_bridge.boot_bridge(
            AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32, sliding_window=64),
            AutoTokenizer.from_pretrained(tmp_path), model_name="tiny", flags=ModelFlags().as_kwargs(), n_layers=None,
            n_ctx=64, device="cpu", dtype=torch.float32).eval(), TOKENS[:1], [])
    torch.testing.assert_close(out, final[:, 6:], atol=1e-5, rtol=0)
    assert not torch.allclose(wide[:, 6:], final[:, 6:], atol=1e-4)


def test_a_patch_at_resid_mid_reaches_the_residual_stream(family):
    """A vector added at `blocks.1.hook_resid_mid` on the Bridge equals, on transformers, the same
    vector added to the input of the norm before the MLP and to the decoder layer's output: the MLP
    reads the patched stream and the block goes on with it, as on HookedTransformer (the Bridge
    alone would add it to the norm's input only: `tl_bridge_residual`)."""
    bridge, reference = family
    if "blocks.1.hook_resid_mid" not in bridge.hook_dict or bridge.hook_dict["blocks.1.hook_resid_mid"] is not \
            getattr(getattr(bridge.blocks[1], "ln2", None), "hook_in", None):
        pytest.skip("no resid_mid at the input of ln2 in this family")
    vector = torch.randn(32, generator=torch.Generator().manual_seed(1))
    names = {id(m): n.replace("._original_component", "") for n, m in bridge.original_model.named_modules()}
    norm = reference.get_submodule(names[id(bridge.blocks[1].ln2.original_component)])
    layer = decoder_layers(reference)[1]
    handles = [norm.register_forward_pre_hook(lambda module, args: (args[0] + vector, *args[1:])),
               layer.register_forward_hook(lambda module, args, out: out + vector if isinstance(out, torch.Tensor)
                                           else (out[0] + vector, *out[1:]))]
    try:
        with torch.no_grad():
            expected = reference(TOKENS).logits
    finally:
        for handle in handles:
            handle.remove()
    with torch.no_grad(), tl_compat.hooks(bridge, [("blocks.1.hook_resid_mid", lambda x: x + vector)]):
        ours = bridge(TOKENS)
    torch.testing.assert_close(ours, expected, atol=1e-5, rtol=0)


def test_the_qk_fix_refuses_what_changes_the_scores(family, request):
    """The QK fix assumes scores = q · k * scaling plus the mask: read off the Bridge's attention,
    Gemma 2 soft-caps them and Qwen 3, Gemma 3 and OLMo 2 normalise queries and keys; the others
    are taken, with the scale their Hugging Face attention multiplies by."""
    from patching.model import tl_paths

    bridge, reference = family
    family_name = request.node.callspec.params["family"]
    expected = {"gemma2": "soft-capped", "qwen3": "QK-norm", "gemma3": "QK-norm", "olmo2": "QK-norm"}.get(family_name)
    reason = tl_paths.unsupported_for_qk_fix(bridge)
    assert (reason is None) if expected is None else (expected in reason)
    attention = next(m for name, m in decoder_layers(reference)[1].named_children() if name in ("self_attn", "attn", "attention"))
    expected_scale = 1 / attention.scaling if getattr(attention, "scaling", None) else 8 ** 0.5  # d_head 8
    assert tl_paths.attention_scale(bridge, 1) == pytest.approx(expected_scale)


def _greedy(bridge, tokens, mask, *, use_kv_cache, prefix=None, position=2):
    """Five greedy tokens under a steering hook at `blocks.1.hook_resid_pre` that adds a fixed random
    vector (not a constant: LayerNorm would remove it) at one absolute position: the tokens, every
    step's logits, and the activation the hook saw at each absolute position (the last time it saw it)."""
    from patching import Site
    from patching.splice.generate import Interventions, generate

    logits, seen = [], {}
    vector = torch.randn(bridge.cfg.d_model, generator=torch.Generator().manual_seed(2))

    def steer(x, step):
        x = x.clone()
        for i, p in enumerate(step.positions):
            seen[p] = x[:, i].clone()
            if p == position:
                x[:, i] += vector
        return x

    with torch.no_grad():
        tokens = generate(bridge, tokens, 5, use_kv_cache=use_kv_cache, attention_mask=mask, prefix=prefix,
                          interventions=Interventions(hooks={Site(1): steer}), observe=lambda step, out: logits.append(out))
    return tokens, torch.stack(logits), seen


def test_cached_generation_equals_uncached(family):
    """KV-cached decoding on the Bridge (`tl_bridge_decode`: a transformers DynamicCache carried
    through the Bridge's blocks, handed to each attention): the same greedy tokens and every
    step's logits within 1e-4 of the uncached loop's, with a left-padded row, and the steering hook
    sees the same activation at every absolute position in both loops (measured: 2e-7)."""
    bridge, _ = family
    tokens = TOKENS[:2, :6].clone()
    mask = torch.ones_like(tokens)
    mask[1, :2] = 0
    cached, uncached = (_greedy(bridge, tokens, mask, use_kv_cache=use) for use in (True, False))
    assert torch.equal(cached[0], uncached[0])
    torch.testing.assert_close(cached[1], uncached[1], atol=1e-4, rtol=0)
    assert sorted(cached[2]) == sorted(uncached[2]) == list(range(10))
    for p in cached[2]:
        torch.testing.assert_close(cached[2][p], uncached[2][p], atol=1e-4, rtol=0)
    plain = generate_plain(bridge, tokens, mask)
    assert not torch.allclose(plain, cached[1], atol=1e-3)  # the steering changed the logits compared


def generate_plain(bridge, tokens, mask):
    from patching.splice.generate import generate

    logits = []
    with torch.no_grad():
        generate(bridge, tokens, 5, attention_mask=mask, observe=lambda step, out: logits.append(out))
    return torch.stack(logits)


def test_cached_generation_inside_a_bound_prefix_equals_uncached_and_the_whole_prompts(family):
    """Inside `bound_prefix` the Bridge's decoding cache starts from the bound prefix's keys and
    values (`tl_bridge_decode`), so each step runs one position. Under a steering hook at absolute
    position 5: the same greedy tokens and every step's logits within 1e-4 of the uncached loop
    inside the binding (every step rerunning the positions after the prefix) and of the uncached
    loop on the whole prompts outside it (the independent reference); the hook sees the same
    activation at each absolute position, never one of the prefix's. A `SharedPrefix` made inside
    the binding runs after it once, and is never intervened on either."""
    from patching.splice.generate import SharedPrefix

    bridge, _ = family
    P = 3
    whole = torch.cat([TOKENS[:1, :P].expand(2, -1), TOKENS[:, P:7]], dim=1)
    whole[:, P:P + 2] = TOKENS[0, P:P + 2]  # both rows share two tokens after the prefix, for the SharedPrefix
    reference = _greedy(bridge, whole, None, use_kv_cache=False, position=5)
    with tl_compat.bound_prefix(bridge, whole[:1, :P]):
        runs = [_greedy(bridge, whole[:, P:], None, use_kv_cache=use, position=5) for use in (True, False)]
        shared = SharedPrefix.of(bridge, whole[:1, P:P + 2])
        runs.append(_greedy(bridge, whole[:, P:], None, use_kv_cache=True, prefix=shared, position=5))
    assert shared.cache.length == P + 2 and "forward" not in bridge.__dict__
    for run, first in zip(runs, (P, P, P + 2), strict=True):
        assert torch.equal(run[0], reference[0][:, P:])
        torch.testing.assert_close(run[1], reference[1], atol=1e-4, rtol=0)
        assert sorted(run[2]) == list(range(first, 11))
        for p in run[2]:
            torch.testing.assert_close(run[2][p], reference[2][p], atol=1e-4, rtol=0)
    assert not torch.allclose(generate_plain(bridge, whole, torch.ones_like(whole)), reference[1], atol=1e-3)
