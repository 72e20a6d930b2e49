"""The architecture matrix on the bridge backend: a tiny random Hugging Face model per family, built
offline from its config, booted through `TransformerBridge` (compatibility mode, no processing).
Each family's Bridge must give transformers' own logits, leave them bit-identical with an SAE spliced
and no edit, and apply a residual patch at `blocks.1.hook_resid_pre` exactly as the same patch put on
the input of transformers' decoder layer 1 (the reference: a plain PyTorch pre-hook, no TransformerLens)."""

from __future__ import annotations

import pytest
import torch

from patching import ModelFlags, splice
from patching.model import tl_bridge
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
