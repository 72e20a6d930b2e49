"""A release's config is covered by its registry hash (issue 30, item 4).

Only the weights were hashed: a `cfg.json` edited to another hook, another model or
`apply_b_dec_to_input` flipped loaded as verified, and the SAE then ran at the wrong site or
computed something else. The registry now records `config_sha256`, the hash of the config's
defining fields, and loading refuses a config whose defining fields changed.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json

import pytest

from sae import load_sae, save_sae
from sae.errors import SAEFileError
from sae.registry import (DEFINING_FIELDS, ReleaseIntegrityError, config_sha256, list_releases, load_release,
                          release_entry, verify_release)
from tests.conftest import make_sae

SAE_ID = "blocks.1.hook_resid_pre"


@pytest.fixture()
def release_root(tmp_path):
    folder = save_sae(make_sae(8, 16, hook_name=SAE_ID, model_name="tiny"), tmp_path / "tiny-res" / SAE_ID)
    sha = hashlib.sha256((folder / "sae_weights.safetensors").read_bytes()).hexdigest()
    registry = {"tiny-res": {"model": "tiny", "saes": {SAE_ID: {
        "path": f"tiny-res/{SAE_ID}", "weights_sha256": sha, "config_sha256": config_sha256(load_sae(folder).cfg),
        "recipe": {"commands": []}, "heldout": {}}}}}
    (tmp_path / "registry.json").write_text(json.dumps(registry))
    return tmp_path


def edit_cfg(root, change) -> None:
    path = root / "tiny-res" / SAE_ID / "cfg.json"
    cfg = json.loads(path.read_text())
    change(cfg)
    path.write_text(json.dumps(cfg))


EDITS = {
    "hook_name": lambda cfg: cfg["metadata"].update(hook_name="blocks.0.hook_resid_pre"),
    "model_name": lambda cfg: cfg["metadata"].update(model_name="gpt2"),
    "apply_b_dec_to_input": lambda cfg: cfg.update(apply_b_dec_to_input=not cfg["apply_b_dec_to_input"]),
    "model_from_pretrained_kwargs": lambda cfg: cfg["metadata"].update(model_from_pretrained_kwargs={"fold_ln": True}),
    "prepend_bos": lambda cfg: cfg["metadata"].update(prepend_bos=False),
}


@pytest.mark.parametrize("field", sorted(EDITS))
def test_an_edited_defining_field_is_refused(release_root, field):
    load_release("tiny-res", SAE_ID, root=release_root)  # intact: loads
    edit_cfg(release_root, EDITS[field])
    with pytest.raises(ReleaseIntegrityError, match="the config was edited") as info:
        load_release("tiny-res", SAE_ID, root=release_root)
    assert info.value.path.name == "cfg.json"
    with pytest.raises(ReleaseIntegrityError):
        verify_release(release_entry("tiny-res", SAE_ID, root=release_root))


def test_the_hash_covers_each_defining_field_and_nothing_else(release_root):
    cfg = load_sae(release_root / "tiny-res" / SAE_ID).cfg
    changed = {"d_in": 9, "d_sae": 17, "architecture": "jumprelu", "k": None, "apply_b_dec_to_input": False,
               "dtype": "float16", "normalization_scale": 2.0, "hook_name": "x", "model_name": "y",
               "model_from_pretrained_kwargs": {"center_unembed": True}, "prepend_bos": False}
    assert set(changed) == set(DEFINING_FIELDS)
    for field in DEFINING_FIELDS:
        if field == "k":  # k only exists for topk: compare two topk configs
            a = dataclasses.replace(cfg, architecture="topk", k=3)
            assert config_sha256(a) != config_sha256(dataclasses.replace(a, k=4))
            continue
        assert config_sha256(dataclasses.replace(cfg, **{field: changed[field]})) != config_sha256(cfg), field
    for field, value in {"context_size": 7, "dataset_path": "elsewhere", "extra_metadata": {"note": "x"}}.items():
        assert config_sha256(dataclasses.replace(cfg, **{field: value})) == config_sha256(cfg), field


def test_a_non_defining_edit_still_loads(release_root):
    edit_cfg(release_root, lambda cfg: cfg["metadata"].update(dataset_path="somewhere/else", context_size=64))
    assert load_release("tiny-res", SAE_ID, root=release_root).cfg.hook_name == SAE_ID


def test_an_entry_without_a_config_hash_is_refused(release_root):
    registry = json.loads((release_root / "registry.json").read_text())
    del registry["tiny-res"]["saes"][SAE_ID]["config_sha256"]
    (release_root / "registry.json").write_text(json.dumps(registry))
    with pytest.raises(SAEFileError, match="lacks 'config_sha256'"):
        load_release("tiny-res", SAE_ID, root=release_root)


@pytest.mark.parametrize("release,sae_id", [(r, i) for r, ids in list_releases().items() for i in ids])
def test_every_shipped_entry_records_its_config_hash(release, sae_id):
    entry = release_entry(release, sae_id)
    assert entry.config_sha256 == config_sha256(load_sae(entry.folder).cfg)
    verify_release(entry)
