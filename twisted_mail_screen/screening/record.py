# -*- test-case-name: tests.test_screening_record -*-
"""
The in-memory record of a client that did more than connect once: its
connection times inside the window, its distinct failed (user, secret)
digests, and its last few notable events, packed into one C{bytes} value.

Why packed: an attacker spread over a million addresses, each failing a
login, is the case the memory goal is about. As Python objects (a list of
floats, a list of (float, bytes) tuples, a list of (float, str, str)
tuples) one such record cost about 700 bytes; packed it is one small
object plus one C{bytes} of about 90 (docs/performance.md has the
figures). The price is a repack on each change, about a microsecond for
the few entries a record ever holds (each list is capped by a limit).

Layout (little-endian)::

    last: f64, n_times: u32, n_auth: u32, n_events: u8
    n_times x time: f64
    n_auth x (time: f64, digest: 8 bytes)
    n_events x (time: f64, protocol: u8, kind: u8, length: u16, text: UTF-8)

An event's C{kind} names a common prefix of its text (0: none), so the
usual "auth failed user=..." stores only the user name.
"""

from __future__ import annotations

import struct
from bisect import bisect_right
from typing import Iterable

from twisted_mail_screen.screening.notify import Event

#: The last few notable events kept per client, for the postmaster.
EVENTS_KEPT = 6

_HEAD = struct.Struct("<dIIB")  # counts as wide as a limit can be set
_TIME = struct.Struct("<d")
_AUTH = struct.Struct("<d8s")
_EVENT = struct.Struct("<dBBH")
_PROTOCOLS = ("-", "smtp", "submission", "pop3", "imap", "web")
_PROTOCOL_CODES = {p: i for i, p in enumerate(_PROTOCOLS)}
_PREFIXES = ("", "auth failed user=", "refused: ")
_MAX_TEXT = 0xFFFF


def _encode_event(when: float, protocol: str, what: str) -> bytes:
    code = _PROTOCOL_CODES.get(protocol)
    if code is None:
        code, what = 255, f"{protocol}\0{what}"  # a protocol this table does not know
    kind = 0
    for i, prefix in enumerate(_PREFIXES[1:], 1):
        if what.startswith(prefix):
            kind, what = i, what[len(prefix):]
            break
    text = what.encode("utf-8", "surrogatepass")[:_MAX_TEXT]
    return _EVENT.pack(when, code, kind, len(text)) + text


class ClientRecord:
    """
    One client's counts (see the module docstring). C{times} and C{auth}
    read as fresh lists: a caller that changes one assigns it back.
    """

    __slots__ = ("_b",)

    def __init__(self, times: Iterable[float], last: float) -> None:
        times = list(times)
        self._b = _HEAD.pack(last, len(times), 0, 0) + b"".join(_TIME.pack(t) for t in times)

    def _parts(self) -> tuple[float, int, int, int, int, int]:
        """last, counts, and where the auth and event sections start."""
        last, n_times, n_auth, n_events = _HEAD.unpack_from(self._b)
        auth_at = _HEAD.size + 8 * n_times
        return last, n_times, n_auth, n_events, auth_at, auth_at + _AUTH.size * n_auth

    @property
    def last(self) -> float:
        return _TIME.unpack_from(self._b)[0]

    @last.setter
    def last(self, value: float) -> None:
        self._b = _TIME.pack(value) + self._b[8:]

    @property
    def times(self) -> list[float]:
        """Connection times inside the window, oldest first (never longer than the limit)."""
        _, n_times, *_ = _HEAD.unpack_from(self._b)
        return list(struct.unpack_from(f"<{n_times}d", self._b, _HEAD.size))

    @times.setter
    def times(self, value: list[float]) -> None:
        last, _, n_auth, n_events, auth_at, _ = self._parts()
        self._b = (_HEAD.pack(last, len(value), n_auth, n_events)
                   + struct.pack(f"<{len(value)}d", *value) + self._b[auth_at:])

    def connect(self, now: float, cutoff: float, limit: int) -> int | None:
        """
        A connection at C{now}: times at or before C{cutoff} leave the
        window; when C{limit} remain it is refused and their count returned
        (nothing recorded), else it is recorded (and C{last} set) in one
        repack, the decision's hot path.
        """
        b = self._b
        _, n_times, n_auth, n_events = _HEAD.unpack_from(b)
        end = _HEAD.size + 8 * n_times
        drop = 0
        if n_times and _TIME.unpack_from(b, _HEAD.size)[0] <= cutoff:
            drop = bisect_right(struct.unpack_from(f"<{n_times}d", b, _HEAD.size), cutoff)
        kept = n_times - drop
        if kept >= limit:
            return kept
        self._b = (_HEAD.pack(now, kept + 1, n_auth, n_events) + b[_HEAD.size + 8 * drop:end]
                   + _TIME.pack(now) + b[end:])
        return None

    @property
    def auth(self) -> list[tuple[float, bytes]] | None:
        """C{(time, digest)} of distinct failed (user, secret) pairs inside the window."""
        _, _, n_auth, _, auth_at, events_at = self._parts()
        if not n_auth:
            return None
        return list(_AUTH.iter_unpack(self._b[auth_at:events_at]))

    @auth.setter
    def auth(self, value: list[tuple[float, bytes]] | None) -> None:
        value = value or []
        last, n_times, _, n_events, auth_at, events_at = self._parts()
        self._b = (_HEAD.pack(last, n_times, len(value), n_events) + self._b[_HEAD.size:auth_at]
                   + b"".join(_AUTH.pack(t, d) for t, d in value) + self._b[events_at:])

    @property
    def events(self) -> list[Event] | None:
        """The last few notable events, oldest first."""
        _, _, _, n_events, _, at = self._parts()
        if not n_events:
            return None
        out: list[Event] = []
        b = self._b
        for _ in range(n_events):
            when, code, kind, size = _EVENT.unpack_from(b, at)
            at += _EVENT.size
            text = b[at:at + size].decode("utf-8", "surrogatepass")
            at += size
            if code == 255:
                protocol, _, text = text.partition("\0")
            else:
                protocol = _PROTOCOLS[code]
            out.append((when, protocol, _PREFIXES[kind] + text))
        return out

    def note(self, now: float, protocol: str, what: str) -> None:
        """Keep an event (the oldest goes past L{EVENTS_KEPT})."""
        last, n_times, n_auth, n_events, _, events_at = self._parts()
        b = self._b
        start = events_at
        if n_events >= EVENTS_KEPT:
            # Skip the oldest event.
            size = _EVENT.unpack_from(b, start)[3]
            start += _EVENT.size + size
            n_events -= 1
        self._b = (_HEAD.pack(last, n_times, n_auth, n_events + 1) + b[_HEAD.size:events_at]
                   + b[start:] + _encode_event(now, protocol, what))
