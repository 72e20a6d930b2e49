"""The bridge backend (TransformerLens's TransformerBridge) against the hooked one and against
Hugging Face itself: loading, weight processing, provenance, truncation, the splicer, and the sweep
engine's full-row path (the Bridge has no start_at_layer and no key/value prefix) against naive hooks."""

from __future__ import annotations

import pytest
import torch

from patching import LogitDiff, ModelFlags, ModelLoadError, Site, load_model, patch_latents, patch_residual, splice
from patching.model import tl_bridge
from patching.model.provenance import provenance
from tests.conftest import make_sae

ALL_FLAGS = ModelFlags(fold_ln=True, center_writing_weights=True, center_unembed=True, fold_value_biases=True)


def tiny_hf_folder(folder, kind="llama", n_layers=3):
    """A tiny random `transformers` causal LM saved offline (config -> model -> save_pretrained)."""
    from transformers import AutoModelForCausalLM, Gemma2Config, LlamaConfig

    torch.manual_seed(0)
    common = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=n_layers,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    config = LlamaConfig(**common) if kind == "llama" else Gemma2Config(**common, head_dim=8)
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)  # TransformerLens reloads a tokenizer from its folder
    return folder


def tiny_tokenizer(size=64):
    """A `size`-word word-level tokenizer built in memory (the Bridge would fetch one from the hub)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<bos>": 0, "<eos>": 1, "<unk>": 2, **{f"w{i}": i for i in range(3, size)}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<bos>", eos_token="<eos>", unk_token="<unk>")


def tiny_gpt2_bridge(folder):
    """conftest's `tiny_model` on the bridge backend: a random Hugging Face GPT-2 of the hooked tiny
    model's shapes (3 layers, d_model 16, 4 heads, d_mlp 32, 50 tokens, 32 positions, LayerNorm,
    learned positions, weights drawn at the same scale), saved offline and booted through the Bridge."""
    from transformers import AutoModelForCausalLM, GPT2Config

    torch.manual_seed(0)
    config = GPT2Config(vocab_size=50, n_embd=16, n_layer=3, n_head=4, n_inner=32, n_positions=32,
                        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=1,
                        initializer_range=0.8 / 16**0.5)  # HookedTransformerConfig's default scale: spans as large
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    tiny_tokenizer(50).save_pretrained(folder)
    return boot_tiny(folder).eval()


def boot_tiny(folder, flags=None, n_layers=None):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    flags = flags or ModelFlags()
    hf_model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    return tl_bridge.boot_bridge(hf_model, AutoTokenizer.from_pretrained(folder), model_name="tiny", flags=flags.as_kwargs(), n_layers=n_layers,
                                 n_ctx=64, device="cpu", dtype=torch.float32)


@pytest.fixture(scope="module")
def llama_folder(tmp_path_factory):
    return tiny_hf_folder(tmp_path_factory.mktemp("tiny-hf"))


TOKENS = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(3))


def test_bad_backend_and_unsupported_names_are_refused_before_loading():
    with pytest.raises(ModelLoadError, match="backend must be one of"):
        load_model(backend="bridged")
    with pytest.raises(ModelLoadError, match="loads the offline models"):
        load_model("gpt2", backend="bridge")


def test_truncated_bridge_equals_hugging_face_with_fewer_layers(llama_folder):
    """`n_layers` on the Bridge cuts the wrapped model; the reference is transformers' own
    2-layer model from the same folder (eager attention, as the Bridge forces)."""
    from transformers import AutoModelForCausalLM

    bridge = boot_tiny(llama_folder, n_layers=2)
    reference = AutoModelForCausalLM.from_pretrained(llama_folder, num_hidden_layers=2, attn_implementation="eager")
    assert bridge.cfg.n_layers == 2 and "blocks.2.hook_resid_pre" not in bridge.hook_dict
    with torch.no_grad():
        torch.testing.assert_close(bridge(TOKENS), reference(TOKENS).logits, atol=1e-5, rtol=0)


def test_splice_without_edit_is_exact_identity_on_the_bridge(llama_folder):
    bridge = boot_tiny(llama_folder)
    sae = make_sae(32, 48, hook_name="blocks.1.hook_resid_pre", model_name="tiny")
    with torch.no_grad():
        reference = bridge(TOKENS)
        with splice(bridge, sae, cache=True) as state:
            assert torch.equal(bridge(TOKENS), reference)
    assert Site(1) in state.records


def test_final_residual_and_readout_give_the_bridge_logits(llama_folder):
    """The door's final residual on a Bridge (its last resid_post: `stop_at_layer=n_layers` returns
    logits there) read out by the door's final norm and unembedding equals the Bridge's forward."""
    from patching.model import tl_compat

    bridge = boot_tiny(llama_folder)
    with torch.no_grad():
        final, acts = tl_compat.run_until_end_with_cache(bridge, TOKENS, ["blocks.1.hook_resid_pre"])
        _, cache = bridge.run_with_cache(TOKENS, names_filter="blocks.1.hook_resid_pre")
        assert torch.equal(tl_compat.readout(bridge, final), bridge(TOKENS))
    assert torch.equal(acts["blocks.1.hook_resid_pre"], cache["blocks.1.hook_resid_pre"])


def test_softcapped_logits_refuse_center_unembed(tmp_path):
    """The Bridge would drop center_unembed on a softcapped model with only a log line."""
    folder = tiny_hf_folder(tmp_path / "gemma2", kind="gemma2", n_layers=2)
    with pytest.raises(ModelLoadError, match="center_unembed"):
        boot_tiny(folder, flags=ModelFlags(center_unembed=True))


def test_residual_sweep_on_the_bridge_matches_naive_hooks(llama_folder):
    """The engine's full-row path (no start_at_layer, no key/value prefix on the Bridge) against one
    run_with_hooks forward of the Bridge itself."""
    bridge = boot_tiny(llama_folder)
    clean, corrupted = TOKENS[:1], TOKENS[1:]
    metric = LogitDiff(answer=3, wrong=4)
    ours = patch_residual(bridge, clean, corrupted, metric, layers=[1], positions=[2], progress=False)
    _, cache = bridge.run_with_cache(clean, names_filter="blocks.1.hook_resid_pre")

    def put(resid, hook):
        resid[:, 2] = cache["blocks.1.hook_resid_pre"][:, 2]
        return resid

    logits = bridge.run_with_hooks(corrupted, fwd_hooks=[("blocks.1.hook_resid_pre", put)])
    assert ours.metric[0, 0].item() == pytest.approx((logits[0, -1, 3] - logits[0, -1, 4]).item(), abs=1e-5)


def test_latent_sweep_on_the_bridge_matches_naive_splices(llama_folder):
    """Each position's all-latent patch against one forward of the Bridge with the source run's
    latents set at that position through the splice (the naive reference)."""
    from patching import LatentEdit

    bridge = boot_tiny(llama_folder)
    sae = make_sae(32, 48, hook_name="blocks.1.hook_resid_pre", model_name="tiny")
    metric = LogitDiff(answer=3, wrong=4)
    result = patch_latents(bridge, sae, TOKENS[:1], TOKENS[1:], metric, units="position", progress=False)
    with torch.no_grad(), splice(bridge, sae, cache=True) as state:
        bridge(TOKENS[:1])
    z_clean = state.records[Site(1)].latents[0]
    assert len(result.units) == TOKENS.shape[1]
    for j, unit in enumerate(result.units):
        (position,) = unit.parts[0].positions
        edit = LatentEdit(Site(1), tuple(range(48)), z_clean[position], positions=position)
        with torch.no_grad(), splice(bridge, sae, edits=[edit]):
            logits = bridge(TOKENS[1:])
        assert result.metric[0, j].item() == pytest.approx((logits[0, -1, 3] - logits[0, -1, 4]).item(), abs=1e-4)


# --- the default model on both backends -------------------------------------------------------------------


@pytest.fixture(scope="module")
def prompts(default_model_4l):
    return default_model_4l.to_tokens(["The Eiffel Tower is in the city of", "The capital of France is"])


CROSS_BACKEND = "compares against the hooked backend (HookedTransformer: TransformerLens 3.x)"


@pytest.mark.default_model
@pytest.mark.hooked_only(reason=CROSS_BACKEND)
@pytest.mark.parametrize("flags", [ModelFlags(), ALL_FLAGS], ids=["no-processing", "all-processing"])
def test_default_model_logits_agree_between_backends(flags, prompts):
    hooked = load_model(n_layers=4, flags=flags)
    bridge = load_model(n_layers=4, flags=flags, backend="bridge")
    with torch.no_grad():
        difference = (bridge(prompts) - hooked(prompts)).abs().max().item()
    assert difference < 1e-4, difference
    assert bridge.latentpatch_origin.backend == "bridge" and hooked.latentpatch_origin.backend == "hooked"
    assert bridge.latentpatch_origin.flags == flags


@pytest.mark.default_model
@pytest.mark.hooked_only(reason=CROSS_BACKEND)
def test_bridge_hooks_match_hooked_and_provenance_names_the_backend(default_model_4l, prompts):
    bridge = load_model(n_layers=4, backend="bridge")
    with torch.no_grad():
        _, hooked_cache = default_model_4l.run_with_cache(prompts)
        _, bridge_cache = bridge.run_with_cache(prompts)
    assert set(hooked_cache.keys()) <= set(bridge_cache.keys())
    for name in hooked_cache.keys():
        torch.testing.assert_close(bridge_cache[name], hooked_cache[name], atol=2e-4, rtol=1e-4, msg=name)
    record = provenance(bridge)
    assert record["model_backend"] == "bridge" and provenance(default_model_4l)["model_backend"] == "hooked"
    assert record["model"] == "smollm2-135m-instruct" and record["model_flags"] == ModelFlags().as_kwargs()
