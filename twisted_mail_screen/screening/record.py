# -*- test-case-name: tests.test_screening_record -*-
"""
The in-memory record of a client that did more than connect once: its
connection times inside the window, its distinct failed (user, secret)
digests, and its last few notable events, packed into one C{bytes} value
that is itself the value in the rules' dictionary (no object around it).

Why packed, and why so tightly: an attacker spread over a million
addresses, each failing a login, is the case the memory goal (10^6 such
clients in 200 MB) is about. As Python lists and tuples one record cost
about 700 bytes; as f64 fields in a bytes value held by a small object,
about 170. This value is 80 (the common record of two connections and a
failed login: 41 bytes, 16 of them the user name, 2 the move time); with
its integer key (32) and its dict slot (44, 88 once the dict has grown
under turnover, see clients.py) a client costs about 156 to 200 bytes
(docs/performance.md has the figures).

Times are whole milliseconds of the rules' clock (L{ClientTable} counts
from an epoch of its own). A record's base is a whole second (32 bits,
signed) at or before the earliest time it holds; every time is an
unsigned LEB128 varint of milliseconds after the base, so it costs two
bytes within 16 seconds of it and three within half an hour, whatever
the uptime.

Layout::

    head: u8 n_events (3 bits) | n_auth << 3 (31: a varint follows),
          u8 size of the times in bytes (255: a varint follows), i32 base (s),
          u16 moved: whole seconds from the base to the record's move (below)
    [n_auth: varint] [size of the times: varint]
    last - base: varint
    times: (time - base) each, oldest first
    n_auth x (time - base, digest: 8 bytes)
    n_events x (time - base, code: u8, length: varint, text: UTF-8)

The times are counted by their size, not their number, for the
decision's hot path (L{connect}): it decodes only the times that leave
the window (each once), counts the rest in C (one final byte per varint)
and appends the new one by slicing, so a connection costs about the same
with one time in the window as with thousands (a site's high limit). An event's code is its
protocol (0-5, 7: not in the table, the text then starts with the
protocol's name and a NUL) plus 8 times its kind, a common prefix of its
text (0: none), so the usual "auth failed user=..." stores only the user
name. A time earlier than the base (a wall clock stepped back) repacks
the record on an earlier base.

The moved field is when the client last took its place at the end of the
table's order (clients.py moves a client at most once a minute, not on
every event), rounded down to the second and capped at 65,535 seconds
after the base: always at or before the real move, which is what the
table's prune needs to stop early without missing anyone (a capped one
only moves more often). Every function here keeps it but L{moved}.
"""

from __future__ import annotations

import struct
from bisect import bisect_right
from collections.abc import Sequence
from typing import NamedTuple

#: The last few notable events kept per client, for the postmaster.
EVENTS_KEPT = 6

#: A failed pair: its time (ms) and its 8-byte keyed digest.
Failure = tuple[int, bytes]
#: A notable event: its time (ms), protocol, text.
MsEvent = tuple[int, str, str]

_HEAD = struct.Struct("<BBiH")
_MOVED_MAX = 0xFFFF
_AUTH_ESCAPE = 31
_TIMES_ESCAPE = 255
_DIGEST = 8
_PROTOCOLS = ("-", "smtp", "submission", "pop3", "imap", "web")
_PROTOCOL_CODES = {p: i for i, p in enumerate(_PROTOCOLS)}
_OTHER_PROTOCOL = 7
_PREFIXES = ("", "auth failed user=", "refused: ")
_MAX_TEXT = 0xFFFF
# A varint's bytes but its last: deleting them leaves one byte per number.
_CONTINUED = bytes(range(0x80, 0x100))
# The one- and two-byte varints, made once: encoding is a list index.
_SMALL = 1 << 14
_VARINT = [bytes((x,)) if x < 0x80 else bytes(((x & 0x7F) | 0x80, x >> 7))
           for x in range(_SMALL)]


class Record(NamedTuple):
    """A record decoded (L{unpack}): times in ms, oldest first."""

    last: int
    times: list[int]
    auth: list[Failure]
    events: list[MsEvent]


def _var(x: int) -> bytes:
    if x < _SMALL:
        return _VARINT[x]
    out = bytearray()
    while x > 0x7F:
        out.append((x & 0x7F) | 0x80)
        x >>= 7
    out.append(x)
    return bytes(out)


def _get(b: bytes, i: int) -> tuple[int, int]:
    x = b[i]
    i += 1
    if x < 0x80:
        return x, i
    x &= 0x7F
    shift = 7
    while True:
        y = b[i]
        i += 1
        x |= (y & 0x7F) << shift
        if y < 0x80:
            return x, i
        shift += 7


def _head(size: int, n_auth: int, n_events: int, base: int, last: int, moved: int) -> bytes:
    """
    The head: C{size} of the times in bytes, C{base} in seconds, C{last}
    in ms after it, C{moved} the field (seconds after the base).
    """
    if n_auth < _AUTH_ESCAPE and size < _TIMES_ESCAPE:
        return _HEAD.pack(n_events | n_auth << 3, size, base, moved) + _var(last)
    return b"".join((
        _HEAD.pack(n_events | min(n_auth, _AUTH_ESCAPE) << 3, min(size, _TIMES_ESCAPE), base,
                   moved),
        _var(n_auth) if n_auth >= _AUTH_ESCAPE else b"",
        _var(size) if size >= _TIMES_ESCAPE else b"",
        _var(last)))


def _parse_head(b: bytes) -> tuple[int, int, int, int, int, int, int]:
    """Size of the times, n_auth, n_events, base (ms), last, where the times start, moved field."""
    h, size, base, moved = _HEAD.unpack_from(b)
    i = _HEAD.size
    n_auth = h >> 3
    if n_auth == _AUTH_ESCAPE:
        n_auth, i = _get(b, i)
    if size == _TIMES_ESCAPE:
        size, i = _get(b, i)
    base *= 1000
    last, i = _get(b, i)
    return size, n_auth, h & 7, base, base + last, i, moved


def _event(offset: int, protocol: str, what: str) -> bytes:
    code = _PROTOCOL_CODES.get(protocol)
    if code is None:
        code, what = _OTHER_PROTOCOL, f"{protocol}\0{what}"
    for kind in (1, 2):
        prefix = _PREFIXES[kind]
        if what.startswith(prefix):
            code |= kind << 3
            what = what[len(prefix):]
            break
    # cut by characters, so the bytes kept always decode
    text = what[:_MAX_TEXT].encode("utf-8", "surrogatepass")
    return b"".join((_var(offset), bytes((code,)), _var(len(text)), text))


def pack(last: int, times: Sequence[int], auth: Sequence[Failure] = (),
         events: Sequence[MsEvent] = (), moved: int | None = None) -> bytes:
    """
    A record of these values (events beyond L{EVENTS_KEPT}: the oldest
    go), moved at C{moved} (default: C{last}).
    """
    events = events[-EVENTS_KEPT:]
    if moved is None:
        moved = last
    seconds = min((last, moved, *times, *(t for t, _ in auth),
                   *(t for t, _, _ in events))) // 1000
    base = seconds * 1000
    encoded = b"".join([_var(t - base) for t in times])
    parts = [_head(len(encoded), len(auth), len(events), seconds, last - base,
                   min(_MOVED_MAX, (moved - base) // 1000)), encoded]
    for t, digest in auth:
        parts += (_var(t - base), digest)
    parts += [_event(t - base, protocol, what) for t, protocol, what in events]
    return b"".join(parts)


def _times(b: bytes, i: int, end: int, base: int) -> list[int]:
    times = []
    while i < end:
        t, i = _get(b, i)
        times.append(base + t)
    return times


def unpack(b: bytes) -> Record:
    """The values of a record."""
    size, n_auth, n_events, base, last, i, _ = _parse_head(b)
    times = _times(b, i, i + size, base)
    i += size
    auth = []
    for _ in range(n_auth):
        t, i = _get(b, i)
        auth.append((base + t, b[i:i + _DIGEST]))
        i += _DIGEST
    events: list[MsEvent] = []
    for _ in range(n_events):
        t, i = _get(b, i)
        code = b[i]
        length, i = _get(b, i + 1)
        what = b[i:i + length].decode("utf-8", "surrogatepass")
        i += length
        if code & 7 == _OTHER_PROTOCOL:
            protocol, _, what = what.partition("\0")
        else:
            protocol = _PROTOCOLS[code & 7]
        events.append((base + t, protocol, _PREFIXES[code >> 3] + what))
    return Record(last, times, auth, events)


def last_of(b: bytes) -> int:
    """When the client was last seen (ms)."""
    return _parse_head(b)[4]


def moved_of(b: bytes) -> int:
    """When the client took its place in the table's order (ms, at or before it)."""
    _, _, seconds, moved = _HEAD.unpack_from(b)
    return (seconds + moved) * 1000


def moved(b: bytes, now: int) -> bytes:
    """The record moved at C{now} (nothing else changed)."""
    h, size, seconds, _ = _HEAD.unpack_from(b)
    base = seconds * 1000
    if now < base:
        r = unpack(b)
        return pack(r.last, r.times, r.auth, r.events, now)
    return _HEAD.pack(h, size, seconds, min(_MOVED_MAX, (now - base) // 1000)) + b[_HEAD.size:]


def touch(b: bytes, now: int) -> bytes:
    """The record seen at C{now}, nothing else counted."""
    size, n_auth, n_events, base, _, i, m = _parse_head(b)
    if now < base:
        r = unpack(b)
        return pack(now, r.times, r.auth, r.events, moved_of(b))
    return _head(size, n_auth, n_events, base // 1000, now - base, m) + b[i:]


def connect(b: bytes, now: int, cutoff: int, limit: int) -> bytes | int:
    """
    A connection at C{now}: times at or before C{cutoff} leave the window;
    when C{limit} remain it is refused and their count returned (the
    record unchanged), else the record with it counted (and seen at
    C{now}) is returned: the decision's hot path (see the module docstring).
    """
    h, size, seconds, m = _HEAD.unpack_from(b)
    base = seconds * 1000
    if now < base:
        r = unpack(b)
        kept = r.times[bisect_right(r.times, cutoff):] if r.times and r.times[0] <= cutoff \
            else r.times
        if len(kept) >= limit:
            return len(kept)
        return pack(now, [*kept, now], r.auth, r.events, moved_of(b))
    escaped = h >= _AUTH_ESCAPE << 3 or size == _TIMES_ESCAPE
    if escaped:
        # a long window (a site's high limit) or many failed pairs: the same
        # slicing, so a connection costs no more with 1,000 times than with 60
        size, n_auth, n_events, _, _, i, _ = _parse_head(b)
    else:
        i = _get(b, _HEAD.size)[1]  # past last, rewritten below
    end = i + size
    cut = cutoff - base
    if i < end and (b[i] if b[i] < 0x80 else _get(b, i)[0]) <= cut:
        while i < end:  # the times leaving the window, oldest first
            t, j = _get(b, i)
            if t > cut:
                break
            i = j
    kept = b[i:end]
    count = len(kept.translate(None, _CONTINUED))
    if count >= limit:
        return count
    at = _var(now - base)
    size = end - i + len(at)
    if escaped or size >= _TIMES_ESCAPE:
        if not escaped:
            n_auth, n_events = h >> 3, h & 7
        return _head(size, n_auth, n_events, seconds, now - base, m) + kept + at + b[end:]
    return b"".join((_HEAD.pack(h, size, seconds, m), at, kept, at, b[end:]))


def pair(first: int, now: int) -> bytes:
    """
    The record of a client seen once at C{first} and connecting again at
    C{now}, moved at C{first} (a client seen once took its place then).
    """
    if now < first:
        return pack(now, (first, now), moved=first)
    seconds = first // 1000
    base = seconds * 1000
    t0, t1 = _var(first - base), _var(now - base)
    return b"".join((_HEAD.pack(0, len(t0) + len(t1), seconds, 0), t1, t0, t1))


def _events_at(b: bytes, i: int, n_auth: int) -> int:
    """Where the events start, given where the auth pairs start."""
    for _ in range(n_auth):
        while b[i] > 0x7F:
            i += 1
        i += 1 + _DIGEST
    return i


def note(b: bytes, now: int, protocol: str, what: str) -> bytes:
    """The record with an event kept (the oldest goes past L{EVENTS_KEPT}) and seen at C{now}."""
    size, n_auth, n_events, base, _, i, m = _parse_head(b)
    if now < base:
        r = unpack(b)
        return pack(now, r.times, r.auth, [*r.events, (now, protocol, what)], moved_of(b))
    events_at = start = _events_at(b, i + size, n_auth)
    if n_events >= EVENTS_KEPT:
        _, j = _get(b, start)  # the oldest event goes
        length, j = _get(b, j + 1)
        start = j + length
        n_events -= 1
    return b"".join((_head(size, n_auth, n_events + 1, base // 1000, now - base, m),
                     b[i:events_at], b[start:], _event(now - base, protocol, what)))


def failed(b: bytes, now: int, cutoff: int, digest: bytes) -> tuple[bytes, int, bool]:
    """
    A failed pair at C{now}: pairs at or before C{cutoff} leave the window;
    a digest already inside it is a repeat and not added. Returns the
    record, the pairs inside the window, and whether it was a repeat.
    """
    size, n_auth, n_events, base, last, i, m = _parse_head(b)
    j = auth_at = i + size
    failures: list[Failure] = []
    for _ in range(n_auth):
        t, j = _get(b, j)
        if base + t > cutoff or failures:
            failures.append((base + t, b[j:j + _DIGEST]))
        j += _DIGEST
    repeated = any(d == digest for _, d in failures)
    if not repeated:
        failures.append((now, digest))
    if now < base:
        r = unpack(b)
        return pack(r.last, r.times, failures, r.events, moved_of(b)), len(failures), repeated
    parts = [_head(size, len(failures), n_events, base // 1000, last - base, m), b[i:auth_at]]
    for t, d in failures:
        parts += (_var(t - base), d)
    parts.append(b[j:])
    return b"".join(parts), len(failures), repeated
