"""
The packed per-client record (screening/record.py): what goes in comes
out, the event list keeps its last few, windows cut where they should,
and it is small.
"""

from __future__ import annotations

import sys

from twisted_mail_screen.screening import record as packed
from twisted_mail_screen.screening.record import EVENTS_KEPT

#: A server up 100 days: a record's base is ms since the rules' epoch.
DAY = 86_400_000
T = 100 * DAY


def test_times_auth_events_and_last_round_trip():
    b = packed.pack(T + 1250, [T + 500, T + 1250], [(T + 100, b"\x01" * 8), (T + 1500, b"\x02" * 8)],
                    [(T + 1500, "imap", "auth failed user=a@b.test")])
    r = packed.unpack(b)
    assert r.last == T + 1250 and r.times == [T + 500, T + 1250]
    assert r.auth == [(T + 100, b"\x01" * 8), (T + 1500, b"\x02" * 8)]
    assert r.events == [(T + 1500, "imap", "auth failed user=a@b.test")]
    assert packed.last_of(b) == T + 1250
    assert packed.unpack(packed.pack(T, [])) == (T, [], [], [])


def test_every_width_of_number_round_trips():
    """Offsets and bases across every varint length, both signs of the base."""
    for base in (0, 1, 127, 128, -1, -64, -65, 16_383, 2**31, 2**40 + 7, -(2**40)):
        for gap in (0, 1, 127, 128, 16_383, 16_384, 2**21, 7 * DAY, 2**35):
            b = packed.pack(base + gap, [base, base + gap], [(base + gap, b"\xff" * 8)],
                            [(base, "web", "x")])
            assert packed.unpack(b) == (base + gap, [base, base + gap],
                                        [(base + gap, b"\xff" * 8)], [(base, "web", "x")])


def test_events_keep_the_last_few_in_order_whatever_their_text():
    b = packed.pack(0, [])
    texts = [("smtp", "unknown recipient (1 in this session)"), ("pop3", "auth failed user=\udcff\u00e9"),
             ("gopher", "something odd"), ("submission", "refused: simultaneous 3/2"), ("-", ""),
             ("imap", "auth failed user="), ("web", "refused: ")]
    for i in range(EVENTS_KEPT + 9):
        protocol, what = texts[i % len(texts)]
        b = packed.note(b, T + i, protocol, what)
        assert packed.last_of(b) == T + i
    expected = [(T + i, *texts[i % len(texts)]) for i in range(9, EVENTS_KEPT + 9)]
    assert packed.unpack(b).events == expected


def test_a_hostile_clients_record_is_small():
    """
    The bench's hostile client on a server up 100 days, even with its two
    connections half an hour apart (in an hour's window): one connection,
    a failed login and its event, a second connection. 80 bytes is the
    memory goal's share.
    """
    for gap in (1_000, 60_000, 1_800_000):
        b = packed.note(packed.pack(T, [T]), T, "imap", "auth failed user=user@example.com")
        b, count, repeated = packed.failed(b, T, T - 15 * 60_000, b"12345678")
        assert (count, repeated) == (1, False)
        b = packed.connect(b, T + gap, T + gap - 60 * 60_000, 60)
        assert isinstance(b, bytes)
        assert sys.getsizeof(b) <= 80, (gap, sys.getsizeof(b))
        assert packed.unpack(b) == (T + gap, [T, T + gap], [(T, b"12345678")],
                                    [(T, "imap", "auth failed user=user@example.com")])


def test_counts_past_a_byte_or_a_short_are_kept():
    """A site may set limits in the hundreds of thousands: the counts do not wrap or fail."""
    b = packed.pack(T, [T + i for i in range(70_000)], [(T + i, i.to_bytes(8, "big")) for i in range(300)])
    b = packed.connect(b, T + 70_000, T - 1, 10**9)
    assert isinstance(b, bytes)
    r = packed.unpack(b)
    assert len(r.times) == 70_001 and r.last == T + 70_000
    assert len(r.auth) == 300 and r.auth[-1] == (T + 299, (299).to_bytes(8, "big"))
    for n_auth in (30, 31, 32):
        assert len(packed.unpack(packed.pack(T, [], [(T, bytes(8))] * n_auth)).auth) == n_auth


def test_connect_drops_what_left_the_window_and_refuses_at_the_limit():
    b = packed.pack(T + 3, [T + 1, T + 2, T + 3])
    b = packed.connect(b, T + 10, T + 2, 3)  # 1 and 2 leave the window (at or before the cutoff)
    assert isinstance(b, bytes) and packed.unpack(b)[:2] == (T + 10, [T + 3, T + 10])
    b = packed.connect(b, T + 11, T + 2, 3)
    assert isinstance(b, bytes)
    assert packed.connect(b, T + 12, T + 2, 3) == 3  # the limit: refused, nothing recorded
    assert packed.unpack(b)[:2] == (T + 11, [T + 3, T + 10, T + 11])
    # one millisecond younger than the cutoff stays in the window
    assert packed.connect(packed.pack(T, [T]), T + 5, T - 1, 1) == 1
    assert isinstance(packed.connect(packed.pack(T, [T]), T + 5, T, 1), bytes)


def test_failed_pairs_leave_the_window_and_repeat_once():
    b = packed.pack(T, [])
    b, count, repeated = packed.failed(b, T, T - 100, b"a" * 8)
    assert (count, repeated) == (1, False)
    b, count, repeated = packed.failed(b, T + 50, T - 50, b"a" * 8)
    assert (count, repeated) == (1, True)
    b, count, repeated = packed.failed(b, T + 60, T - 40, b"b" * 8)
    assert (count, repeated) == (2, False)
    b, count, repeated = packed.failed(b, T + 100, T, b"a" * 8)  # the first is at the cutoff: gone
    assert (count, repeated) == (2, False)
    assert packed.unpack(b).auth == [(T + 60, b"b" * 8), (T + 100, b"a" * 8)]
    b, count, repeated = packed.failed(b, T + 101, T + 59, b"c" * 8)
    assert count == 3 and packed.unpack(b).auth[0] == (T + 60, b"b" * 8)


def test_a_clock_stepped_back_repacks_on_an_earlier_base():
    """A wall clock set back before a record's base: nothing is lost or negative."""
    b = packed.pack(T, [T], [(T, b"d" * 8)], [(T, "smtp", "x")])
    b = packed.connect(b, T - 5_000, T - 9_000, 10)
    assert isinstance(b, bytes)
    b = packed.note(b, T - 6_000, "pop3", "y")
    b, count, _ = packed.failed(b, T - 7_000, T - 9_000, b"e" * 8)
    b = packed.touch(b, T - 8_000)
    assert packed.unpack(b) == (T - 8_000, [T, T - 5_000], [(T, b"d" * 8), (T - 7_000, b"e" * 8)],
                                [(T, "smtp", "x"), (T - 6_000, "pop3", "y")])
    assert count == 2


def test_long_texts_are_cut_on_a_character():
    b = packed.note(packed.pack(T, []), T, "imap", "auth failed user=" + "é" * 70_000)
    [(_, _, what)] = packed.unpack(b).events
    assert what == "auth failed user=" + "é" * 0xFFFF  # the prefix is not stored


def test_the_move_time_is_kept_by_every_change_but_a_move():
    """To the second, never after the real one; a clock set back repacks and keeps it."""
    moved = T + 4_300
    b = packed.pack(T + 5_000, [T + 1_700, T + 5_000], [(T + 1_900, bytes(8))],
                    [(T + 1_900, "imap", "x")], moved=moved)
    assert packed.moved_of(b) == T + 4_000
    for now in (T + 5_000, T + 59_999, T + 3 * DAY, T - 3_600_000):  # the last: set back
        for changed in (packed.touch(b, now), packed.connect(b, now, T, 100),
                        packed.note(b, now, "smtp", "rset"),
                        packed.failed(b, now, T, b"abcdefgh")[0]):
            assert isinstance(changed, bytes)
            assert packed.moved_of(changed) <= moved
            assert packed.moved_of(changed) > moved - 1_000
        assert packed.unpack(packed.moved(b, now)) == packed.unpack(b)
        if now < T + 1_000 + 65_535_000:
            assert now - 1_000 < packed.moved_of(packed.moved(b, now)) <= now
    assert packed.moved_of(packed.pair(T + 1_500, T + 9_000)) == T + 1_000
    assert packed.moved_of(packed.pair(T + 1_500, T - 9_000)) == T + 1_000  # set back
    # past 65,535 s after the base it stays there, before the real move
    assert packed.moved_of(packed.moved(b, T + 3 * DAY)) == T + 1_000 + 65_535_000  # base + cap
    assert packed.moved_of(packed.pack(T + 1_200, [])) == T + 1_000  # default: last


def _connect_by_unpacking(b: bytes, now: int, cutoff: int, limit: int) -> bytes | int:
    """What L{packed.connect} must answer, the slow and obvious way."""
    r = packed.unpack(b)
    kept = [t for t in r.times if t > cutoff]
    if len(kept) >= limit:
        return len(kept)
    return packed.pack(now, [*kept, now], r.auth, r.events, packed.moved_of(b))


def test_connect_on_a_long_window_or_many_failures_is_the_unpacked_answer():
    # a site with a high limit keeps hundreds of times (past the head's
    # one-byte size) and a storm of failed pairs past the head's 5-bit count
    for n_times, n_auth in ((40, 0), (200, 0), (2000, 3), (10, 40), (300, 35)):
        times = [T + 7 * k for k in range(n_times)]
        auth = [(T + k, bytes([k % 256]) * 8) for k in range(n_auth)]
        b = packed.pack(times[-1], times, auth, [(T + 5, "smtp", "refused: x")], moved=T)
        for cutoff, limit in ((T - 1, 10_000), (T + 7 * (n_times // 2), 10_000),
                              (T - 1, n_times), (T + 7 * (n_times - 1), 1)):
            now = T + 7 * n_times + 3
            got = packed.connect(b, now, cutoff, limit)
            assert got == _connect_by_unpacking(b, now, cutoff, limit)
            if isinstance(got, bytes):
                assert packed.unpack(got).auth == auth


def test_a_connection_costs_about_the_same_with_a_long_window():
    import timeit

    def cost(n: int) -> float:
        times = [T + k for k in range(n)]
        b = packed.pack(times[-1], times)
        now = T + n + 1
        return min(timeit.repeat(lambda: packed.connect(b, now, T - 1, 100_000), number=20, repeat=25))

    # unpacking 2,000 times in Python costs ~100x a 20-time window; slicing ~2x
    assert cost(2000) < 10 * cost(20)
