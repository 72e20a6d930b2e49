"""Two simultaneous first saves of a result folder both succeed (issue 30, item 10).

The swap checked that the folder did not exist and then renamed into place; a save that made the
folder in between left the other with "Directory not empty" (13 of 150 forced rounds). The
rename now fails as a whole and the save swaps with the folder that appeared. The race is forced
here: the other save lands between the check and the rename.
"""

from __future__ import annotations

import os

import sae.atomic as atomic


def test_a_first_save_that_loses_the_race_swaps_in_instead_of_failing(tmp_path, monkeypatch):
    final = tmp_path / "result"
    real_rename = os.rename
    raced = []

    def rename_after_the_other_save(src, dst):
        if os.fspath(dst) == os.fspath(final) and not raced:  # the other first save lands now
            raced.append(True)
            other = tmp_path / ".other"
            other.mkdir()
            (other / "manifest.json").write_text("the other save")
            real_rename(other, final)
        return real_rename(src, dst)

    monkeypatch.setattr(atomic.os, "rename", rename_after_the_other_save)
    with atomic.atomic_folder(final, owned=("manifest.json",)) as tmp:
        (tmp / "manifest.json").write_text("this save")
    assert raced and (final / "manifest.json").read_text() == "this save"  # the later save wins, whole
    assert sorted(p.name for p in tmp_path.iterdir()) == ["result"]  # no temporary folder left behind
