"""R3 for saved results (issue 17): a save killed between its writes leaves the old result whole
(old manifest with old tensors), never new effects under an old manifest.

Each test saves result A, then saves B over it with `os.fsync` raising at its 1st, 2nd, ... call
until B's save completes; after every interrupted save the folder must read wholly as A or
wholly as B (an interruption after the swap, at the final fsync), or be refused.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable

import pandas as pd
import pytest
import torch

from patching import PatchResult
from patching.errors import PatchingError
from patching.safety.report import SafetyReport
from patching.safety.search import SafetyConfig
from patching.safety.prompts import SafetySuite
from patching.model.sites import Site
from patching.steering.compare import SteeringComparison
from patching.sweep.units import PatchUnit, UnitPart


def crash_at_each_fsync(monkeypatch, save_new: Callable[[], Any], state: Callable[[], Any], old: Any, new: Any) -> int:
    """Interrupt `save_new` at each fsync in turn; return how many interruptions were checked."""
    real_fsync, k = os.fsync, 0
    while True:
        k += 1
        calls = []

        def fsync(fd: int) -> None:
            calls.append(fd)
            if len(calls) == k:
                raise KeyboardInterrupt  # what a SIGINT or a kill at this sync point looks like to the old files
            real_fsync(fd)

        monkeypatch.setattr(os, "fsync", fsync)
        try:
            save_new()
            finished = True
        except KeyboardInterrupt:
            finished = False
        monkeypatch.setattr(os, "fsync", real_fsync)
        seen = state()
        if finished:
            assert seen == new
            return k - 1
        assert seen in (old, new, "refused"), f"interrupted at fsync {k}: the folder mixes the old and new results"


def _result(seed: int, direction: str) -> PatchResult:
    g = torch.Generator().manual_seed(seed)
    site = Site.from_hook_name("blocks.0.hook_resid_pre")
    units = [PatchUnit((UnitPart(site, "latent", (i,), (seed,)),)) for i in range(3)]
    effect, metric = torch.randn(2, 3, generator=g), torch.randn(2, 3, generator=g)
    clean, corrupted = torch.randn(2, generator=g), torch.randn(2, generator=g)
    return PatchResult(units, effect, metric, clean, corrupted, direction, "exact", [["a", "b", "c"]] * 2,
                       {"sae_sha256": str(seed)})


def _patch_state(folder: Path) -> Any:
    try:
        loaded = PatchResult.load(folder)
    except PatchingError:
        return "refused"
    return (loaded.effect.tolist(), loaded.metric.tolist(), loaded.direction, loaded.provenance,
            [u.parts[0].latents for u in loaded.units])


def test_patch_result_save_interrupted_between_writes(tmp_path, monkeypatch):
    old, new = _result(1, "denoise"), _result(2, "noise")
    folder = old.save(tmp_path / "r")
    checked = crash_at_each_fsync(monkeypatch, lambda: new.save(folder), lambda: _patch_state(folder),
                                  _patch_state(folder), _patch_state(new.save(tmp_path / "reference")))
    assert checked >= 2


def _files(folder: Path, names: tuple[str, ...]) -> dict[str, bytes] | str:
    found = {name: (folder / name).read_bytes() for name in names if (folder / name).exists()}
    return found or "refused"


def _comparison(scale: float) -> SteeringComparison:
    table = pd.DataFrame({"method": ["none", "sae", "sae"], "k": [0, 1, 1], "coefficient": [0.0, 1.0, 2.0],
                          "target_effect": [0.0, scale, 2 * scale], "kl_neutral": [0.0, 0.1, 0.2],
                          "gen_perplexity": [10.0, 11.0, 12.0]})
    return SteeringComparison(table, {"concept": {"name": f"c{scale}"}})


def test_steering_comparison_save_interrupted_between_writes(tmp_path, monkeypatch):
    names = ("steering.csv", "manifest.json", "effect_vs_cost.png")
    # A stand-in plot: rendering is slow and not what this test is about.
    monkeypatch.setattr(SteeringComparison, "plot", lambda self, path: Path(path).write_bytes(str(self.table).encode()))
    folder = _comparison(1.0).save(tmp_path / "cmp")
    reference = _comparison(3.0).save(tmp_path / "reference")
    checked = crash_at_each_fsync(monkeypatch, lambda: _comparison(3.0).save(folder), lambda: _files(folder, names),
                                  _files(folder, names), _files(reference, names))
    assert checked >= len(names)  # every file's sync was a point of interruption: the save did go through them


def _report(rate: float) -> SafetyReport:
    # The prompts differ between the two reports, so a new report.json beside an old prompts.json shows.
    return SafetyReport(["blocks.0.hook_resid_pre"], SafetyConfig(), SafetySuite(system_prompt=f"system {rate}"), "m",
                        refusal_rates={"harmful": rate})


def _save_report(report: SafetyReport, folder: Path) -> Path:
    return report.save(folder)


def test_safety_report_save_interrupted_between_writes(tmp_path, monkeypatch):
    names = ("report.json", "prompts.json")
    save = _save_report
    folder = save(_report(0.25), tmp_path / "safety")
    save(_report(0.75), tmp_path / "reference")
    checked = crash_at_each_fsync(monkeypatch, lambda: save(_report(0.75), folder), lambda: _files(folder, names),
                                  _files(folder, names), _files(tmp_path / "reference", names))
    assert checked >= len(names)  # every file's sync was a point of interruption: the save did go through them


def test_files_added_beside_a_result_survive_its_replacement(tmp_path):
    """The CLI writes effects.png into the result folder; saving again must not lose it."""
    folder = _result(1, "denoise").save(tmp_path / "r")
    (folder / "effects.png").write_bytes(b"png")
    _result(2, "noise").save(folder)
    assert (folder / "effects.png").read_bytes() == b"png"
    assert _patch_state(folder) == _patch_state(_result(2, "noise").save(tmp_path / "reference"))


def test_saving_over_a_file_is_refused(tmp_path):
    (tmp_path / "r").write_text("not a result")
    with pytest.raises(FileExistsError, match="not a folder"):
        _result(1, "denoise").save(tmp_path / "r")
    assert (tmp_path / "r").read_text() == "not a result"
