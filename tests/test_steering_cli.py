"""`latentpatch steer` as documented: generate mode, --compare, and one-line errors."""

from __future__ import annotations

import json

import pytest
from tests.conftest import make_sae

from latentpatch import cli
from latentpatch.cli import steer as cli_steer

pytestmark = pytest.mark.default_model

CONCEPT = {"name": "paris", "positive": ["I love Paris, France."], "negative": ["I love London, England."],
           "target_tokens": [" Paris"], "heldout": ["My favourite city is"], "neutral": ["The cat sat on the mat."]}


@pytest.fixture
def sae_dir(default_model_4l, tmp_path, monkeypatch):
    # The CLI loads the model the SAE names (the full default model); the 4-layer one is enough here.
    monkeypatch.setattr(cli_steer, "load_model_for", lambda sae, name=None: default_model_4l)
    sae = make_sae(576, 64, hook_name="blocks.2.hook_resid_pre", model_name=default_model_4l.cfg.model_name)
    return str(sae.save(tmp_path / "sae"))


def test_generate_mode_prints_both_continuations(sae_dir, capsys):
    code = cli.main(["steer", sae_dir, "--positive", "I love Paris.", "--negative", "I love London.",
                     "--prompt", "Hello", "The city of", "--k", "2", "--max-new-tokens", "3", "--json"])
    assert code == 0
    out = json.loads(capsys.readouterr().out)
    assert out["site"] == "blocks.2.hook_resid_pre" and len(out["latents"]) == 2
    assert set(out["generations"]["prompt 1"]) == {"prompt", "unsteered", "steered"}
    assert out["config"]["method"] == "add" and out["config"]["coefficient"] == 4.0


def test_compare_mode_writes_the_table(sae_dir, tmp_path, capsys):
    concept = tmp_path / "concept.json"
    concept.write_text(json.dumps(CONCEPT))
    code = cli.main(["steer", sae_dir, "--compare", str(concept), "--out", str(tmp_path / "cmp"), "--k-values", "1", "2",
                     "--coefficients", "2", "--methods", "add", "--seeds", "0", "--max-new-tokens", "2", "--json"])
    assert code == 0
    out = json.loads(capsys.readouterr().out)
    assert out["rows"] == 3 and set(out["best_effect_per_setting"]) == {"add K=1", "add K=2"}
    assert (tmp_path / "cmp" / "steering.csv").exists() and (tmp_path / "cmp" / "manifest.json").exists()


def test_errors_are_one_line(sae_dir, tmp_path, capsys):
    assert cli.main(["steer", sae_dir, "--prompt", "Hi"]) == 1
    assert "needs --positive, --negative and --prompt" in capsys.readouterr().err
    concept = tmp_path / "bad.json"
    concept.write_text(json.dumps({"name": "x"}))
    assert cli.main(["steer", sae_dir, "--compare", str(concept), "--out", str(tmp_path / "o")]) == 1
    err = capsys.readouterr().err
    assert "needs exactly the keys" in err and len(err.strip().splitlines()) == 1
