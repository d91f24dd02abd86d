# -*- test-case-name: tests.test_imap_sort -*-
"""
What SORT and THREAD (RFC 5256) compare, taken from one message's header
block: the base subject (section 2.1), the sent date, the first address's
mailbox of From, To and Cc, and the Message-ID, References and
In-Reply-To identifiers. L{fields_of} computes them once per message; the
header index (L{imap_headerindex}) keeps them on disk so a SORT after a
restart reads no message file.
"""

from __future__ import annotations

import email.utils
import re
import unicodedata
from typing import NamedTuple

from twisted_mail_screen.protocols.imap.message import decoded_header_values, fast_headers

_WSP_RUN = re.compile(r"[ \t\r\n]+")
_TRAILER = re.compile(r"(?:[ \t]|\(fwd\))+$", re.IGNORECASE)
_BLOB = r"\[[^\[\]]*\][ \t]*"
_REFWD = re.compile(r"^(?:" + _BLOB + r")*(?:re|fwd?)[ \t]*(?:" + _BLOB + r")?:", re.IGNORECASE)
_LEADING_WSP = re.compile(r"^[ \t]+")
_ONE_BLOB = re.compile(r"^" + _BLOB)
_MSGID = re.compile(r"<([^<>\s]+)>")


class SortFields(NamedTuple):
    """
    One message's SORT and THREAD keys (strings in their comparison form).
    A tuple: the header index stores it as one and makes it again cheaply.
    """

    date: float | None  # sent date, seconds since the epoch (UTC); None when unknown
    subject: str  # base subject, in its comparison form (L{casemap})
    reply: bool  # the subject was a reply or forward ("Re:", "Fwd:", "(fwd)", "[fwd: ...]")
    from_: str
    to: str
    cc: str
    message_id: str | None
    references: tuple[str, ...]

    def as_tuple(self) -> tuple:
        return tuple(self)


def base_subject(subject: str) -> tuple[str, bool]:
    """
    The base subject of an already RFC 2047-decoded subject (RFC 5256
    section 2.1) and whether extracting it removed a reply or forward
    marker (THREAD=REFERENCES step 5 asks).
    """
    text = _WSP_RUN.sub(" ", subject)  # (1) continuation lines and tabs become one space
    reply = False
    while True:
        trimmed = _TRAILER.sub("", text)  # (2) trailing "(fwd)" and blanks
        if trimmed != text:
            reply = reply or "(fwd)" in text[len(trimmed):].lower()
            text = trimmed
        while True:  # (3)-(5) leaders, then a leading blob unless it is all that is left
            before = text
            while True:
                m = _REFWD.match(text)
                w = _LEADING_WSP.match(text)
                if m:
                    text, reply = text[m.end():], True
                elif w:
                    text = text[w.end():]
                else:
                    break
            b = _ONE_BLOB.match(text)
            if b and text[b.end():].strip():
                text = text[b.end():]
            if text == before:
                break
        low = text.lower()  # (6) "[fwd: ...]" wrapping: unwrap and start again
        if low.startswith("[fwd:") and text.endswith("]"):
            text, reply = text[5:-1], True
            continue
        return text, reply


def casemap(text: str) -> str:
    """
    The comparison form of RFC 5051's i;unicode-casemap, which RFC 5256
    orders strings by: title (here upper) case, then NFKD decomposition;
    code point order is then the UTF-8 octet order the RFC compares.
    """
    return text.upper() if text.isascii() else unicodedata.normalize("NFKD", text.upper())


def _first_mailbox(values: list[str]) -> str:
    """The local part (RFC 5256: addr-mailbox) of the first address, or ""."""
    for _, addr in email.utils.getaddresses(values):
        if addr:
            return casemap(addr.rpartition("@")[0] if "@" in addr else addr)
    return ""


def _ids(value: str | None) -> list[str]:
    return _MSGID.findall(value or "")


def sent_date(value: str | None) -> float | None:
    if not value:
        return None
    try:
        parsed = email.utils.parsedate_tz(value)
        if parsed is None:
            return None
        return float(email.utils.mktime_tz(parsed))
    except (ValueError, OverflowError, TypeError, IndexError):
        return None


def decoded_subject(headers: object) -> str:
    values = decoded_header_values(headers, "Subject")  # type: ignore[arg-type]
    return values[0] if values else ""


def fields_of(block: bytes) -> SortFields:
    """The SORT and THREAD keys of a message's header block."""
    h = fast_headers(block)
    subject, reply = base_subject(decoded_subject(h))
    mids = _ids(h.get("Message-ID"))
    refs = _ids(" ".join(h.get_all("References") or []))
    if not refs:
        refs = _ids(h.get("In-Reply-To"))[:1]  # only its first identifier (RFC 5256 step 1A)
    return SortFields(sent_date(h.get("Date")), casemap(subject), reply,
                      _first_mailbox(decoded_header_values(h, "From")),
                      _first_mailbox(decoded_header_values(h, "To")),
                      _first_mailbox(decoded_header_values(h, "Cc")),
                      mids[0] if mids else None, tuple(refs))
