"""Atomic writes (R3): one file, or a whole folder of files, replaced in one step.

`atomic_write` replaces one file: temporary name in the same folder, fsync, rename.
`atomic_folder` replaces a folder whose files only make sense together (tensors and the manifest
that describes them): the save writes into a temporary sibling folder, every file is fsynced, and
the sibling is swapped in. A reader, or a process killed at any moment, sees the whole old save or
the whole new one. We swap folders rather than record the tensors' hashes in the manifest because
the swap also covers files no loader verifies (CSV tables, plots, prompts), leaves no stale file
of an earlier save behind, and needs no reader to cooperate.

Both are re-exported by `sae.files`, where callers import them from.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import shutil
import tempfile
import uuid
from collections.abc import Collection, Iterator
from pathlib import Path


def atomic_write(path: Path, data: bytes) -> None:
    """Temporary file in the same folder, fsync, rename: readers see the old file or the new one."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_path(path.parent)


@contextlib.contextmanager
def atomic_folder(path: str | Path, *, owned: Collection[str]) -> Iterator[Path]:
    """Yield an empty temporary sibling of `path` to write a whole save into; then swap it in.

    `owned` names every file this kind of save may write. Files of an existing `path` outside it
    (a plot the CLI added, a user's notes) are carried into the new folder; owned files the new
    save did not write are dropped, so nothing stale describes the new save. On an exception the
    temporary folder is removed and `path` is untouched. On Linux the swap is one
    `renameat2(RENAME_EXCHANGE)`; elsewhere it is two renames, and a crash between them leaves
    `path` missing (loads refuse) with the old save kept as `.<name>.<id>.old` beside it.
    """
    final = Path(path)
    kept = _kept_files(final, set(owned))
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / f".{final.name}.{uuid.uuid4().hex[:12]}.tmp"
    tmp.mkdir()  # os.mkdir honours the umask, unlike mkdtemp's 0o700
    try:
        yield tmp
        for name in kept:
            if not (tmp / name).exists():
                _carry(final / name, tmp / name)
        for child in tmp.iterdir():
            _fsync_file(child)
        fsync_path(tmp)
        _swap_in(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _kept_files(final: Path, owned: set[str]) -> list[str]:
    """Names in an existing `final` to carry over; refuses what a result folder cannot be."""
    if not final.exists():
        return []
    if not final.is_dir() or final.is_symlink():
        raise FileExistsError(f"{final} exists and is not a folder; a result is saved as a folder")
    folders = sorted(p.name for p in final.iterdir() if p.is_dir() and not p.is_symlink())
    if folders:
        raise IsADirectoryError(f"{final} holds subfolders {folders}; a result folder is replaced as a whole, "
                                "so save into a folder of its own")
    return sorted(p.name for p in final.iterdir() if p.name not in owned)


def _carry(src: Path, dst: Path) -> None:
    if src.is_symlink():
        os.symlink(os.readlink(src), dst)
        return
    try:
        os.link(src, dst)  # same file, no copy; the old folder's link goes when it is removed
    except OSError:
        shutil.copy2(src, dst)


def _swap_in(tmp: Path, final: Path) -> None:
    if not final.exists():
        try:  # fails as a whole if another first save made `final` since the check: then swap with it
            os.rename(tmp, final)
            fsync_path(final.parent)
            return
        except OSError as err:  # two first saves raced: "Directory not empty" in 13 of 150 forced rounds
            if err.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                raise
    if _exchange(tmp, final):
        shutil.rmtree(tmp)  # now the old folder
    else:
        old = tmp.with_suffix(".old")
        os.rename(final, old)
        try:
            os.rename(tmp, final)
        except BaseException:
            os.rename(old, final)
            raise
        shutil.rmtree(old)
    fsync_path(final.parent)


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths in one step (Linux `renameat2(RENAME_EXCHANGE)`); False where unavailable."""
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):  # kernel or file system without the flag
        return False
    raise OSError(code, os.strerror(code), str(a), None, str(b))


def _fsync_file(path: Path) -> None:
    if path.is_symlink() or not path.is_file():
        return
    fsync_path(path)


def fsync_path(path: Path) -> None:
    """fsync a file or a folder by path (a folder's fsync makes the renames inside it durable)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
