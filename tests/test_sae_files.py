"""The SAE folder format: round trips, SAELens interop both ways, and every malformed-file case."""

from __future__ import annotations

import json
import os
import pickle
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from sae import SAEFileError, load_sae
from sae.files import CONFIG_FILE, WEIGHTS_FILE
from tests.conftest import make_sae

@pytest.fixture()
def saved(tmp_path):
    sae = make_sae(8, 16, hook_name="blocks.2.hook_resid_pre", model_name="tiny",
                   model_from_pretrained_kwargs={"fold_ln": False})
    folder = sae.save(tmp_path / "sae")
    return sae, folder


def edit_cfg(folder: Path, change) -> None:
    cfg = json.loads((folder / CONFIG_FILE).read_text())
    change(cfg)
    (folder / CONFIG_FILE).write_text(json.dumps(cfg))


def drop_hash(cfg: dict) -> None:
    """Make the file read as SAELens-written: no latentpatch section, so no hash to verify."""
    cfg["metadata"].pop("latentpatch")


@pytest.mark.parametrize("architecture,k", [("standard", None), ("topk", 3), ("jumprelu", None)])
def test_save_load_round_trip_is_identical(tmp_path, architecture, k):
    sae = make_sae(8, 16, hook_name="blocks.0.hook_resid_post", model_name="m", architecture=architecture, k=k)
    loaded = load_sae(sae.save(tmp_path / "s"))
    x = torch.randn(5, 8)
    assert loaded.cfg == sae.cfg
    assert torch.equal(loaded.encode(x), sae.encode(x))
    assert torch.equal(loaded(x).reconstruction, sae(x).reconstruction)


def test_save_folds_normalization(tmp_path):
    sae = make_sae(8, 16, hook_name=None, model_name=None, normalization_scale=4.0)
    loaded = load_sae(sae.save(tmp_path / "s"))
    x = torch.randn(5, 8) * 4
    assert loaded.cfg.normalization_scale is None
    torch.testing.assert_close(loaded(x).reconstruction, sae(x).reconstruction, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("architecture,k", [("standard", None), ("topk", 3), ("jumprelu", None)])
def test_saelens_reads_our_files(tmp_path, architecture, k):
    from sae_lens import SAE

    sae = make_sae(8, 16, hook_name="blocks.1.hook_resid_pre", model_name="m", architecture=architecture, k=k)
    theirs = SAE.load_from_disk(sae.save(tmp_path / "s"))
    x = torch.randn(7, 8)
    z = sae.encode(x)
    assert torch.equal(theirs.encode(x), z)
    assert torch.equal(theirs.decode(z), sae.decode(z))
    assert theirs.cfg.metadata.hook_name == "blocks.1.hook_resid_pre"
    assert theirs.cfg.metadata.model_name == "m"


@pytest.mark.parametrize("kind", ["standard", "topk", "jumprelu"])
def test_we_read_saelens_files(tmp_path, kind):
    from sae_lens import JumpReLUSAE, JumpReLUSAEConfig, StandardSAE, StandardSAEConfig, TopKSAE, TopKSAEConfig

    classes = {"standard": (StandardSAE, StandardSAEConfig, {}), "topk": (TopKSAE, TopKSAEConfig, {"k": 4}),
               "jumprelu": (JumpReLUSAE, JumpReLUSAEConfig, {})}
    cls, cfg_cls, extra = classes[kind]
    theirs = cls(cfg_cls(d_in=8, d_sae=16, **extra))
    with torch.no_grad():
        for p in theirs.parameters():
            p.copy_(torch.randn_like(p) * 0.5)
    theirs.cfg.metadata.hook_name = "blocks.3.hook_resid_pre"
    theirs.save_model(tmp_path / "s")
    ours = load_sae(tmp_path / "s")
    x = torch.randn(6, 8)
    assert torch.equal(ours.encode(x), theirs.encode(x))
    assert torch.equal(ours.decode(ours.encode(x)), theirs.decode(theirs.encode(x)))
    assert ours.hook_name == "blocks.3.hook_resid_pre"
    # A file written by SAELens carries no hash; ours written back does, and SAELens reads it again.
    from sae_lens import SAE

    again = SAE.load_from_disk(ours.save(tmp_path / "back"))
    assert torch.equal(again.encode(x), theirs.encode(x))


def test_reads_flat_pre_6_config(tmp_path, saved):
    sae, folder = saved
    legacy = {"d_in": 8, "d_sae": 16, "dtype": "float32", "device": "cpu", "apply_b_dec_to_input": True,
              "model_name": "tiny", "hook_point": "blocks.2.hook_resid_pre", "hook_point_layer": 2,
              "activation_fn_str": "relu", "context_size": 128, "normalize_activations": False,
              "sae_lens_training_version": "3.0.0"}
    (folder / CONFIG_FILE).write_text(json.dumps(legacy))
    loaded = load_sae(folder)
    assert loaded.hook_name == "blocks.2.hook_resid_pre" and loaded.cfg.context_size == 128
    assert torch.equal(loaded.W_enc, sae.W_enc)


def expect_error(folder: Path, pattern: str) -> SAEFileError:
    with pytest.raises(SAEFileError, match=pattern) as info:
        load_sae(folder)
    assert str(folder) in str(info.value)
    return info.value


@pytest.mark.parametrize("with_hash", [True, False])
def test_truncated_weights_at_many_offsets(saved, with_hash):
    _, folder = saved
    if not with_hash:
        edit_cfg(folder, drop_hash)
    blob = (folder / WEIGHTS_FILE).read_bytes()
    ends = {0, 1, 7, 8, 9, 20, len(blob) // 3, len(blob) // 2, len(blob) - 9, len(blob) - 1}
    cuts = ends | set(range(0, len(blob), 97))
    for cut in sorted(cuts):
        (folder / WEIGHTS_FILE).write_bytes(blob[:cut])
        expect_error(folder, "SHA-256|truncated|header|offsets|data section|JSON")


def test_trailing_bytes(saved):
    _, folder = saved
    edit_cfg(folder, drop_hash)
    with open(folder / WEIGHTS_FILE, "ab") as handle:
        handle.write(b"\0" * 16)
    expect_error(folder, "trailing bytes")


def test_absurd_header_length(saved):
    _, folder = saved
    edit_cfg(folder, drop_hash)
    blob = (folder / WEIGHTS_FILE).read_bytes()
    (folder / WEIGHTS_FILE).write_bytes(struct.pack("<Q", 2**62) + blob[8:])
    expect_error(folder, "header length")


def write_weights(folder: Path, tensors: dict) -> None:
    save_file(tensors, folder / WEIGHTS_FILE)
    edit_cfg(folder, drop_hash)


def test_wrong_tensor_names(saved):
    sae, folder = saved
    tensors = {k: v.detach() for k, v in sae.state_dict().items()}
    tensors["encoder.weight"] = tensors.pop("W_enc")
    write_weights(folder, tensors)
    expect_error(folder, r"missing \['W_enc'\], unexpected \['encoder.weight'\]")


def test_shape_contradicting_config(saved):
    sae, folder = saved
    tensors = {k: v.detach() for k, v in sae.state_dict().items()}
    tensors["W_dec"] = torch.zeros(16, 9)
    write_weights(folder, tensors)
    expect_error(folder, r"W_dec.*\(16, 9\).*\(16, 8\)")


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_weights(saved, bad):
    sae, folder = saved
    tensors = {k: v.detach().clone() for k, v in sae.state_dict().items()}
    tensors["b_enc"][3] = bad
    write_weights(folder, tensors)
    expect_error(folder, "non-finite")


def test_unknown_and_missing_config_keys(saved):
    _, folder = saved
    edit_cfg(folder, lambda cfg: cfg.update(surprise=1))
    expect_error(folder, r"unknown config keys \['surprise'\]")
    edit_cfg(folder, lambda cfg: (cfg.pop("surprise"), cfg.pop("d_sae")))
    expect_error(folder, r"missing config keys \['d_sae'\]")


def test_newer_format_version_is_refused(saved):
    _, folder = saved
    edit_cfg(folder, lambda cfg: cfg["metadata"]["latentpatch"].update(format_version=99))
    expect_error(folder, "newer than the supported")


def test_hash_mismatch_is_refused(saved):
    sae, folder = saved
    tensors = {k: v.detach().clone() for k, v in sae.state_dict().items()}
    tensors["b_dec"][0] += 1
    save_file(tensors, folder / WEIGHTS_FILE)  # valid safetensors, wrong contents
    expect_error(folder, "SHA-256")


@pytest.mark.parametrize("text", ["{not json", "[1, 2]", '{"d_in": NaN, "d_sae": 4}'])
def test_invalid_json_config(saved, text):
    _, folder = saved
    (folder / CONFIG_FILE).write_text(text)
    expect_error(folder, "JSON")


def test_missing_files_and_unsupported_features(saved, tmp_path):
    _, folder = saved
    expect_error(tmp_path / "nowhere", "not a folder")
    edit_cfg(folder, lambda cfg: cfg.update(normalize_activations="layer_norm"))
    expect_error(folder, "sae_lens.SAE.load_from_disk")
    (folder / WEIGHTS_FILE).unlink()
    edit_cfg(folder, lambda cfg: cfg.update(normalize_activations="none"))
    expect_error(folder, "missing")


class _Payload:
    def __init__(self, sentinel: str) -> None:
        self.sentinel = sentinel

    def __reduce__(self):
        return (os.system, (f"touch {self.sentinel}",))


def test_pickle_payload_is_never_run(saved, tmp_path):
    _, folder = saved
    sentinel = tmp_path / "pwned"
    (folder / WEIGHTS_FILE).write_bytes(pickle.dumps(_Payload(str(sentinel))))
    expect_error(folder, "header length")  # the header is checked before the data is read and hashed
    edit_cfg(folder, drop_hash)
    expect_error(folder, "header|truncated")
    torch.save({"W_enc": _Payload(str(sentinel))}, folder / WEIGHTS_FILE)
    expect_error(folder, "header|truncated|JSON")
    assert not sentinel.exists()


def test_write_is_atomic_when_interrupted(saved, monkeypatch):
    sae, folder = saved
    before = {name: (folder / name).read_bytes() for name in (CONFIG_FILE, WEIGHTS_FILE)}
    other = make_sae(8, 16, hook_name="blocks.2.hook_resid_pre", model_name="tiny", seed=5)

    def crash(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(KeyboardInterrupt):
        other.save(folder)
    monkeypatch.undo()
    assert {name: (folder / name).read_bytes() for name in before} == before
    assert sorted(p.name for p in folder.iterdir()) == sorted(before)  # no temporary files left
    assert torch.equal(load_sae(folder).W_enc, sae.W_enc)


def test_crash_between_weights_and_config_is_detected(saved, monkeypatch):
    _, folder = saved
    other = make_sae(8, 16, hook_name="blocks.2.hook_resid_pre", model_name="tiny", seed=5)
    real_replace, calls = os.replace, []

    def replace_once(src, dst):
        calls.append(dst)
        if len(calls) == 2:  # the config, written after the weights
            raise KeyboardInterrupt
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace_once)
    with pytest.raises(KeyboardInterrupt):
        other.save(folder)
    monkeypatch.undo()
    expect_error(folder, "SHA-256")
