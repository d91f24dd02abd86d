# -*- test-case-name: tests.test_web_messages -*-
"""
Mailpit's search syntax (its C{internal/storage/search.go}), parsed once
and matched against cached message summaries.

Words are split on spaces; double quotes group a phrase. A word is free
text (a substring of the headers, body text and attachment names, case
ignored) or one of C{from: to: cc: bcc: reply-to: addressed: subject:
message-id: tag:}, C{is:read}, C{is:unread}, C{is:tagged},
C{has:attachment}, C{after: before:} (a date or date-time; naive ones in
the C{tz} given, else UTC) and C{larger: smaller:} (C{10k}, C{1.5mb}). A
leading C{-} or C{!} negates a word. Every word must match.

Where Mailpit quietly ignores a malformed date or size, or an unclosed
quote, we refuse the query (L{QueryError}, a 400): a test that filters on
a typo should fail, not match everything.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone, tzinfo
from email.utils import parsedate_to_datetime

from twisted_mail_screen.web.summary import Summary, clean_text

MAX_QUERY = 4096
_SIZE = re.compile(r"(\d+)(\.\d+)?\s?([a-z]{1,2})?\Z")
_UNITS = {"": 1, "k": 1024, "kb": 1024, "m": 1024 * 1024, "mb": 1024 * 1024}
_ADDRESS_FIELDS = {"from:": ("From",), "to:": ("To",), "cc:": ("Cc",), "bcc:": ("Bcc",),
                   "reply-to:": ("ReplyTo",),
                   "addressed:": ("From", "To", "Cc", "Bcc", "ReplyTo")}


class QueryError(ValueError):
    """A search the server cannot run; the message says which word and why."""


@dataclass(frozen=True)
class Candidate:
    """What a word is matched against: a summary and its file's state."""

    summary: Summary
    read: bool
    created: float  # seconds since the epoch


Test = Callable[[Candidate], bool]


@dataclass(frozen=True)
class Word:
    test: Test
    negate: bool

    def __call__(self, c: Candidate) -> bool:
        return self.test(c) != self.negate


@dataclass(frozen=True)
class Query:
    words: tuple[Word, ...]

    def matches(self, c: Candidate) -> bool:
        return all(w(c) for w in self.words)


EVERYTHING = Query(())


def split_words(text: str) -> list[str]:
    """Mailpit's C{ArgsParser}: spaces split, quotes group and are dropped."""
    if text.count('"') % 2:
        raise QueryError("unbalanced quote in the search")
    words, current, quoted = [], [], False
    for ch in text:
        if ch == '"':
            quoted = not quoted
        elif ch == " " and not quoted:
            words.append("".join(current).strip())
            current = []
        else:
            current.append(ch)
    words.append("".join(current).strip())
    return [w for w in words if w]


def parse_query(text: str, zone: str | None = None) -> Query:
    if len(text) > MAX_QUERY:
        raise QueryError(f"the search is over {MAX_QUERY} characters")
    tz = _zone(zone)
    words = []
    for word in split_words(text):
        negate = len(word) > 1 and word[0] in "-!"
        if negate:
            word = word[1:]
        test = _word(word, tz)
        if test is not None:
            words.append(Word(test, negate))
    return Query(tuple(words))


def _zone(name: str | None) -> tzinfo:
    if not name:
        return timezone.utc
    # Imported here: zoneinfo imports sysconfig, tens of milliseconds for
    # every process that reads a mailbox (the pytest plugin's first test).
    from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError) as e:
        raise QueryError(f"unknown time zone {name!r}") from e


def _word(word: str, tz: tzinfo) -> Test | None:
    lower = word.lower()
    for prefix, fields in _ADDRESS_FIELDS.items():
        if lower.startswith(prefix):
            needle = clean_text(word[len(prefix):])
            return _addresses(fields, needle) if needle else None
    if lower.startswith("subject:"):
        needle = word[8:].lower()
        return (lambda c: needle in c.summary.subject.lower()) if needle else None
    if lower.startswith("message-id:"):
        needle = clean_text(word[11:])
        return (lambda c: needle in c.summary.message_id.lower()) if needle else None
    if lower.startswith("tag:") or lower == "is:tagged":
        return lambda c: False  # no message has tags here (docs/api.md)
    if lower in ("is:read", "is:unread"):
        wanted = lower == "is:read"
        return lambda c: c.read == wanted
    if lower in ("has:attachment", "has:attachments"):
        return lambda c: c.summary.attachments > 0
    for prefix, after in (("after:", True), ("before:", False)):
        if lower.startswith(prefix):
            value = word[len(prefix):].strip()
            if not value:
                return None
            when = parse_date(value, tz)
            return (lambda c: c.created >= when) if after else (lambda c: c.created <= when)
    for prefix, larger in (("larger:", True), ("smaller:", False)):
        if lower.startswith(prefix):
            size = parse_size(word[len(prefix):])
            return (lambda c: c.summary.size > size) if larger else (lambda c: c.summary.size < size)
    needle = clean_text(word)
    return (lambda c: needle in c.summary.search_text) if needle else None


def _addresses(fields: tuple[str, ...], needle: str) -> Test:
    def test(c: Candidate) -> bool:
        for name in fields:
            for a in c.summary.addresses[name]:
                if needle in clean_text(f"{a['Name']} {a['Address']}"):
                    return True
        return False
    return test


def parse_size(text: str) -> int:
    m = _SIZE.match(text.strip().lower())
    if m is None or m.group(3) not in (None, *_UNITS):
        raise QueryError(f"not a size: {text!r} (use e.g. 500, 10k, 1.5mb)")
    return int(float(m.group(1) + (m.group(2) or "")) * _UNITS[m.group(3) or ""])


def parse_date(text: str, tz: tzinfo) -> float:
    """A date (C{2026-12-01}), an ISO date-time, or an RFC 5322 date; seconds since the epoch."""
    when = None
    try:
        when = datetime.fromisoformat(text.replace("/", "-"))
    except ValueError:
        try:
            when = parsedate_to_datetime(text)
        except (TypeError, ValueError, IndexError):
            pass
    if when is None:
        raise QueryError(f"not a date: {text!r} (use e.g. 2026-12-01 or 2026-12-01T10:30:00Z)")
    if when.tzinfo is None:
        when = when.replace(tzinfo=tz)
    return when.timestamp()
