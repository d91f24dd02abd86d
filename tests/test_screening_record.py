"""
The packed per-client record (screening/record.py): what goes in comes
out, the event list keeps its last few, and it is small.
"""

from __future__ import annotations

import sys

from twisted_mail_screen.screening.record import EVENTS_KEPT, ClientRecord


def test_times_auth_and_last_round_trip_independently():
    r = ClientRecord([10.5, 11.25], 11.25)
    assert r.times == [10.5, 11.25] and r.last == 11.25 and r.auth is None and r.events is None
    r.auth = [(12.0, b"\x01" * 8), (13.5, b"\x02" * 8)]
    r.note(13.5, "imap", "auth failed user=a@b.test")
    r.times = [11.25, 14.0, 15.0]
    r.last = 15.0
    assert r.times == [11.25, 14.0, 15.0]
    assert r.auth == [(12.0, b"\x01" * 8), (13.5, b"\x02" * 8)]
    assert r.events == [(13.5, "imap", "auth failed user=a@b.test")]
    assert r.last == 15.0
    r.auth = None
    r.times = []
    assert r.auth is None and r.times == [] and r.events == [(13.5, "imap", "auth failed user=a@b.test")]


def test_events_keep_the_last_few_in_order_whatever_their_text():
    r = ClientRecord([], 0.0)
    texts = [("smtp", "unknown recipient (1 in this session)"), ("pop3", "auth failed user=\udcff\u00e9"),
             ("gopher", "something odd"), ("submission", "refused: simultaneous 3/2"), ("-", "")]
    for i in range(EVENTS_KEPT + 3):
        protocol, what = texts[i % len(texts)]
        r.note(float(i), protocol, what)
    expected = [(float(i), *texts[i % len(texts)]) for i in range(3, EVENTS_KEPT + 3)]
    assert r.events == expected


def test_a_hostile_clients_record_is_small():
    """One connection, one failed login and its event: the bench's hostile client."""
    r = ClientRecord([1_800_000_000.0], 1_800_000_000.0)
    r.auth = [(1_800_000_000.0, b"12345678")]
    r.note(1_800_000_000.0, "imap", "auth failed user=user@example.com")
    size = sys.getsizeof(r) + sys.getsizeof(r._b)
    assert size <= 160, size


def test_counts_past_a_byte_or_a_short_are_kept():
    """A site may set limits in the hundreds of thousands: the counts do not wrap or fail."""
    r = ClientRecord([], 0.0)
    r.times = [float(i) for i in range(70_000)]
    assert r.connect(70_000.0, -1.0, 10**9) is None
    assert len(r.times) == 70_001 and r.last == 70_000.0
    r.auth = [(float(i), i.to_bytes(8, "big")) for i in range(300)]
    assert len(r.auth) == 300 and r.auth[-1] == (299.0, (299).to_bytes(8, "big"))


def test_connect_drops_what_left_the_window_and_refuses_at_the_limit():
    r = ClientRecord([1.0, 2.0, 3.0], 3.0)
    assert r.connect(10.0, 2.0, 3) is None  # 1 and 2 leave the window, 3 and 10 remain
    assert r.times == [3.0, 10.0] and r.last == 10.0
    assert r.connect(11.0, 2.0, 3) is None
    assert r.connect(12.0, 2.0, 3) == 3  # the limit: refused, nothing recorded
    assert r.times == [3.0, 10.0, 11.0] and r.last == 11.0
