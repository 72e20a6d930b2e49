"""Brown's own labels on the model's tokens, for sparse probing (issue 26 §4): each word's
part-of-speech tag (Francis & Kučera's tagset) and each document's genre (`cats.txt`).

A tagged document's text is exactly the corpus document's text (`training.data.real` detokenizes the
same words the same way; `detokenize_spans` gives each word's character span in it), so the probe
reads the text the SAEs saw. The split is release 1's document-level split of Brown
(`release_1_documents`), the one every SAE holds out.

Tags on tokens. The text is tokenized with the model's tokenizer and its character offsets; a
token takes the tag of the word whose last character it covers (the position where the model has
read the whole word), and a token covering the ends of two words, or no word's end (a word's first
pieces, white space), takes none. Windows of `context_size - 1` tokens, BOS first, are cut from the
start of each document (`windows_per_document` of them, whole windows only).
"""

from __future__ import annotations

import bisect
import functools
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import torch
from jaxtyping import Int
from torch import Tensor

from patching.model import tl_compat
from training.data.catalog import SOURCES, release_1_documents
from training.data.npm import read_members
from training.data.real import BROWN_FILE, Split, brown_categories, brown_tagged_paragraphs, detokenize_spans
from training.errors import DataSourceError

POS_CLASSES: dict[str, tuple[str, ...]] = {
    "noun": ("nn", "nns", "np", "nps", "nn$", "nns$", "np$", "nps$"),
    "verb": ("vb", "vbd", "vbg", "vbn", "vbz"),
    "adjective": ("jj", "jjr", "jjs", "jjt"),
    "preposition": ("in",),
}
"""The token-level probing tasks (one class against the rest): Brown base tags of common nouns and
proper nouns, lexical verbs, adjectives and prepositions."""

GENRE_TASKS = ("news", "government", "learned", "romance")
"""The document-level tasks (one genre against the other fourteen)."""


@dataclass(frozen=True)
class TaggedDocument:
    """One Brown document with its words' tags placed in its text."""

    id: str
    """`brown/<file>`, as `training.data.real` names it."""
    genre: str
    """Its category from `cats.txt`."""
    text: str
    """The document text, equal to the corpus's."""
    words: tuple[tuple[int, int, str], ...]
    """(start, end, tag) of each word in `text`, in order."""


def base_tag(tag: str) -> str:
    """A Brown tag without its title/headline/cited/foreign marks and contractions: `nn-tl` ->
    `nn`, `np+bez` -> `np`, `fw-nn` -> `fw` (a foreign word is not an English noun)."""
    return tag.lower().split("-")[0].split("+")[0]


def pos_class(tag: str) -> str | None:
    """The probing class of a Brown tag (`POS_CLASSES`), or None."""
    base = base_tag(tag)
    return next((name for name, tags in POS_CLASSES.items() if base in tags), None)


def tagged_document(doc_id: str, genre: str, raw: str) -> TaggedDocument:
    """Parse one Brown file: paragraphs joined by a blank line, as `brown_documents` joins them."""
    parts, words, offset = [], [], 0
    for pairs in brown_tagged_paragraphs(raw):
        text, spans = detokenize_spans([word for word, _tag in pairs])
        words += [(offset + span[0], offset + span[1], tag) for span, (_w, tag) in zip(spans, pairs) if span]
        parts.append(text)
        offset += len(text) + 2
    return TaggedDocument(doc_id, genre, "\n\n".join(parts), tuple(words))


def brown_tagged_documents(split: Split, *, folder: str | Path | None = None) -> list[TaggedDocument]:
    """The tagged documents of Brown's `split` (release 1's split), sorted by id; parsed once per
    process (the training split takes seconds, and a comparison probes several SAEs)."""
    return list(_tagged_documents(split, None if folder is None else str(folder)))


@functools.lru_cache(maxsize=4)
def _tagged_documents(split: Split, folder: str | None) -> tuple[TaggedDocument, ...]:
    tarball = SOURCES["brown"].fetch(folder)
    wanted = {doc.id for doc in release_1_documents("brown", split, folder=folder)}
    raws: dict[str, str] = {}
    genres: dict[str, str] = {}
    for name, blob in read_members(tarball, lambda n: n == "package/cats.txt" or bool(BROWN_FILE.match(n))):
        if name == "package/cats.txt":
            genres = brown_categories(blob.decode("utf-8", errors="replace"))
        else:
            key = BROWN_FILE.match(name).group(1)  # type: ignore[union-attr]
            if f"brown/{key}" in wanted:
                raws[key] = blob.decode("utf-8", errors="replace")
    if len(raws) != len(wanted) or not set(raws) <= set(genres):
        raise DataSourceError(f"{tarball}: found {len(raws)} of the {len(wanted)} Brown {split} documents with genres")
    return tuple(tagged_document(f"brown/{key}", genres[key], raws[key]) for key in sorted(raws))


def token_tags(offsets: list[tuple[int, int]], words: tuple[tuple[int, int, str], ...]) -> list[str | None]:
    """Per token (character span `offsets`), the tag of the one word whose last character it covers."""
    ends = sorted((end - 1, tag) for _start, end, tag in words)
    last = [end for end, _tag in ends]
    tags: list[str | None] = []
    for start, end in offsets:
        covered = ends[bisect.bisect_left(last, start):bisect.bisect_left(last, end)]
        tags.append(covered[0][1] if len(covered) == 1 else None)
    return tags


class LabelledWindows(NamedTuple):
    """Token windows cut from tagged documents, with their labels."""

    tokens: Int[Tensor, "row pos"]
    """BOS, then `context_size - 1` tokens of one document."""
    tags: list[list[str | None]]
    """Per row and position: the Brown tag of the word the token ends (None at BOS and elsewhere)."""
    genres: list[str]
    """Per row: its document's genre."""
    documents: list[str]
    """Per row: its document's id."""


def labelled_windows(model: Any, documents: list[TaggedDocument], *, context_size: int = 64,
                     windows_per_document: int = 1) -> LabelledWindows:
    """Up to `windows_per_document` whole windows from the start of each document (module docstring)."""
    if context_size < 2 or windows_per_document < 1:
        raise DataSourceError(f"context_size must be >= 2 and windows_per_document >= 1, got {context_size}, "
                              f"{windows_per_document}")
    tokenizer, bos, width = tl_compat.tokenizer(model), tl_compat.bos_token_id(model), context_size - 1
    rows, tags, genres, ids = [], [], [], []
    for doc in documents:
        encoded = tokenizer(doc.text, add_special_tokens=False, return_offsets_mapping=True)
        doc_tags = token_tags([tuple(o) for o in encoded["offset_mapping"]], doc.words)
        for w in range(min(windows_per_document, len(encoded["input_ids"]) // width)):
            rows.append([bos, *encoded["input_ids"][w * width:(w + 1) * width]])
            tags.append([None, *doc_tags[w * width:(w + 1) * width]])
            genres.append(doc.genre)
            ids.append(doc.id)
    if not rows:
        raise DataSourceError(f"no document holds a whole window of {width} tokens")
    return LabelledWindows(torch.tensor(rows, dtype=torch.long), tags, genres, ids)
