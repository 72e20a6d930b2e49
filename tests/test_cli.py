"""The command line: demo output, inspect, and one-line errors."""

from __future__ import annotations

import json

import pytest

from latentpatch.cli import main
from tests.conftest import make_sae


def test_inspect_prints_config_and_statistics(tmp_path, capsys):
    folder = make_sae(8, 16, hook_name="blocks.0.hook_resid_pre", model_name="m").save(tmp_path / "s")
    assert main(["inspect", str(folder), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["config"]["d_sae"] == 16 and result["statistics"]["n_parameters"] == 8 * 16 * 2 + 16 + 8


def test_errors_are_one_line_with_nonzero_exit(tmp_path, capsys):
    assert main(["inspect", str(tmp_path / "missing")]) == 1
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "SAEFileError" in err and "not a folder" in err


@pytest.fixture(scope="module")
def topk_sae_dir(tmp_path_factory):
    from patching import DEFAULT_MODEL

    folder = tmp_path_factory.mktemp("sae")
    return make_sae(576, 1024, hook_name="blocks.20.hook_resid_pre", model_name=DEFAULT_MODEL, architecture="topk",
                    k=16).save(folder / "sae")


EIFFEL = ["--clean", "The Eiffel Tower is located in the city of", "--corrupted",
          "The Colosseum is located in the city of", "--answer", " Paris", "--wrong", " Rome"]


@pytest.mark.default_model
def test_patch_attribute_eval_commands(topk_sae_dir, tmp_path, capsys, default_model, monkeypatch):
    import patching

    monkeypatch.setattr(patching, "load_model", lambda *a, **k: default_model)
    assert main(["patch", str(topk_sae_dir), *EIFFEL, "--unit", "position", "--out", str(tmp_path / "p"), "--json"]) == 0
    patched = json.loads(capsys.readouterr().out)
    assert patched["metric_clean"][0] > patched["metric_corrupted"][0] and len(patched["top"]) <= 10
    assert (tmp_path / "p" / "manifest.json").exists() and (tmp_path / "p" / "effects.png").exists()
    assert main(["attribute", str(topk_sae_dir), *EIFFEL, "--verify", "5", "--json"]) == 0
    attributed = json.loads(capsys.readouterr().out)
    assert attributed["method"] == "atp" and attributed["verification"]["n_checked"] == 10
    assert main(["eval", str(topk_sae_dir), "--json"]) == 0
    evaluated = json.loads(capsys.readouterr().out)
    assert evaluated["site"] == "blocks.20.hook_resid_pre" and evaluated["sparsity"]["l0"] == pytest.approx(16.0)


def test_patch_with_mismatched_lengths_is_one_line_error(topk_sae_dir, capsys):
    args = ["patch", str(topk_sae_dir), "--clean", "Short prompt", "--corrupted", "A much longer prompt than that one",
            "--answer", " a", "--wrong", " b"]
    assert main(args) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("latentpatch patch: PatchingError") and "clean has 3 tokens, corrupted 8" in err
    assert "\n" not in err
