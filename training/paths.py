"""Checks of the paths a command reads and writes, made before any model is loaded or any work is
done: a sweep that runs for minutes must not fail at the end because its output folder cannot be
created. Every command line (`latentpatch ...`, `latentpatch train`) uses these.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from training.errors import RunPathError


def check_output_folder(path: str | Path, *, option: str = "--out") -> Path:
    """`path` is an existing folder, or one that can be created: refuse a file in its place, a
    file among its parents (`/etc/passwd/x`) and a parent this process cannot write to."""
    folder = Path(path)
    if folder.exists() and not folder.is_dir():
        raise RunPathError(f"{option} {folder} is a file; expected a folder (new or existing)")
    existing = folder
    while not existing.exists():
        if existing.is_symlink():
            raise RunPathError(f"{option} {folder}: {existing} is a dangling symbolic link")
        existing = existing.parent
    if not existing.is_dir():
        raise RunPathError(f"{option} {folder} cannot be created: {existing} is a file, not a folder")
    # A probe file, not os.access: as root, os.access calls /proc writable, and the run then failed
    # after its work, at the save.
    try:
        fd, probe = tempfile.mkstemp(prefix=".latentpatch-probe-", dir=existing)
        os.close(fd)
        os.unlink(probe)
    except OSError as err:
        raise RunPathError(f"{option} {folder}: no permission to write in {existing} ({err.strerror})") from err
    return folder


def check_output_file(path: str | Path, *, option: str) -> Path:
    """`path` can be written as a file: nothing, or a regular file, in its place (not a folder, a FIFO
    or a device), in a folder that exists or can be created and that this process can write to
    (`check_output_folder`). `circuit --graph-json DIR` failed only after the whole circuit search."""
    file = Path(path)
    if os.path.lexists(file) and not file.is_file():
        kind = "a folder" if file.is_dir() else "not a regular file (a FIFO, a device or a dangling link?)"
        raise RunPathError(f"{option} {file} is {kind}; expected a file to write")
    check_output_folder(file.parent, option=f"{option} {file}: its folder")
    return file


def check_input_file(path: str | Path, *, option: str) -> Path:
    """`path` is an existing regular file (not a folder, a FIFO or a device)."""
    file = Path(path)
    if not file.exists():
        raise RunPathError(f"{option} {file} does not exist")
    if file.is_dir():
        raise RunPathError(f"{option} {file} is a folder; expected a file")
    if not file.is_file():
        raise RunPathError(f"{option} {file} is not a regular file (a FIFO or a device?)")
    return file
