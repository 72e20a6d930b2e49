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


@pytest.mark.default_model
def test_demo_reports_exact_identity_and_metrics(capsys, default_model, monkeypatch):
    import patching

    monkeypatch.setattr(patching, "load_model", lambda *a, **k: default_model)
    assert main(["demo", "--layer", "10", "--d-sae", "1152", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["splice_identity_exact"] is True
    assert result["sanity"]["eiffel_top_token"] == " Paris"
    assert result["splice_metrics"]["ce_spliced"] > result["splice_metrics"]["ce_clean"]
