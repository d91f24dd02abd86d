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
