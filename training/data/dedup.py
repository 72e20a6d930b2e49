"""Sentence-level deduplication across real sources, and the rule that keeps held-out text out of training.

Sources overlap: nlp-corpus samples sentences from speeches, among them State of the Union
addresses, and short formulae ("Thank you.", "God bless America.") recur everywhere. A held-out
figure is only honest if no sentence of a held-out document was trained on, whichever source
holds it. The rule, with sentences compared by `sentence_key` (lower case, letters and digits only):

1. A later source loses every sentence an earlier source holds, in any split (`drop_sentences`
   against `sentence_keys` of the earlier documents), before its own split is drawn: so nothing
   of a later source, held out or not, repeats an earlier source, and the earlier sources
   (release 1's Brown and nlp-corpus) keep their documents and digests unchanged.
2. After the split, every source's training documents lose the sentences of every held-out
   document of every source (their own included).

Sentences are split at `.`, `!` or `?` (a closing quote or bracket may follow) before whitespace,
and at line breaks; a document is rebuilt from its kept sentences, one space between sentences
and a blank line between paragraphs, whether or not anything was dropped.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import replace

from training.data.real import Document

_BOUNDARY = re.compile(r"(?:(?<=[.!?])|(?<=[.!?][\"'\u201d\u2019)\]]))\s+")
_LINES = re.compile(r"\s*\n\s*")
_WORD = re.compile(r"[a-z0-9]+")


def paragraphs(text: str) -> list[list[str]]:
    """The sentences of each non-empty line of `text`."""
    return [[s for s in _BOUNDARY.split(line) if s] for line in _LINES.split(text.strip()) if line.strip()]


def sentence_key(sentence: str) -> str:
    """What two sentences must share to count as the same: their letters and digits, lower-cased."""
    return " ".join(_WORD.findall(sentence.lower()))


def sentence_keys(texts: Iterable[str]) -> set[str]:
    """The keys of every sentence of `texts` (sentences with no letter or digit have none)."""
    return {key for text in texts for para in paragraphs(text) for s in para if (key := sentence_key(s))}


def drop_sentences(doc: Document, banned: set[str]) -> tuple[Document | None, int]:
    """`doc` rebuilt without the sentences whose key is in `banned` (None if nothing is left), and
    how many sentences were dropped."""
    kept_paragraphs, dropped = [], 0
    for para in paragraphs(doc.text):
        kept = [s for s in para if sentence_key(s) not in banned]
        dropped += len(para) - len(kept)
        if kept:
            kept_paragraphs.append(" ".join(kept))
    text = "\n\n".join(kept_paragraphs)
    return (replace(doc, text=text) if sentence_keys([text]) else None), dropped


def drop_from_all(docs: list[Document], banned: set[str]) -> tuple[list[Document], int]:
    """`drop_sentences` over a list: the documents with anything left, and the sentences dropped."""
    out, total = [], 0
    for doc in docs:
        kept, dropped = drop_sentences(doc, banned)
        total += dropped
        if kept is not None:
            out.append(kept)
    return out, total
