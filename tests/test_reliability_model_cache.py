"""A damaged converted-model cache is refused, never loaded as a broken model (issue 30, item 2).

With one tensor removed from the cached folder's `model.safetensors`, `load_model` used to load
with that layer at its random initialisation; a NaN weight gave NaN logits; a truncated file a raw
`SafetensorError`. The folder here is a tiny random Hugging Face Llama saved on the spot (the
real caches take 20-80 s to convert), loaded through the same `_load_local` the default model and
Gemma 3 use, and through `load_model` with the cache root pointed at it.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import struct
from pathlib import Path

import pytest
import torch

from patching.errors import ModelLoadError
from patching.model import cache_check, loading

N_CTX = 32


@pytest.fixture(scope="module")
def template(tmp_path_factory) -> Path:
    """A 2-layer Llama (d_model 16, grouped-query attention, tied embeddings) with a word-level
    tokenizer, as `save_pretrained` writes it; no manifest. Tests copy it."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    folder = tmp_path_factory.mktemp("cache") / "tinyhf"  # TransformerLens guesses on "llama" in paths
    words = ["<bos>", "<eos>", "<unk>"] + [f"w{i}" for i in range(61)]
    core = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    cfg = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=True, bos_token_id=0,
                      eos_token_id=1)
    torch.manual_seed(0)
    LlamaForCausalLM(cfg).save_pretrained(folder)
    PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<bos>", eos_token="<eos>", unk_token="<unk>",
                            pad_token="<eos>").save_pretrained(folder)
    return folder


@pytest.fixture()
def cached(template, tmp_path) -> Path:
    """A fresh copy with its conversion manifest, as `convert_gguf_folder` leaves it."""
    folder = tmp_path / "tinyhf"
    shutil.copytree(template, folder)
    cache_check.write_manifest(folder)
    cache_check._verified.clear()  # as in a new process: the first load hashes the weights
    return folder


@pytest.fixture()
def legacy(template, tmp_path) -> Path:
    """A fresh copy without a manifest, as conversions before manifests left it."""
    folder = tmp_path / "old" / "tinyhf"
    shutil.copytree(template, folder)
    return folder


def load(folder: Path, **kwargs):
    return loading._load_local(folder, "tiny", None, n_layers=None, device="cpu", dtype=torch.float32,
                               flags=loading.ModelFlags(), n_ctx=N_CTX, **kwargs)


def tensors_of(folder: Path) -> tuple[dict, bytes, int]:
    """The safetensors header of `folder`'s weights, the file's bytes, and where the data starts."""
    blob = (folder / "model.safetensors").read_bytes()
    (n,) = struct.unpack("<Q", blob[:8])
    return json.loads(blob[8:8 + n]), blob, 8 + n


def remove_tensor(folder: Path, name: str) -> None:
    from safetensors.torch import load_file, save_file

    weights = load_file(folder / "model.safetensors")
    del weights[name]
    save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})


def set_first_value(folder: Path, name: str, value: float) -> None:
    """Overwrite the first element of tensor `name` in place (same size, same header)."""
    header, blob, start = tensors_of(folder)
    offset = start + header[name]["data_offsets"][0]
    blob = blob[:offset] + struct.pack("<f", value) + blob[offset + 4:]
    (folder / "model.safetensors").write_bytes(blob)


LAYER_1_UP = "model.layers.1.mlp.up_proj.weight"


def test_an_intact_cache_loads_with_the_files_weights(cached):
    from safetensors.torch import load_file

    model = load(cached)
    stored = load_file(cached / "model.safetensors")
    assert torch.equal(model.W_E.detach(), stored["model.embed_tokens.weight"])
    assert torch.equal(model.blocks[1].mlp.W_in.detach(), stored[LAYER_1_UP].T)


def test_a_removed_tensor_is_refused_not_left_random(cached, legacy):
    for folder in (cached, legacy):
        remove_tensor(folder, LAYER_1_UP)
        with pytest.raises(ModelLoadError, match=LAYER_1_UP.replace(".", r"\.")) as info:
            load(folder)
        assert str(folder) in str(info.value) and "delete this folder" in str(info.value)
    assert not (legacy / cache_check.MANIFEST_FILE).exists()  # a refused folder is never recorded as good


def test_a_nan_weight_is_refused_even_where_the_digest_is_not_rehashed(cached, legacy):
    assert cache_check.check_folder(cached)  # hashed once in this process: later loads check names and sizes
    for folder in (cached, legacy):
        set_first_value(folder, LAYER_1_UP, float("nan"))
        with pytest.raises(ModelLoadError, match=f"'{LAYER_1_UP}' holds non-finite values"):
            load(folder)


def test_a_truncated_file_is_refused_naming_it(cached, legacy):
    for folder in (cached, legacy):
        weights = folder / "model.safetensors"
        weights.write_bytes(weights.read_bytes()[:-100])
        with pytest.raises(ModelLoadError, match="truncated or trailing bytes") as info:
            load(folder)
        assert str(weights) in str(info.value)


def test_the_digest_is_checked_on_first_use_and_when_asked(cached):
    set_first_value(cached, LAYER_1_UP, 0.5)  # finite, same size and header: only the digest can tell
    with pytest.raises(ModelLoadError, match="model.safetensors's SHA-256 differs"):
        load(cached)  # the first load in this process hashes
    cache_check.write_manifest(cached)  # accept the change: recorded and verified in this process
    load(cached)
    set_first_value(cached, LAYER_1_UP, 0.25)
    load(cached)  # already verified here: names, shapes and sizes only (cheap)
    with pytest.raises(ModelLoadError, match="SHA-256 differs"):
        load(cached, verify_cache=True)


def test_a_folder_without_manifest_is_checked_in_full_then_recorded(legacy):
    load(legacy)
    manifest = json.loads((legacy / cache_check.MANIFEST_FILE).read_text())
    assert set(manifest["files"]) == {p.name for p in legacy.iterdir()} - {cache_check.MANIFEST_FILE}
    assert manifest["tensors"]["model.safetensors"][LAYER_1_UP] == ["F32", [32, 16]]
    cache_check._verified.clear()
    assert cache_check.check_folder(legacy, verify_weights=True)


def test_changed_small_files_and_added_or_missing_files_are_refused(cached, template):
    config = (cached / "config.json").read_text()
    assert '"num_hidden_layers": 2' in config
    (cached / "config.json").write_text(config.replace('"num_hidden_layers": 2', '"num_hidden_layers": 1'))  # same size
    with pytest.raises(ModelLoadError, match="config.json's SHA-256 differs"):
        load(cached)
    (cached / "config.json").write_text(config)
    (cached / "generation_config.json").write_text("{}")
    with pytest.raises(ModelLoadError, match="generation_config.json is 2 bytes, the conversion wrote"):
        load(cached)
    shutil.copy(template / "generation_config.json", cached / "generation_config.json")
    (cached / "extra.safetensors").write_bytes(b"")
    with pytest.raises(ModelLoadError, match=r"added \['extra.safetensors'\]"):
        load(cached)
    (cached / "extra.safetensors").unlink()
    (cached / "tokenizer.json").unlink()
    with pytest.raises(ModelLoadError, match=r"missing \['tokenizer.json'\]"):
        load(cached)


def test_special_files_in_the_cache_are_refused_without_blocking(cached, legacy):
    def blocked(*_):
        raise TimeoutError("the cache check blocked on a FIFO")

    previous = signal.signal(signal.SIGALRM, blocked)
    signal.alarm(20)
    try:
        for folder in (cached, legacy):
            (folder / "config.json").unlink()
            os.mkfifo(folder / "config.json")
            with pytest.raises(ModelLoadError, match="config.json is a FIFO"):
                load(folder)
        (cached / "config.json").unlink()
        (cached / "config.json").symlink_to("/dev/zero")
        with pytest.raises(ModelLoadError, match="symlink to a character device"):
            load(cached)
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def test_load_model_checks_the_default_cache_folder(cached, tmp_path, monkeypatch):
    root = tmp_path / "root"
    root.mkdir()
    shutil.move(cached, root / "smollm2-135m-instruct-hf")
    monkeypatch.setenv(loading.CACHE_ENV, str(root))
    model = loading.load_model(n_ctx=N_CTX, verify_cache=True)
    assert model.cfg.n_layers == 2 and model.cfg.n_ctx == N_CTX
    remove_tensor(root / "smollm2-135m-instruct-hf", LAYER_1_UP)
    with pytest.raises(ModelLoadError, match="lacks tensors"):
        loading.load_model(n_ctx=N_CTX)


@pytest.mark.default_model
def test_the_real_default_cache_carries_a_manifest_that_verifies(default_model):
    folder = loading.default_model_folder()
    assert cache_check.check_folder(folder, verify_weights=True)
    manifest = json.loads((folder / cache_check.MANIFEST_FILE).read_text())
    # Llama's 9 tensors per layer (2 norms, q/k/v/o, gate/up/down) in 30 layers, the embedding and the
    # final norm; the unembedding is tied to the embedding and not stored.
    assert len(manifest["tensors"]["model.safetensors"]) == 9 * 30 + 2
