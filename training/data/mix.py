"""The named training texts: the real sources one by one, their source-weighted mix, and the
self-generated chat corpus.

- `brown`, `nlp-corpus`, `sotu`, `mail`, `bible`, `moby-dick`, `factbook`: one real source
  (`training.data.catalog`), its documents in their fixed order.
- `real`: every real source, mixed by documents with source weights (below); `default`: `real`
  plus the chat-formatted corpus the default model wrote itself (`training.data.generated`; the
  safety experiments run in chat format), taken once.
- `real-no-mail`, `default-no-mail`: the same without the mails, which then stay out of training
  entirely so that `mail`'s split can measure how an SAE generalises to a register it never saw
  (issue 26 §4). The other sources keep exactly the weights they have in `default`.
- `real-v1`, `default-v1`: release 1's definitions (Brown + nlp-corpus as release 1 split them,
  unweighted), kept so that release 1's recorded recipes and digests still reproduce.

Weights. The sources differ tenfold in size (Moby-Dick 0.2M words, State of the Union 1.8M), so a
mix by size would be mostly speeches and sentence samples, and a uniform mix would repeat
Moby-Dick ten times an epoch. The training split takes source s for `(W_max / W_s) ** (1 -
MIX_EXPONENT)` passes, W the training words, so each source's share is proportional to
`W_s ** MIX_EXPONENT`: with exponent 0.5 the square-root rule of multilingual LM mixes (Lample &
Conneau 2019, XLM, §3.1, alpha = 0.5), the largest source is read once and no source repeats more
than its size ratio's square root. A fractional pass takes the first documents of the source
ordered by the SHA-256 of their text. Held-out splits take every held-out document once.

The mix is one list in a fixed seeded order (`MIX_SEED`), so any prefix, and any shard of an
activation cache, mixes every source. Where npm is missing, `default` says so in one warning line
and falls back to the generated corpus alone; every other real name refuses.
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

from training.errors import DataSourceError
from training.data.catalog import SOURCES, release_1_documents, source_documents
from training.data.npm import CorpusUnavailableError
from training.data.real import HELDOUT_FRACTION, Split
from training.data.text import TextOpener

log = logging.getLogger(__name__)

CorpusName = Literal["default", "real", "default-no-mail", "real-no-mail", "default-v1", "real-v1", "brown",
                     "nlp-corpus", "sotu", "mail", "bible", "moby-dick", "factbook", "generated"]
CORPUS_NAMES: tuple[str, ...] = get_args(CorpusName)
MIX_SEED = 0
MIX_EXPONENT = 0.5
"""Each source's share of the training mix is proportional to (its words) ** MIX_EXPONENT."""
WITHHELD_SOURCE = "mail"
"""The source the `-no-mail` corpora leave out, for the generalisation evaluation."""
RELEASE_1_SOURCES = ("brown", "nlp-corpus")


def real_documents(source: str, split: Split, *, folder: str | Path | None = None) -> list[str]:
    """Texts of one real source's split, parsed from its verified archive on first use."""
    return [doc.text for doc in source_documents(source, split, folder=folder)]


def source_passes(*, folder: str | Path | None = None) -> dict[str, float]:
    """Passes over each real source's training documents in one epoch of `real` (see the module
    docstring), rounded to hundredths so that the mix is the same on every machine."""
    words = {source: sum(len(text.split()) for text in real_documents(source, "train", folder=folder))
             for source in SOURCES}
    if min(words.values()) == 0:
        raise DataSourceError(f"a real source's training split is empty: words per source {words}")
    top = max(words.values())
    return {source: round((top / count) ** (1 - MIX_EXPONENT), 2) for source, count in words.items()}


def repeated(texts: list[str], passes: float) -> list[str]:
    """`texts` taken `passes` times: whole copies, then the fractional part's share of documents,
    the first by SHA-256 of their text (kept in their order)."""
    whole = math.floor(passes)
    extra = round((passes - whole) * len(texts))
    chosen = set(sorted(range(len(texts)), key=lambda i: hashlib.sha256(texts[i].encode()).hexdigest())[:extra])
    return texts * whole + [text for i, text in enumerate(texts) if i in chosen]


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


_WARNED_FALLBACK: set[str] = set()
"""Corpus names whose fallback to the generated corpus was already reported in this process."""


def corpus_documents(name: str, split: Split = "train", *, folder: str | Path | None = None) -> list[str]:
    """The documents `name` means, in their fixed order (see the module docstring)."""
    if name not in CORPUS_NAMES:
        raise DataSourceError(f"unknown corpus {name!r}; expected one of {list(CORPUS_NAMES)}")
    if split not in get_args(Split):
        raise DataSourceError(f"unknown split {split!r}; expected one of {list(get_args(Split))}")
    if name == "generated":
        return generated_documents(split)
    if name in SOURCES:
        return real_documents(name, split, folder=folder)
    try:
        parts = _real_parts(name, split, folder)
    except CorpusUnavailableError as err:
        if name.startswith("real"):
            raise
        if name not in _WARNED_FALLBACK:  # a command reads its corpus twice (digest, then texts): say it once
            _WARNED_FALLBACK.add(name)
            log.warning("real corpora unavailable (%s); --text %s falls back to the generated corpus only", err, name)
        parts = []
    if name.startswith("default"):
        parts.append(generated_documents(split))
    tagged = [text for part in parts for text in part]
    random.Random(MIX_SEED).shuffle(tagged)
    return tagged


def _real_parts(name: str, split: Split, folder: str | Path | None) -> list[list[str]]:
    """The real sources' texts a mix draws on, each already weighted for the training split."""
    if name.endswith("-v1"):
        return [[doc.text for doc in release_1_documents(source, split, folder=folder)] for source in RELEASE_1_SOURCES]
    sources = [s for s in SOURCES if not (name.endswith("-no-mail") and s == WITHHELD_SOURCE)]
    if split == "heldout":
        return [real_documents(source, split, folder=folder) for source in sources]
    passes = source_passes(folder=folder)
    return [repeated(real_documents(source, split, folder=folder), passes[source]) for source in sources]


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
