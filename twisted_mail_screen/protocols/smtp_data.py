# -*- test-case-name: tests.test_smtp_injection -*-
"""
SMTP DATA taken in bulk (RFC 5321 4.1.1.4): the end is found with
C{bytes.find}, limits and line endings checked with C-level counts and
splits, never a Python loop over bytes.

Only CRLF.CRLF ends the data: a dot line ended by a bare LF or CR is
content (no SMTP smuggling, CVE-2023-51764 class). A bare CR or LF
anywhere marks the message refused, as Postfix's
C{smtpd_forbid_bare_newline} does for LF: a next hop or a reader that
takes one for a line end would see other lines (or another end of data)
than we did.
"""

from __future__ import annotations

from dataclasses import dataclass, field

TERMINATOR = b"\r\n.\r\n"

#: Why a message is refused, once known: "line" (a line over the limit),
#: "size" (over the message size limit), "bare" (a bare CR or LF).
LINE, SIZE, BARE = "line", "size", "bare"

#: Messages up to this size are put in their stored form on the reactor
#: thread; larger ones in the worker pool (25 MB takes ~120 ms of CPU here,
#: 1 MB ~5 ms, under the 50 ms a command may hold the reactor).
INLINE_STORED_FORM = 1024 * 1024


#: The stored form is made a slice at a time: a worker converting a 25 MB
#: message in two whole-message replaces held the GIL, and so the reactor
#: thread, for up to ~120 ms at once (probe NOOPs of 117-121 ms seen); a
#: slice of 256 KiB holds it well under a millisecond.
FORM_SLICE = 256 * 1024


def stored_form(raw: bytes) -> bytes:
    """
    The octets of DATA (from the CRLF before the first line) as stored:
    dot-unstuffed, with LF line endings (no CR is left but in CRLF pairs).
    Slices are cut just before a CRLF, so no C{CRLF..} or CRLF spans two.
    """
    pieces = []
    start = 0
    while start < len(raw):
        cut = raw.find(b"\r\n", start + FORM_SLICE)
        stop = len(raw) if cut < 0 else cut
        pieces.append(raw[start:stop].replace(b"\r\n..", b"\r\n.").replace(b"\r\n", b"\n"))
        start = stop
    # The sentinel CRLF, an LF now, goes.
    return b"".join(pieces)[1:]


@dataclass
class DataReader:
    """
    One message's DATA. The buffer starts with a CRLF sentinel so that a
    dot on the very first line is found like any other; once the message
    is known to be refused (C{error}), only a short tail is kept.
    """

    max_line_length: int
    max_message_size: int
    buffer: bytearray = field(default_factory=lambda: bytearray(b"\r\n"))
    error: str | None = None
    checked: int = 0  # the buffer before this offset has no bare CR or LF

    def feed(self, buf: bytearray) -> bytes | None:
        """
        Take the bytes of C{buf}. Once the final dot is seen: the message
        (the sentinel, then the data up to the CRLF before the dot, still
        dot-stuffed), with what followed it left in C{buf}; else C{None}.
        """
        data = self.buffer
        search_from = max(0, len(data) - 4)
        line_from = data.rfind(b"\n") + 1
        data += buf
        buf.clear()
        end = data.find(TERMINATOR, search_from)
        stop = len(data) if end < 0 else end + 2
        if self.error is None:
            if longest_line(data, line_from, stop) >= self.max_line_length:
                self.error = LINE
            elif stop - 2 > self.max_message_size:
                self.error = SIZE
            else:
                # A CR at the very end may be half of a CRLF split across reads.
                until = stop - 1 if end < 0 and data.endswith(b"\r") else stop
                if bare_newline(data, self.checked, until):
                    self.error = BARE
                self.checked = max(self.checked, until)
        if end < 0:
            if self.error is not None:
                del data[:-4]  # enough to see a terminator split across reads
            return None
        buf += data[end + len(TERMINATOR):]
        return bytes(data[:end + 2])


def bare_newline(buf: bytearray, start: int, stop: int) -> bool:
    """
    Whether C{buf[start:stop]} holds a CR or LF that is not part of a CRLF
    (callers never cut between a CR and its LF).
    """
    pairs = buf.count(b"\r\n", start, stop)
    return buf.count(b"\r", start, stop) != pairs or buf.count(b"\n", start, stop) != pairs


def longest_line(buf: bytearray, start: int, stop: int) -> int:
    """
    Length of the longest line (CR included, LF not) in C{buf[start:stop]}.
    A C-level split keeps this linear; a regex like C{[^\\n]{1000}} is not.
    """
    return max(map(len, buf[start:stop].split(b"\n")))
