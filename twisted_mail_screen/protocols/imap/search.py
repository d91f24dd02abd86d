# -*- test-case-name: tests.test_imap -*-
"""
SEARCH (RFC 3501 section 6.4.4): every search key, parsed into a small
tree (at most C{MAX_SEARCH_KEYS} keys, C{MAX_DEPTH} deep), and the
evaluation of one message (L{imap_searchplan} evaluates a whole folder,
index-only keys as set operations). Keys on flags, sizes, UIDs and sequence
numbers use only the folder index; date keys C{stat} the file; header and
text keys read it (in a worker thread). String matching is
case-insensitive substring matching on decoded header values and on the
body both raw and decoded from its transfer encoding.
"""

from __future__ import annotations

import binascii
import datetime
import email.utils
import os
import quopri
import re
from typing import Any

from twisted_mail_screen.protocols.imap.fetch import read_message
from twisted_mail_screen.protocols.imap.flags import find_file, flag_names
from twisted_mail_screen.protocols.imap.message import (Part, all_headers_text, decoded_header_values,
                                              fast_headers, to_crlf)
from twisted_mail_screen.protocols.imap.parse import (MAX_DEPTH, Atom, BadCommand, SeqSet, Token, astring,
                                            parse_date, parse_number, parse_seqset)

FLAG_KEYS = {"ANSWERED": ("\\Answered", True), "DELETED": ("\\Deleted", True),
             "DRAFT": ("\\Draft", True), "FLAGGED": ("\\Flagged", True), "SEEN": ("\\Seen", True),
             "UNANSWERED": ("\\Answered", False), "UNDELETED": ("\\Deleted", False),
             "UNDRAFT": ("\\Draft", False), "UNFLAGGED": ("\\Flagged", False),
             "UNSEEN": ("\\Seen", False)}
ADDRESS_KEYS = {"BCC", "CC", "FROM", "SUBJECT", "TO"}
DATE_KEYS = {"BEFORE", "ON", "SINCE", "SENTBEFORE", "SENTON", "SENTSINCE"}

Node = tuple
#: Keys in one SEARCH (each NOT, OR and list counts); more is answered BAD.
#: A 64 KB command line holds ~9,000 short keys.
MAX_SEARCH_KEYS = 4096
_BLANK_LINE = re.compile(rb"^\r?\n|\n\r?\n")


def _text(tok: Token, charset: str) -> str:
    raw = astring(tok)
    return raw.decode(charset, "replace").casefold()


def parse_search(tokens: list[Token], charset: str = "utf-8", depth: int = 0,
                 count: list[int] | None = None) -> Node:
    """
    The key tree of C{tokens}; at most C{MAX_SEARCH_KEYS} keys (C{count}
    carries the tally into parenthesised lists).
    """
    pos = 0
    if count is None:
        count = [0]

    def take() -> Token:
        nonlocal pos
        if pos >= len(tokens):
            raise BadCommand("missing search argument")
        tok = tokens[pos]
        pos += 1
        return tok

    def key(level: int = depth) -> Node:
        if level > MAX_DEPTH:  # NOT, OR and lists nest: bounded, so no RecursionError here or later
            raise BadCommand(f"search keys nested more than {MAX_DEPTH} deep")
        count[0] += 1
        if count[0] > MAX_SEARCH_KEYS:  # bounded work and memory however the keys combine
            raise BadCommand(f"more than {MAX_SEARCH_KEYS} search keys")
        tok = take()
        if isinstance(tok, list):
            if not tok:
                raise BadCommand("empty search list")
            return ("and", (parse_search(tok, charset, level + 1, count),))
        if not isinstance(tok, Atom):
            raise BadCommand("search key expected")
        k = tok.upper()
        if k == "ALL":
            return ("all",)
        if k in FLAG_KEYS:
            flag, want = FLAG_KEYS[k]
            return ("flag", flag, want)
        if k in ("KEYWORD", "UNKEYWORD"):
            return ("flag", astring(take()).decode("ascii", "replace"), k == "KEYWORD")
        if k == "NEW":
            return ("and", (("recent", True), ("flag", "\\Seen", False)))
        if k == "OLD":
            return ("recent", False)
        if k == "RECENT":
            return ("recent", True)
        if k in ADDRESS_KEYS:
            return ("header", k, _text(take(), charset))
        if k == "HEADER":
            name = astring(take()).decode("ascii", "replace")
            return ("header", name, _text(take(), charset))
        if k in ("BODY", "TEXT"):
            return (k.lower(), _text(take(), charset))
        if k in DATE_KEYS:
            y, m, d = parse_date(take())
            return ("date", k, datetime.date(y, m, d))
        if k in ("LARGER", "SMALLER"):
            n = take()
            if not isinstance(n, Atom):
                raise BadCommand("number expected")
            return ("size", k == "LARGER", parse_number(n, "size"))
        if k == "UID":
            return ("uid", parse_seqset(take()))
        if k == "NOT":
            return ("not", key(level + 1))
        if k == "OR":
            return ("or", key(level + 1), key(level + 1))
        if k[:1].isdigit() or k[:1] == "*":
            return ("seq", parse_seqset(tok))
        raise BadCommand(f"unknown search key {k[:30]!r}")

    keys = []
    while pos < len(tokens):
        keys.append(key())
    if not keys:
        raise BadCommand("empty search")
    return ("and", tuple(keys))


def needs(node: Node) -> set[str]:
    kind = node[0]
    if kind == "and":
        return set().union(*(needs(n) for n in node[1]))
    if kind == "or":
        return needs(node[1]) | needs(node[2])
    if kind == "not":
        return needs(node[1])
    if kind == "header":
        return {"header"}
    if kind == "text" or kind == "body":
        return {"header", "body"}
    if kind == "date":
        return {"header"} if node[1].startswith("SENT") else {"stat"}
    return set()


class Candidate:
    """What one message offers the evaluator; file data is read on demand."""

    def __init__(self, path: str, seq: int, uid: int, rel: str, size: int, recent: bool,
                 keywords: list[str]) -> None:
        self.path, self.seq, self.uid, self.rel = path, seq, uid, rel
        self.size, self.recent = size, recent
        self.flags = {f.lower() for f in flag_names(rel, keywords)}
        self._data: bytes | None = None
        self._headers: Any = None
        self._block: bytes | None = None
        self._lower: str | None = None
        self._mtime: float | None = None
        self._body: str | None = None

    def _read(self, whole: bool) -> bytes:
        rel, data, _ = read_message(self.path, self.rel, whole, False)
        self.rel = rel
        return data or b""

    def data(self) -> bytes:
        if self._data is None:
            self._data = self._read(True)
        return self._data

    def preload(self, block: bytes | None) -> None:
        """The header block, known already (from the header index)."""
        if block is not None and self._data is None:
            self._block = block

    def block(self) -> bytes:
        """The header block as stored."""
        if self._block is None:
            data = self._data if self._data is not None else self._read(False)
            m = _BLANK_LINE.search(data)
            self._block = data[:m.end()] if m else data
        return self._block

    def headers(self) -> Any:
        if self._headers is None:
            block = self.block()
            self._headers = fast_headers(block)
        return self._headers

    def may_have(self, needle: str) -> bool:
        """
        False when no header value can contain C{needle}: an ASCII block
        without encoded words holds its values as they are, so one that
        lacks the needle (case-insensitively) is skipped without parsing.
        """
        block = self.block()
        if not block.isascii() or b"=?" in block:
            return True
        if self._lower is None:
            self._lower = block.decode("ascii").lower()
        return needle in self._lower

    def mtime(self) -> float:
        if self._mtime is None:
            for attempt in range(2):
                try:
                    self._mtime = os.stat(os.path.join(self.path, self.rel)).st_mtime
                    break
                except FileNotFoundError:
                    found = find_file(self.path, self.rel) if not attempt else None
                    if found is None:
                        self._mtime = 0.0
                        break
                    self.rel = found
        return self._mtime

    def body(self) -> str:
        if self._body is None:
            self._body = body_text(self.data()).casefold()
        return self._body


def evaluate(node: Node, c: Candidate, max_seq: int, max_uid: int) -> bool:
    kind = node[0]
    if kind == "and":
        return all(evaluate(n, c, max_seq, max_uid) for n in node[1])
    if kind == "all":
        return True
    if kind == "flag":
        return (node[1].lower() in c.flags) == node[2]
    if kind == "recent":
        return c.recent == node[1]
    if kind == "not":
        return not evaluate(node[1], c, max_seq, max_uid)
    if kind == "or":
        return evaluate(node[1], c, max_seq, max_uid) or evaluate(node[2], c, max_seq, max_uid)
    if kind == "size":
        return c.size > node[2] if node[1] else c.size < node[2]
    if kind == "uid":
        return _in(node[1], c.uid, max_uid)
    if kind == "seq":
        return _in(node[1], c.seq, max_seq)
    if kind == "header":
        if node[2] and not c.may_have(node[2]):
            return False
        values = decoded_header_values(c.headers(), node[1])
        return any(node[2] in v.casefold() for v in values)
    if kind == "body":
        return node[1] in c.body()
    if kind == "text":
        return node[1] in c.body() or node[1] in all_headers_text(c.headers()).casefold()
    if kind == "date":
        which, want = node[1], node[2]
        if which.startswith("SENT"):
            parsed = email.utils.parsedate_tz(c.headers().get("Date") or "")
            if not parsed:
                return False
            try:
                have = datetime.date(parsed[0], parsed[1], parsed[2])
            except ValueError:
                return False
            which = which[4:]
        else:
            have = datetime.date.fromtimestamp(c.mtime())
        if which == "BEFORE":
            return have < want
        if which == "ON":
            return have == want
        return have >= want
    raise AssertionError(kind)


def _in(seqset: SeqSet, value: int, star: int) -> bool:
    return seqset.contains(value, star)


def body_text(data: bytes) -> str:
    """
    The body as text: raw, plus each text part decoded from its transfer
    encoding. Parts are walked on L{Part}'s tree with a stack: its depth
    is capped as BODYSTRUCTURE's is, so a message nested thousands of
    levels deep is searched like any other (the stdlib parser recurses).
    """
    sep = data.find(b"\n\n")
    chunks = [data[sep + 2:].decode("utf-8", "replace") if sep >= 0 else ""]
    crlf = to_crlf(data)
    stack = [Part(crlf, 0, len(crlf))]
    while stack:
        part = stack.pop()
        if part.is_multipart:
            stack.extend(reversed(part.children))
            continue
        if part.is_message:
            stack.append(part.message)
            continue
        if part.maintype != "text":
            continue
        cte = (part.headers.get("Content-Transfer-Encoding") or "").strip().lower()
        try:
            if cte == "base64":
                payload = binascii.a2b_base64(part.body_bytes())
            elif cte == "quoted-printable":
                payload = quopri.decodestring(part.body_bytes())
            else:
                continue
            chunks.append(payload.decode(part.headers.get_content_charset() or "utf-8", "replace"))
        except (binascii.Error, LookupError, ValueError):
            continue
    return "\n".join(chunks)
