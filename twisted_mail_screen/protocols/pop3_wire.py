# -*- test-case-name: tests.test_pop3 -*-
"""
POP3's message codec (RFC 1939 section 3): a stored message as CRLF lines,
dot-stuffed, whole (L{to_wire}, L{top_of} for TOP) or as it arrives in
pieces (L{WireStream}). Pure functions on bytes: no I/O.
"""

from __future__ import annotations

import re

_DOT_LINE = re.compile(rb"\n\.")


def to_wire(data: bytes) -> bytes:
    """A stored message as CRLF lines, dot-stuffed (RFC 1939 section 3)."""
    if b"\r" in data:
        data = data.replace(b"\r\n", b"\n")
    return lf_to_wire(data)


def lf_to_wire(data: bytes) -> bytes:
    """L{to_wire} of data whose CRLFs are already LFs (as L{top_of} returns)."""
    data = data.replace(b"\n", b"\r\n")  # every LF now ends a CRLF line
    if data and not data.endswith(b"\n"):
        data += b"\r\n"
    if data.startswith(b"."):
        data = b"." + data
    if _DOT_LINE.search(data) is None:  # faster than bytes.find for a 2-octet needle
        return data
    return data.replace(b"\n.", b"\n..")


def top_of(data: bytes, lines: int) -> bytes:
    """The header and the first C{lines} body lines of a stored message."""
    data = data.replace(b"\r\n", b"\n")
    head_end = data.find(b"\n\n")
    if head_end < 0:
        return data
    cut = head_end + 2
    for _ in range(lines):
        nl = data.find(b"\n", cut)
        if nl < 0:
            return data
        cut = nl + 1
    return data[:cut]


class WireStream:
    """
    L{to_wire} (and, with C{top}, L{top_of}) applied to a message that
    arrives in pieces: the output of L{feed} for every piece followed by
    L{end} is byte-identical to C{to_wire(whole)} (or, for TOP,
    C{lf_to_wire(top_of(whole, top))}), whatever the cuts. C{done} is true once TOP has
    everything it needs, so the rest need not be read.
    """

    def __init__(self, top: int | None = None) -> None:
        self._carry = b""  # a trailing CR, which may begin a CRLF
        self._line_start = True  # the next output octet begins a line
        self._empty = True
        self._top = top  # body lines still wanted; None: no limit
        self._in_header = top is not None
        self._last_lf = False  # (TOP) the last normalised octet was LF
        self.done = False

    def feed(self, chunk: bytes) -> bytes:
        if self.done:
            return b""
        chunk = self._carry + chunk
        if chunk.endswith(b"\r"):
            chunk, self._carry = chunk[:-1], b"\r"
        else:
            self._carry = b""
        if b"\r" in chunk:
            chunk = chunk.replace(b"\r\n", b"\n")
        if self._top is not None:
            chunk = self._cut(chunk)
        return self._encode(chunk)

    def end(self) -> bytes:
        out = b"" if self.done else self._encode(self._carry)
        self._carry = b""
        self.done = True
        if not self._empty and not self._line_start:
            out += b"\r\n"
        return out

    def _cut(self, chunk: bytes) -> bytes:
        """Keep what C{top_of} keeps: LF-normalised C{chunk} up to the wanted lines."""
        pos = 0
        if self._in_header:
            if self._last_lf and chunk.startswith(b"\n"):
                head_end = -1  # the blank line straddles the cut
            else:
                head_end = chunk.find(b"\n\n")
                if head_end < 0:
                    if chunk:
                        self._last_lf = chunk.endswith(b"\n")
                    return chunk
            self._in_header = False
            pos = head_end + 2
        while self._top:
            nl = chunk.find(b"\n", pos)
            if nl < 0:
                return chunk
            pos = nl + 1
            self._top -= 1
        self.done = True
        self._carry = b""
        return chunk[:pos]

    def _encode(self, chunk: bytes) -> bytes:
        if not chunk:
            return b""
        self._empty = False
        chunk = chunk.replace(b"\n", b"\r\n")
        if self._line_start and chunk.startswith(b"."):
            chunk = b"." + chunk
        self._line_start = chunk.endswith(b"\n")
        return chunk.replace(b"\n.", b"\n..")
