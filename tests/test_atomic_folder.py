"""`atomic_folder` (R3): a folder of files replaced as one unit, even under SIGKILL."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import sae.atomic
from sae.files import atomic_folder

ROOT = Path(__file__).resolve().parents[1]
OWNED = ("a.bin", "b.json", "plot.png")


def _write(folder: Path, tag: str, names: tuple[str, ...] = ("a.bin", "b.json")) -> None:
    with atomic_folder(folder, owned=OWNED) as tmp:
        for name in names:
            (tmp / name).write_text(f"{tag}:{name}")


def _contents(folder: Path) -> dict[str, str]:
    return {p.name: p.read_text() for p in sorted(folder.iterdir())} if folder.exists() else {}


@pytest.fixture(params=["exchange", "two renames"])
def swap_mode(request, monkeypatch):
    if request.param == "two renames":
        monkeypatch.setattr(sae.atomic, "_exchange", lambda a, b: False)
    return request.param


def test_replaces_keeps_foreign_files_and_drops_stale_owned_ones(tmp_path, swap_mode):
    folder = tmp_path / "r"
    _write(folder, "old", ("a.bin", "b.json", "plot.png"))
    (folder / "notes.txt").write_text("mine")
    _write(folder, "new")
    assert _contents(folder) == {"a.bin": "new:a.bin", "b.json": "new:b.json", "notes.txt": "mine"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r"]  # no temporary or old folder left


def test_exception_inside_leaves_the_old_folder(tmp_path, swap_mode):
    folder = tmp_path / "r"
    _write(folder, "old")
    with pytest.raises(RuntimeError), atomic_folder(folder, owned=OWNED) as tmp:
        (tmp / "a.bin").write_text("new")
        raise RuntimeError
    assert _contents(folder) == {"a.bin": "old:a.bin", "b.json": "old:b.json"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r"]


def test_crash_between_the_two_renames_restores_the_old_folder(tmp_path, monkeypatch):
    monkeypatch.setattr(sae.atomic, "_exchange", lambda a, b: False)
    folder, real_rename, calls = tmp_path / "r", sae.atomic.os.rename, []
    _write(folder, "old")

    def rename(src, dst):
        calls.append(dst)
        if len(calls) == 2:  # the new folder into place, after the old one moved aside
            raise KeyboardInterrupt
        real_rename(src, dst)

    monkeypatch.setattr(sae.atomic.os, "rename", rename)
    with pytest.raises(KeyboardInterrupt):
        _write(folder, "new")
    monkeypatch.undo()
    assert _contents(folder) == {"a.bin": "old:a.bin", "b.json": "old:b.json"}


def test_refuses_a_folder_holding_subfolders_or_a_file(tmp_path):
    (tmp_path / "r" / "sub").mkdir(parents=True)
    with pytest.raises(IsADirectoryError, match="sub"):
        _write(tmp_path / "r", "new")
    (tmp_path / "f").write_text("x")
    with pytest.raises(FileExistsError):
        _write(tmp_path / "f", "new")
    assert (tmp_path / "r" / "sub").is_dir() and (tmp_path / "f").read_text() == "x"


CHILD = textwrap.dedent("""
    import importlib.util, os, signal, sys
    spec = importlib.util.spec_from_file_location("atomic", sys.argv[1])  # without importing torch
    atomic = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(atomic)
    if sys.argv[4] == "two renames":
        atomic._exchange = lambda a, b: False
    kill_at, calls, real_fsync = int(sys.argv[3]), [], os.fsync
    def fsync(fd):
        calls.append(fd)
        if len(calls) == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)
        real_fsync(fd)
    os.fsync = fsync
    with atomic.atomic_folder(sys.argv[2], owned=("a.bin", "b.json")) as tmp:
        (tmp / "a.bin").write_text("new:a.bin")
        (tmp / "b.json").write_text("new:b.json")
""")


@pytest.mark.parametrize("mode", ["exchange", "two renames"])
def test_sigkill_at_every_sync_point_leaves_old_or_new_whole(tmp_path, mode):
    old = {"a.bin": "old:a.bin", "b.json": "old:b.json"}
    new = {"a.bin": "new:a.bin", "b.json": "new:b.json"}
    seen = []
    for kill_at in range(1, 10):
        folder = tmp_path / f"k{kill_at}" / "r"
        _write(folder, "old")
        argv = [sys.executable, "-c", CHILD, str(ROOT / "sae" / "atomic.py"), str(folder), str(kill_at), mode]
        run = subprocess.run(argv, capture_output=True, text=True, timeout=60)
        state = _contents(folder)
        if not state:  # only between the two renames: the old folder is kept beside it
            assert mode == "two renames"
            kept = [p for p in folder.parent.iterdir() if p.name.endswith(".old")]
            assert [_contents(p) for p in kept] == [old]
        else:
            assert state in (old, new), json.dumps(state)
        seen.append(state == new)
        if run.returncode == 0:
            assert state == new
            break
        assert run.returncode == -signal.SIGKILL, run.stderr
    assert seen[-1] and not seen[0]  # the sweep reached a finished save and began before the swap
