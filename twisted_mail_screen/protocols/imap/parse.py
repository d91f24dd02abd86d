# -*- test-case-name: tests.test_imap_limits -*-
"""
IMAP4rev1 syntax (RFC 3501 section 9): the tokens of a command, sequence
sets, FETCH attributes, dates, and the quoting of strings in responses.

A command reaches the parser as one text line in which each literal has
been replaced by a C{NUL <index> NUL} placeholder (NUL cannot occur in
command text) plus the list of literal contents, so the tokenizer never
has to wait for input.

Every number is bounded as RFC 3501 bounds it (32 bits, so at most ten
ASCII digits) and lists nest at most L{MAX_DEPTH} deep, so no input can
make the parser (or the recursive code that walks its result) fail in any
way but with L{BadCommand}.
"""

from __future__ import annotations

import bisect
import calendar
import datetime
import re
import time
from dataclasses import dataclass, field
from typing import Union

import twisted.mail.imap4  # noqa: F401  (registers the "imap4-utf-7" codec)


class BadCommand(ValueError):
    """A syntax error: the command is answered with BAD."""


class Atom(str):
    """An unquoted token (atom, number, flag, sequence set, fetch att)."""


Token = Union[Atom, bytes, list]

_SPECIAL_END = b" ()\x00"
_CTL = frozenset(range(0x20)) | {0x7F}

MAX_NUMBER = 4294967295  # RFC 3501 section 9: number and nz-number are unsigned 32-bit
MAX_DEPTH = 32  # parenthesised lists, and SEARCH's NOT/OR chains (imap_search)
_NUMBER_RE = re.compile(r"[0-9]{1,10}\Z")


def parse_number(text: str, what: str = "number", nonzero: bool = False) -> int:
    """
    An RFC 3501 C{number} (C{nz-number} with C{nonzero}): ASCII digits
    only (C{str.isdigit} takes C{'²'}), at most 4294967295.
    """
    if not _NUMBER_RE.match(text):
        if text and text.strip("0123456789") == "":
            raise BadCommand(f"{what} too large")
        raise BadCommand(f"{what} expected, got {text[:20]!r}")
    value = int(text)
    if value > MAX_NUMBER:
        raise BadCommand(f"{what} too large")
    if nonzero and value == 0:
        raise BadCommand(f"{what} must not be 0")
    return value


def tokenize(text: bytes, literals: list[bytes]) -> list[Token]:
    """
    Split command arguments into atoms (L{Atom}), strings (C{bytes}, from
    quoted strings and literals) and parenthesised lists (C{list}).
    """
    stack: list[list[Token]] = [[]]
    i, n = 0, len(text)
    while i < n:
        c = text[i]
        if c == 0x20:
            i += 1
        elif c == 0x28:  # (
            if len(stack) > MAX_DEPTH:
                raise BadCommand(f"lists nested more than {MAX_DEPTH} deep")
            stack.append([])
            i += 1
        elif c == 0x29:  # )
            if len(stack) == 1:
                raise BadCommand("unbalanced parenthesis")
            inner = stack.pop()
            stack[-1].append(inner)
            i += 1
        elif c == 0x22:  # "
            out = bytearray()
            i += 1
            while True:
                if i >= n:
                    raise BadCommand("unterminated quoted string")
                ch = text[i]
                if ch == 0x5C:  # backslash
                    if i + 1 >= n or text[i + 1] not in (0x5C, 0x22):
                        raise BadCommand("bad escape in quoted string")
                    out.append(text[i + 1])
                    i += 2
                elif ch == 0x22:
                    i += 1
                    break
                elif ch in (0x0D, 0x0A):
                    raise BadCommand("newline in quoted string")
                else:
                    out.append(ch)
                    i += 1
            stack[-1].append(bytes(out))
        elif c == 0x00:
            # Only our own placeholders: the command loop refuses a NUL from the client.
            end = text.find(b"\x00", i + 1)
            index = text[i + 1:end]
            if end < 0 or not index.isdigit() or int(index) >= len(literals):
                raise BadCommand("NUL in command")
            stack[-1].append(literals[int(index)])
            i = end + 1
        else:
            start = i
            while i < n and text[i] not in _SPECIAL_END:
                if text[i] == 0x5B:  # [ ... ] may hold spaces and parentheses
                    close = text.find(b"]", i)
                    if close < 0:
                        raise BadCommand("unbalanced bracket")
                    i = close + 1
                elif text[i] == 0x22:
                    raise BadCommand("quote inside an atom")
                elif text[i] in _CTL:
                    raise BadCommand("control character in an atom")
                else:
                    i += 1
            word = text[start:i]
            try:
                stack[-1].append(Atom(word.decode("ascii")))
            except UnicodeDecodeError:
                raise BadCommand("8-bit characters in an atom") from None
    if len(stack) != 1:
        raise BadCommand("unbalanced parenthesis")
    return stack[0]


def astring(tok: Token) -> bytes:
    if isinstance(tok, Atom):
        return tok.encode("ascii")
    if isinstance(tok, bytes):
        return tok
    raise BadCommand("string expected")


def _decode_mailbox(raw: bytes, utf8: bool = False) -> str:
    if utf8:  # RFC 6855 3: once UTF8=ACCEPT is enabled names are UTF-8, and "&" is just "&"
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            raise BadCommand("mailbox name is not valid UTF-8") from None
    # Twisted's codec raises for 8-bit bytes whatever the errors argument says.
    try:
        return raw.decode("imap4-utf-7")
    except Exception:
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            raise BadCommand("mailbox name is not valid modified UTF-7") from None


def mailbox_text(tok: Token, utf8: bool = False) -> str:
    """A LIST reference or pattern, decoded as a mailbox name is (without folding INBOX)."""
    return _decode_mailbox(astring(tok), utf8)


def mailbox_name(tok: Token, utf8: bool = False) -> str:
    """A mailbox argument, decoded from modified UTF-7 (UTF-8 once UTF8=ACCEPT is on); INBOX case-folded."""
    name = _decode_mailbox(astring(tok), utf8)
    if name.upper() == "INBOX":
        return "INBOX"
    if name[:6].upper() == "INBOX/":
        return "INBOX" + name[5:]
    return name


def encode_mailbox(name: str, utf8: bool = False) -> bytes:
    """A name for a response: modified UTF-7, or UTF-8 once the client enabled UTF8=ACCEPT."""
    return quote(name.encode("utf-8"), utf8=True) if utf8 else quote(name.encode("imap4-utf-7"))


# Sequence sets -------------------------------------------------------------

@dataclass
class SeqSet:
    """A sequence set; C{None} in a range stands for C{*}."""

    ranges: list[tuple[int | None, int | None]] = field(default_factory=list)

    def resolve(self, star: int) -> list[tuple[int, int]]:
        """Ranges with C{*} replaced by C{star}, ordered low-high, merged."""
        out = []
        for lo, hi in self.ranges:
            a = star if lo is None else lo
            b = star if hi is None else hi
            if a > b:
                a, b = b, a
            out.append((a, b))
        out.sort()
        merged: list[tuple[int, int]] = []
        for a, b in out:
            if merged and a <= merged[-1][1] + 1:
                merged[-1] = (merged[-1][0], max(b, merged[-1][1]))
            else:
                merged.append((a, b))
        return merged

    def contains(self, value: int, star: int) -> bool:
        cache = self.__dict__.get("_cache")
        if cache is None or cache[0] != star:
            ranges = self.resolve(star)
            cache = (star, [a for a, _ in ranges], ranges)
            self.__dict__["_cache"] = cache
        i = bisect.bisect_right(cache[1], value) - 1
        return i >= 0 and cache[2][i][1] >= value


def _seq_number(text: str) -> int | None:
    return None if text == "*" else parse_number(text, "message number", nonzero=True)


def parse_seqset(tok: Token) -> SeqSet:
    if not isinstance(tok, Atom) or not tok:
        raise BadCommand("sequence set expected")
    ranges = []
    for piece in tok.split(","):
        first, colon, last = piece.partition(":")
        try:
            lo = _seq_number(first)
            hi = _seq_number(last) if colon else lo
        except BadCommand as e:
            raise BadCommand(f"bad sequence set {tok[:40]!r}: {e}") from None
        ranges.append((lo, hi))
    return SeqSet(ranges)


def format_set(numbers: list[int]) -> str:
    """C{[1,2,3,7]} as C{1:3,7} (order kept)."""
    out: list[str] = []
    i = 0
    while i < len(numbers):
        j = i
        while j + 1 < len(numbers) and numbers[j + 1] == numbers[j] + 1:
            j += 1
        out.append(str(numbers[i]) if i == j else f"{numbers[i]}:{numbers[j]}")
        i = j + 1
    return ",".join(out)


# FETCH attributes ----------------------------------------------------------

@dataclass(frozen=True)
class Section:
    """One C{BODY[...]<...>} item."""

    path: tuple[int, ...]
    text: str  # "", "HEADER", "TEXT", "MIME", "HEADER.FIELDS", "HEADER.FIELDS.NOT"
    fields: tuple[str, ...]
    partial: tuple[int, int] | None
    peek: bool
    label: str  # how the response names it, e.g. BODY[HEADER.FIELDS (FROM)]


SIMPLE_ATTS = {"FLAGS", "UID", "INTERNALDATE", "RFC822.SIZE", "ENVELOPE", "BODYSTRUCTURE",
               "BODY", "RFC822", "RFC822.HEADER", "RFC822.TEXT"}
MACROS = {"ALL": ["FLAGS", "INTERNALDATE", "RFC822.SIZE", "ENVELOPE"],
          "FAST": ["FLAGS", "INTERNALDATE", "RFC822.SIZE"],
          "FULL": ["FLAGS", "INTERNALDATE", "RFC822.SIZE", "ENVELOPE", "BODY"]}

_BODY_RE = re.compile(r"^BODY(\.PEEK)?\[([^\]]*)\](?:<([0-9]+)\.([0-9]+)>)?$", re.I)


def parse_section(att: str) -> Section:
    m = _BODY_RE.match(att)
    if not m:
        raise BadCommand(f"bad fetch attribute {att[:40]!r}")
    peek = bool(m.group(1))
    spec = m.group(2).strip()
    partial = None
    if m.group(3) is not None:
        partial = (parse_number(m.group(3), "partial offset"), parse_number(m.group(4), "partial length"))
    path: list[int] = []
    rest = spec
    while rest and rest[0] in "0123456789":
        num, _, rest = rest.partition(".")
        path.append(parse_number(num, "section part number", nonzero=True))
        if len(path) > MAX_DEPTH:
            raise BadCommand("section part path too long")
    text, _, fields_text = rest.partition(" ")
    text = text.upper()
    fields: tuple[str, ...] = ()
    if text in ("HEADER.FIELDS", "HEADER.FIELDS.NOT"):
        inner = fields_text.strip()
        if not (inner.startswith("(") and inner.endswith(")")):
            raise BadCommand("HEADER.FIELDS needs a parenthesised list")
        names = []
        for tok in tokenize(inner[1:-1].encode(), []):
            name = astring(tok).decode("ascii", "replace")
            # RFC 5322 field names, less what could not be echoed in the response unquoted
            if not name or any(not 0x21 <= ord(c) <= 0x7E or c in ':(){%*"\\]' for c in name):
                raise BadCommand("bad header field name")
            names.append(name.upper())
        if not names:
            raise BadCommand("empty header field list")
        fields = tuple(names)
        label_text = f"{text} ({' '.join(fields)})"
    elif text in ("", "HEADER", "TEXT", "MIME"):
        if fields_text:
            raise BadCommand("unexpected text in section")
        if text == "MIME" and not path:
            raise BadCommand("MIME needs a part number")
        label_text = text
    else:
        raise BadCommand(f"bad section {spec[:40]!r}")
    prefix = ".".join(str(p) for p in path)
    label_spec = prefix + ("." if prefix and label_text else "") + label_text
    return Section(tuple(path), text, fields, partial, peek, f"BODY[{label_spec}]")


def parse_fetch_atts(tok: Token) -> list[Union[str, Section]]:
    items = tok if isinstance(tok, list) else [tok]
    out: list[Union[str, Section]] = []
    for item in items:
        if not isinstance(item, Atom):
            raise BadCommand("fetch attribute expected")
        upper = item.upper()
        if upper in MACROS and not isinstance(tok, list):
            out.extend(MACROS[upper])
        elif upper in SIMPLE_ATTS:
            out.append(upper)
        elif upper.startswith("BODY"):
            out.append(parse_section(item))
        elif upper == "BINARY.SIZE" or upper.startswith("BINARY"):
            raise BadCommand("BINARY is not supported")
        else:
            raise BadCommand(f"unknown fetch attribute {item[:40]!r}")
    if not out:
        raise BadCommand("empty fetch attribute list")
    return out


# Dates -----------------------------------------------------------------------

MONTHS = ["Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec"]
_MONTH_NUM = {m.lower(): i + 1 for i, m in enumerate(MONTHS)}
_DATE_RE = re.compile(r"^([0-9]{1,2})-([A-Za-z]{3})-([0-9]{4})$")
_DATETIME_RE = re.compile(r"^ ?(\d{1,2})-([A-Za-z]{3})-(\d{4}) (\d\d):(\d\d):(\d\d) ([+-])(\d\d)(\d\d)$", re.A)


def parse_date(tok: Token) -> tuple[int, int, int]:
    """An IMAP C{date} (search keys) as (year, month, day)."""
    text = astring(tok).decode("ascii", "replace")
    m = _DATE_RE.match(text)
    if not m or m.group(2).lower() not in _MONTH_NUM:
        raise BadCommand(f"bad date {text[:30]!r}")
    ymd = int(m.group(3)), _MONTH_NUM[m.group(2).lower()], int(m.group(1))
    try:
        datetime.date(*ymd)  # 31-Feb-2020 and year 0 match the pattern
    except ValueError:
        raise BadCommand(f"bad date {text[:30]!r}") from None
    return ymd


def parse_datetime(raw: bytes) -> float:
    """An IMAP C{date-time} (APPEND) as a POSIX timestamp."""
    m = _DATETIME_RE.match(raw.decode("ascii", "replace"))
    if not m or m.group(2).lower() not in _MONTH_NUM:
        raise BadCommand("bad date-time")
    day, mon, year = int(m.group(1)), _MONTH_NUM[m.group(2).lower()], int(m.group(3))
    hh, mm, ss = int(m.group(4)), int(m.group(5)), int(m.group(6))
    offset = (int(m.group(8)) * 60 + int(m.group(9))) * 60 * (1 if m.group(7) == "+" else -1)
    try:
        datetime.datetime(year, mon, day, hh, mm, ss)  # timegm() would take 99-Jan-2020 99:99:99
        return calendar.timegm((year, mon, day, hh, mm, ss, 0, 0, 0)) - offset
    except (ValueError, OverflowError):
        raise BadCommand("bad date-time") from None


def format_datetime(ts: float) -> str:
    lt = time.localtime(ts)
    off = lt.tm_gmtoff // 60
    sign = "+" if off >= 0 else "-"
    off = abs(off)
    return (f"{lt.tm_mday:02d}-{MONTHS[lt.tm_mon - 1]}-{lt.tm_year:04d} "
            f"{lt.tm_hour:02d}:{lt.tm_min:02d}:{lt.tm_sec:02d} {sign}{off // 60:02d}{off % 60:02d}")


# Response strings --------------------------------------------------------------

def quote(value: bytes | None, utf8: bool = False) -> bytes:
    """A string as a quoted string when it can be one (UTF-8 ones too when C{utf8}), else as a literal."""
    if value is None:
        return b"NIL"
    if len(value) < 1024 and (value.isascii() or utf8) and b"\r" not in value and b"\n" not in value \
            and b"\0" not in value:
        return b'"' + value.replace(b"\\", b"\\\\").replace(b'"', b'\\"') + b'"'
    return literal(value)


def literal(value: bytes) -> bytes:
    return b"{%d}\r\n" % len(value) + value
