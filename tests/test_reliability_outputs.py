"""Output folders are checked before the work and never silently replaced (issue 30, items 6 and 7).

`eval --out FILE` failed after a minute of evaluation, `harvest --out FILE` after the model
loaded (a raw NotADirectoryError), and as root `os.access` called `/proc/x` writable so `patch --out
/proc/x` failed after its sweep; `train --out` replaced an SAE's weights and a second harvest
replaced the first's `harvest.json`. The model loader is replaced by one that fails loudly, so each
refusal below is shown to come before any model loads.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import patching.model.loading as loading
from latentpatch.cli.entry import main
from training.errors import RunPathError
from training.paths import check_output_folder
from tests.conftest import make_sae


class LoadedAModel(Exception):
    """Raised by the stand-in loader: reaching it means every check before the model passed."""


@pytest.fixture()
def no_model(monkeypatch):
    def refuse(*args, **kwargs):
        raise LoadedAModel("the model loader was reached")

    monkeypatch.setattr(loading, "load_model", refuse)
    import latentpatch.cli.evaluate as evaluate

    monkeypatch.setattr(evaluate, "load_for", refuse)


def test_the_output_check_writes_a_probe_instead_of_trusting_os_access(tmp_path, monkeypatch):
    monkeypatch.setattr("os.access", lambda *args, **kwargs: True)  # what root is told about /proc
    with pytest.raises(RunPathError, match="no permission to write in /proc"):
        check_output_folder("/proc/latentpatch-output")
    assert check_output_folder(tmp_path / "new" / "deeper") == tmp_path / "new" / "deeper"
    assert not any(tmp_path.iterdir())  # the probe leaves nothing behind, and creates nothing


def run(argv: list[str], capsys) -> tuple[int, str]:
    code = main(argv)
    return code, capsys.readouterr().err


def test_eval_and_harvest_refuse_a_file_as_out_before_the_model_loads(tmp_path, no_model, capsys):
    sae = make_sae(8, 16, hook_name="blocks.1.hook_resid_pre", model_name="tiny").save(tmp_path / "sae")
    file = tmp_path / "a-file"
    file.write_text("x")
    for argv in (["eval", str(sae), "--out", str(file)],
                 ["harvest", "--sites", "1", "--tokens", "10", "--text", "brown", "--out", str(file)],
                 ["train", "--site", "1", "--tokens", "1000", "--out", str(file)]):
        code, err = run(argv, capsys)
        assert code == 1 and "is a file; expected a folder" in err and "loader was reached" not in err, (argv, err)


def test_a_second_harvest_into_the_same_out_is_refused(tmp_path, no_model, capsys):
    out = tmp_path / "acts"
    out.mkdir()
    (out / "harvest.json").write_text(json.dumps({"sites": ["blocks.5.hook_resid_pre"]}))
    code, err = run(["harvest", "--sites", "1", "--tokens", "10", "--text", "brown", "--out", str(out)], capsys)
    assert code == 1 and "already holds a harvest (harvest.json)" in err
    assert json.loads((out / "harvest.json").read_text()) == {"sites": ["blocks.5.hook_resid_pre"]}


def test_train_refuses_an_out_holding_an_sae_unless_overwrite(tmp_path, no_model, capsys):
    out: Path = make_sae(8, 16, hook_name="blocks.1.hook_resid_pre", model_name="tiny").save(tmp_path / "sae")
    weights = (out / "sae_weights.safetensors").read_bytes()
    train = ["train", "--site", "1", "--tokens", "1000", "--batch-size", "100", "--out", str(out)]
    code, err = run(train, capsys)
    assert code == 1 and "already holds an SAE (cfg.json)" in err and "--overwrite" in err
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    code, err = run([*train[:-1], str(tmp_path / "other")], capsys)
    assert code == 1 and "already holds 1 entries (notes.txt" in err
    code, err = run([*train, "--overwrite"], capsys)  # the check passes: the run goes on to load the model
    assert code == 1 and "loader was reached" in err
    assert (out / "sae_weights.safetensors").read_bytes() == weights
