# -*- test-case-name: tests.test_web_messages -*-
"""
What the messages API shows of a stored message, in Mailpit's shapes: the
list entry (addresses, subject, size, attachment count, snippet), the full
view (text, HTML, attachments and inline parts with their part IDs), the
headers, and one part's content.

Everything here parses files: it runs in the worker pool, never on the
reactor thread. Parsing never fails a request: a header the parser cannot
read is shown as its raw text, a message that is no MIME at all as one
text part.

Part IDs number the MIME tree as IMAP does: a single-part message is
C{1}; the children of a multipart are C{1}, C{2}, ...; a nested part is
C{2.1}.
"""

from __future__ import annotations

import email
import email.policy
import html
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime, timezone
from email.message import Message
from email.header import decode_header, make_header
from email.utils import getaddresses, parsedate_to_datetime
from typing import Any

SNIPPET_CHARS = 250
#: A message declaring more multipart boundaries than this is not parsed as
#: MIME (3,000 nested ones cost the parser seven seconds of CPU).
MAX_MULTIPARTS = 100
#: Text kept per message for free-text search (a body past this is not searched).
SEARCH_TEXT_CHARS = 64 * 1024

_ADDRESS_HEADERS = {"From": "from", "To": "to", "Cc": "cc", "Bcc": "bcc", "ReplyTo": "reply-to"}
_TAGS = re.compile(r"<(script|style|head)\b.*?</\1\s*>|<[^>]*>", re.S | re.I)
_SPACE = re.compile(r"\s+")
_FOLD = re.compile(r"\r?\n[ \t]+")
_UNSEARCHED = re.compile(r'[\t\r\n<>",;()\ufeff]')


def clean_text(text: str) -> str:
    """
    Text as free-text search compares it (Mailpit's C{cleanString}): lower
    case, the punctuation around addresses and phrases gone, spaces single.
    """
    return " ".join(_UNSEARCHED.sub(" ", text).lower().split())


@dataclass(frozen=True)
class Summary:
    """A message's list entry, and what search needs; cached per file (immutable)."""

    message_id: str
    subject: str
    addresses: dict[str, list[dict[str, str]]]
    size: int
    attachments: int
    snippet: str
    search_text: str  # lower case: headers, body text, attachment names

    def fields(self) -> dict[str, Any]:
        """The Mailpit fields this summary holds (C{ID}, C{Read}, C{Created} come from the file)."""
        from_ = self.addresses["From"]
        return {
            "MessageID": self.message_id,
            "From": from_[0] if from_ else None,
            "To": self.addresses["To"], "Cc": self.addresses["Cc"],
            "Bcc": self.addresses["Bcc"], "ReplyTo": self.addresses["ReplyTo"],
            "Subject": self.subject, "Tags": [], "Size": self.size,
            "Attachments": self.attachments, "Snippet": self.snippet,
        }


@dataclass
class Part:
    """One leaf of the MIME tree."""

    part_id: str
    message: Message
    content_type: str
    filename: str
    content_id: str
    disposition: str

    def payload(self) -> bytes:
        data = self.message.get_payload(decode=True)
        if isinstance(data, bytes):
            return data
        # message/rfc822 and other non-decodable leaves: their text as stored
        return self.message.as_bytes() if self.content_type.startswith("message/") else b""

    def describe(self) -> dict[str, Any]:
        return {"PartID": self.part_id, "FileName": self.filename,
                "ContentType": self.content_type, "ContentID": self.content_id,
                "Size": len(self.payload())}


@dataclass
class Parsed:
    """A whole message, parsed: bodies, and its parts sorted as Mailpit sorts them."""

    message: Message
    text: str = ""
    html: str = ""
    attachments: list[Part] = field(default_factory=list)
    inline: list[Part] = field(default_factory=list)
    parts: dict[str, Part] = field(default_factory=dict)


def parse(data: bytes) -> Parsed:
    """
    The message's MIME tree; a message the parser chokes on (deep nesting
    past the recursion limit, say) is shown as headers and one text body.
    """
    if data.count(b"oundary=") > MAX_MULTIPARTS:
        return _fallback(data)  # the parser's time grows with the square of the nesting
    try:
        return _parse(data)
    except Exception:
        return _fallback(data)


def _fallback(data: bytes) -> Parsed:
    message = Message()
    for name, values in headers(data).items():
        for value in values:
            message[name] = value
    body = re.split(rb"\r?\n\r?\n", data, maxsplit=1)[1:]
    parsed = Parsed(message, text=body[0].decode("utf-8", "replace") if body else "")
    return parsed


def _parse(data: bytes) -> Parsed:
    # compat32: fourteen times faster than the default policy, whose header
    # objects we do not need; headers are decoded by _decoded below.
    message = email.message_from_bytes(data, policy=email.policy.compat32)
    parsed = Parsed(message)
    for part in _leaves(message, ""):
        parsed.parts[part.part_id] = part
        is_body = part.disposition != "attachment" and not part.filename
        if is_body and part.content_type == "text/plain" and not parsed.text:
            parsed.text = _text(part.message)
        elif is_body and part.content_type == "text/html" and not parsed.html:
            parsed.html = _text(part.message)
        elif part.disposition == "inline" or (part.content_id and part.disposition != "attachment"):
            parsed.inline.append(part)
        elif not (is_body and part.content_type.startswith("text/")):
            parsed.attachments.append(part)
    return parsed


def _leaves(message: Message, prefix: str) -> Iterator[Part]:
    if message.is_multipart() and message.get_content_maintype() == "multipart":
        for i, child in enumerate(message.get_payload(), 1):  # type: ignore[arg-type]
            if isinstance(child, Message):
                yield from _leaves(child, f"{prefix}{i}.")
        return
    part_id = prefix[:-1] if prefix else "1"
    yield Part(part_id, message, message.get_content_type(), _decoded(_safe(message.get_filename, "")),
               _header(message, "Content-ID").strip().strip("<>"),
               _safe(message.get_content_disposition, "") or "")


def _safe(method: Any, default: Any) -> Any:
    try:
        return method() or default
    except Exception:
        return default


def _raw(message: Message, name: str) -> list[str]:
    """A header's values as stored (undecodable bytes as lone surrogates)."""
    name = name.lower()
    return [str(v) for k, v in message.raw_items() if k.lower() == name]


def _header(message: Message, name: str) -> str:
    """The first such header as text; C{""} when absent."""
    values = _raw(message, name)
    return _decoded(values[0]) if values else ""


def _decoded(raw: str) -> str:
    """Unfolded, RFC 2047 words decoded; its raw text where they do not decode."""
    raw = _FOLD.sub(" ", raw).strip()
    if "=?" in raw:
        try:
            return _clean(str(make_header(decode_header(raw))))
        except Exception:
            pass
    return _clean(raw)


def _clean(text: str) -> str:
    """Undecodable bytes (kept by the parser as lone surrogates) become U+FFFD, valid in JSON."""
    return text.encode("utf-8", "surrogateescape").decode("utf-8", "replace")


def _text(message: Message) -> str:
    data = message.get_payload(decode=True)
    if not isinstance(data, bytes):
        return ""
    try:
        return data.decode(message.get_content_charset() or "utf-8", "replace")
    except LookupError:  # a charset Python does not know
        return data.decode("utf-8", "replace")


def _addresses(message: Message, header: str) -> list[dict[str, str]]:
    try:
        found = getaddresses([_FOLD.sub(" ", v) for v in _raw(message, header)])
    except Exception:
        return []
    return [{"Name": _decoded(name), "Address": _clean(address)} for name, address in found
            if address or name]


def html_to_text(markup: str) -> str:
    return html.unescape(_TAGS.sub(" ", markup))


def summarize(data: bytes, size: int) -> Summary:
    """The list entry of a message whose file holds C{data}; C{size} as reported (CRLF)."""
    parsed = parse(data)
    message = parsed.message
    addresses = {key: _addresses(message, "Reply-To" if key == "ReplyTo" else key)
                 for key in _ADDRESS_HEADERS}
    body = parsed.text or html_to_text(parsed.html)
    snippet = _SPACE.sub(" ", body).strip()[:SNIPPET_CHARS]
    subject = _header(message, "Subject")
    searched = [_header(message, h) for h in ("From", "Subject", "To", "Cc", "Bcc", "Reply-To",
                                              "Return-Path")]
    searched.append(_SPACE.sub(" ", body[:SEARCH_TEXT_CHARS]))
    searched += [a.filename for a in parsed.attachments]
    return Summary(
        message_id=_header(message, "Message-ID").strip("<>"),
        subject=subject, addresses=addresses, size=size,
        attachments=len(parsed.attachments), snippet=snippet,
        search_text=clean_text(" ".join(searched)))


def full_view(data: bytes, created: str) -> dict[str, Any]:
    """C{GET /api/v1/message/{ID}}'s fields, but C{ID}, C{Read} and C{Size}."""
    parsed = parse(data)
    message = parsed.message
    addresses = {key: _addresses(message, "Reply-To" if key == "ReplyTo" else key)
                 for key in _ADDRESS_HEADERS}
    return {
        "MessageID": _header(message, "Message-ID").strip("<>"),
        "From": addresses["From"][0] if addresses["From"] else None,
        "To": addresses["To"], "Cc": addresses["Cc"], "Bcc": addresses["Bcc"],
        "ReplyTo": addresses["ReplyTo"],
        "ReturnPath": _header(message, "Return-Path").strip("<>"),
        "Subject": _header(message, "Subject"),
        "Date": header_date(message) or created,
        "Tags": [], "Text": parsed.text, "HTML": parsed.html,
        "Inline": [p.describe() for p in parsed.inline],
        "Attachments": [p.describe() for p in parsed.attachments],
    }


def header_date(message: Message) -> str | None:
    try:
        raw = message.get("Date")
        if raw is None:
            return None
        when = parsedate_to_datetime(str(raw))
    except Exception:
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=timezone.utc)
    return rfc3339(when.timestamp())


def rfc3339(timestamp: float) -> str:
    """UTC, milliseconds, C{Z}: what JavaScript's C{Date} and Go's C{time} both read."""
    when = datetime.fromtimestamp(timestamp, timezone.utc)
    return when.strftime("%Y-%m-%dT%H:%M:%S.") + f"{when.microsecond // 1000:03d}Z"


def canonical_header_name(name: str) -> str:
    """Go's canonical form, as Mailpit's C{/headers} keys are (C{Message-Id}, C{Mime-Version})."""
    return "-".join(w[:1].upper() + w[1:].lower() for w in name.split("-"))


def headers(data: bytes) -> dict[str, list[str]]:
    """The header block as C{{Name: [value, ...]}}, values unfolded but not decoded (as Mailpit)."""
    block = re.split(rb"\r?\n\r?\n", data, maxsplit=1)[0].decode("utf-8", "replace")
    out: dict[str, list[str]] = {}
    name = None
    for line in block.splitlines():
        if line[:1] in (" ", "\t") and name is not None:
            out[name][-1] = (out[name][-1] + " " + line.strip()).strip()
            continue
        key, sep, value = line.partition(":")
        if not sep or not key or key != key.strip():
            name = None
            continue
        name = canonical_header_name(key)
        out.setdefault(name, []).append(value.strip())
    return out


def part(data: bytes, part_id: str) -> Part | None:
    return parse(data).parts.get(part_id)
