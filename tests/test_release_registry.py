"""Shipped SAE releases: the registry's typed errors, hash verification, float16 storage loaded as
float32, every shipped entry intact, and the recorded recipe runs (tiny token budget)."""

from __future__ import annotations

import hashlib
import json
import shlex
from pathlib import Path

import pytest
import torch

from sae import load_sae, save_sae
from sae.registry import (RELEASES_DIR, ReleaseIntegrityError, UnknownReleaseError, config_sha256, half_precision,
                          list_releases, load_release, release_entry)
from tests.conftest import make_sae

SHIPPED = list_releases()


@pytest.fixture()
def release_root(tmp_path):
    sae = make_sae(16, 32, hook_name="blocks.1.hook_resid_pre", model_name="tiny")
    folder = save_sae(half_precision(sae), tmp_path / "tiny-res" / "blocks.1.hook_resid_pre")
    sha = hashlib.sha256((folder / "sae_weights.safetensors").read_bytes()).hexdigest()
    registry = {"tiny-res": {"model": "tiny", "saes": {"blocks.1.hook_resid_pre": {
        "path": "tiny-res/blocks.1.hook_resid_pre", "weights_sha256": sha, "config_sha256": config_sha256(load_sae(folder).cfg),
        "recipe": {"commands": ["latentpatch train ..."]}, "heldout": {"l0": 1.0}}}}}
    (tmp_path / "registry.json").write_text(json.dumps(registry))
    return tmp_path, sae


def test_unknown_release_or_id_lists_the_available_ones(release_root):
    root, _ = release_root
    with pytest.raises(UnknownReleaseError, match="'gpt2-res' is not shipped with latentpatch; available: tiny-res"):
        load_release("gpt2-res", "blocks.1.hook_resid_pre", root=root)
    with pytest.raises(UnknownReleaseError, match="available: blocks.1.hook_resid_pre") as info:
        load_release("tiny-res", "blocks.2.hook_resid_pre", root=root)
    assert info.value.available == ["blocks.1.hook_resid_pre"] and isinstance(info.value, LookupError)
    assert list_releases(root=root) == {"tiny-res": ["blocks.1.hook_resid_pre"]}


def test_float16_storage_loads_as_float32_and_a_changed_file_is_refused(release_root):
    root, sae = release_root
    loaded = load_release("tiny-res", "blocks.1.hook_resid_pre", root=root)
    assert loaded.W_enc.dtype == torch.float32 and loaded.cfg.dtype == "float32"
    assert torch.equal(loaded.W_dec, sae.folded().W_dec.detach().half().float())
    assert load_release("tiny-res", "blocks.1.hook_resid_pre", root=root, dtype="float16").W_dec.dtype == torch.float16
    weights = root / "tiny-res" / "blocks.1.hook_resid_pre" / "sae_weights.safetensors"
    blob = bytearray(weights.read_bytes())
    blob[-1] ^= 1  # one bit of one weight
    weights.write_bytes(bytes(blob))
    with pytest.raises(ReleaseIntegrityError, match="differs from the registry's"):
        load_release("tiny-res", "blocks.1.hook_resid_pre", root=root)


@pytest.mark.parametrize("release,sae_id", [(r, i) for r, ids in SHIPPED.items() for i in ids])
def test_every_shipped_sae_is_intact_small_and_documented(release, sae_id):
    entry = release_entry(release, sae_id)
    assert (entry.folder / "sae_weights.safetensors").stat().st_size <= 12 * 1024 * 1024
    sae = load_release(release, sae_id)
    # an id is the SAE's hook name, with a suffix where a release ships two SAEs at one site (v2's "-l1")
    assert sae_id.split("-", 1)[0] == sae.cfg.hook_name and sae.cfg.model_from_pretrained_kwargs is not None
    assert entry.recipe["commands"] and len(entry.recipe["corpus_digest"]) == 64
    for key in ("ce_loss_score", "kl_div_with_sae", "explained_variance", "l0", "n_tokens"):
        assert isinstance(entry.heldout[key], (int, float))


@pytest.mark.parametrize("release,sae_id", [(r, i) for r, ids in SHIPPED.items() for i in ids])
def test_recorded_commands_name_no_path_of_the_machine_that_ran_them(release, sae_id):
    recipe = release_entry(release, sae_id).recipe
    for command in [*recipe["commands"], recipe["train_command"], *recipe["train_caches"]]:
        words = shlex.split(command)
        absolute = [w for w in words if Path(w).is_absolute() or "/work/" in w or w.startswith("~")]
        assert not absolute, f"{release}/{sae_id} records {absolute} in {command!r}"
    assert any(w.startswith("$OUT/") for c in recipe["commands"] for w in shlex.split(c))


def test_no_shipped_release_file_names_a_path_of_the_machine_that_made_it():
    """Every JSON record beside the shipped SAEs (registry, sweeps, benchmark outputs) names its folders
    relative to $OUT, as the recipes do."""
    import re

    from sae.registry import RELEASES_DIR

    absolute = re.compile(r'"(/(?:work|root|home|tmp)/[^"]*)"|[\s=](/(?:work|root|home|tmp)/\S*)')
    found = [f"{path.relative_to(RELEASES_DIR)}:{n}: {m.group(0).strip()}" for path in sorted(Path(RELEASES_DIR).rglob("*.json"))
             for n, line in enumerate(path.read_text().splitlines(), 1) for m in absolute.finditer(line)]
    assert found == []
    assert absolute.search('  "out": "/work/runs/sweep-l15",') and absolute.search("--out /work/runs/x")


def test_recipe_writes_paths_under_the_output_root_as_out_and_refuses_others(tmp_path):
    from latentpatch.release import relative_to_out

    root = tmp_path / "runs"
    command = f"latentpatch train --activation-cache {root}/a/blocks.1.hook_resid_pre {root}/b --text real --out {root}"
    assert relative_to_out(command, root) == ("latentpatch train --activation-cache $OUT/a/blocks.1.hook_resid_pre "
                                              "$OUT/b --text real --out $OUT")
    quoted = f"latentpatch train --out '{root}/my run'"
    assert relative_to_out(quoted, root) == "latentpatch train --out $OUT/'my run'"
    assert shlex.split(relative_to_out(quoted, root)) == ["latentpatch", "train", "--out", "$OUT/my run"]
    with pytest.raises(ValueError, match="outside --out-root"):
        relative_to_out(f"latentpatch train --out {tmp_path}/elsewhere", root)


def test_the_demo_site_is_shipped():
    assert "blocks.15.hook_resid_pre" in SHIPPED.get("smollm2-135m-res", []), SHIPPED


def _shrunk(command: str, tmp: Path) -> list[str]:
    """The recorded command with its paths moved under `tmp`, a tiny token budget and a skip that fits
    the test's few documents (a start past the text's end is refused)."""
    argv = shlex.split(command)[1:]  # drop "latentpatch"
    out, paths = [], False
    for i, arg in enumerate(argv):
        if argv[i - 1] == "--tokens":
            arg = "4096" if argv[0] == "train" else "1000"
        elif argv[i - 1] == "--rows-per-chunk":
            arg = "4"
        elif argv[i - 1] == "--skip-rows":
            arg = "2"  # the recorded skip is into the real text; the test's few documents hold fewer rows
        elif arg.startswith("--"):
            paths = arg in ("--out", "--activation-cache")
        elif paths:
            arg = arg.replace("$OUT", str(tmp), 1)
        out.append(arg)
    return out + ["--no-progress"] if argv[0] == "train" else out


@pytest.mark.default_model
def test_recorded_recipe_runs_at_a_tiny_budget(tmp_path, monkeypatch):
    from latentpatch.cli.entry import main
    import training.data.mix as mix

    entry = release_entry("smollm2-135m-res", "blocks.15.hook_resid_pre")
    # The recipe's text, replaced by a few documents: no network, no generation, same code path.
    monkeypatch.setattr(mix, "real_documents", lambda source, split, folder=None: [f"{source} text number {i}. " * 40
                                                                                   for i in range(20)])
    chat = "<|im_start|>user\nTell me about rivers.<|im_end|>\n<|im_start|>assistant\n" + "Rivers run to the sea. " * 30
    monkeypatch.setattr(mix, "generated_documents", lambda split: [chat] * 5)
    for command in entry.recipe["commands"]:
        assert main(_shrunk(command, tmp_path)) == 0, command
    trained = sorted(tmp_path.rglob("sae-*/cfg.json"))
    assert trained and all(json.loads(p.read_text())["metadata"]["hook_name"] == "blocks.15.hook_resid_pre"
                           for p in trained)


def test_package_data_names_the_shipped_files():
    pyproject = (Path(__file__).parents[1] / "pyproject.toml").read_text()
    assert '"releases/*/*/sae_weights.safetensors"' in pyproject and RELEASES_DIR.name == "releases"


def test_reevaluate_measures_the_shipped_weights_and_records_the_figures(release_root, monkeypatch):
    import latentpatch.release as release

    root, sae = release_root
    seen = {}

    def fake_evaluate(dirs, *, n_rows, saes, corpus):  # the real one loads the default model: tested elsewhere
        seen["W_dec"], seen["n_rows"] = saes[0].W_dec, n_rows
        assert corpus == "real"
        return [{"sae": str(dirs[0]), "ce_loss_recovered": 0.5, "n_rows": n_rows}]

    monkeypatch.setattr(release, "evaluate", fake_evaluate)
    entry = release.reevaluate("tiny-res", "blocks.1.hook_resid_pre", root=root, n_rows=7)
    assert torch.equal(seen["W_dec"], sae.folded().W_dec.detach().half().float()) and seen["n_rows"] == 7
    recorded = json.loads((root / "registry.json").read_text())["tiny-res"]["saes"]["blocks.1.hook_resid_pre"]
    assert recorded["heldout"] == entry["heldout"] == {"ce_loss_recovered": 0.5, "n_rows": 7}
    assert recorded["weights_sha256"] == entry["weights_sha256"]  # nothing else changed


def test_export_many_ships_two_saes_of_one_site_under_their_ids_evaluated_together(tmp_path, monkeypatch):
    import latentpatch.release as release

    runs = []
    for seed, width in ((1, 32), (2, 48)):
        sae = make_sae(16, width, hook_name="blocks.1.hook_resid_pre", model_name="tiny", seed=seed)
        runs.append((save_sae(sae, tmp_path / f"run{seed}"), sae))
    calls = []

    def fake_evaluate(dirs, *, n_rows, saes, corpus):  # the real one loads the default model: tested elsewhere
        calls.append(([s.cfg.d_sae for s in saes], corpus))
        return [{"sae": str(d), "l0": float(s.cfg.d_sae), "n_rows": n_rows} for d, s in zip(dirs, saes)]

    monkeypatch.setattr(release, "evaluate", fake_evaluate)
    root = tmp_path / "releases"
    root.mkdir()
    entries = release.export_many([runs[0][0], runs[1][0]], "tiny-v2", [{"commands": ["a"]}, {"commands": ["b"]}],
                                  root=root, n_rows=5, sae_ids=[None, "blocks.1.hook_resid_pre-wide"],
                                  corpus="real-no-mail")
    assert calls == [([32, 48], "real-no-mail")]  # one evaluation of both shipped SAEs, on the named mix
    assert [e["heldout"]["l0"] for e in entries] == [32.0, 48.0]
    assert list_releases(root=root) == {"tiny-v2": ["blocks.1.hook_resid_pre", "blocks.1.hook_resid_pre-wide"]}
    wide = load_release("tiny-v2", "blocks.1.hook_resid_pre-wide", root=root)
    assert wide.cfg.d_sae == 48 and torch.allclose(wide.W_dec, runs[1][1].folded().W_dec.detach().half().float())
    recorded = json.loads((root / "registry.json").read_text())["tiny-v2"]["saes"]
    assert recorded["blocks.1.hook_resid_pre"]["recipe"] == {"commands": ["a"]}
    with pytest.raises(ValueError, match="one of each per SAE"):
        release.export_many([runs[0][0]], "tiny-v2", [], root=root)
