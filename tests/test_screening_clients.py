"""
The counted clients (screening/clients.py): a client kept under its
address as an integer, IPv4 and IPv6 never sharing one; times in whole
milliseconds from the rules' epoch, windows cut to the millisecond however
long the server has been up; what a block notice and the Redis backend's
calls (by a client's text key) still see.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.test_screening import START, Harness

DAY = 86_400.0


@pytest.fixture
def tmp(tmp_path: Path) -> Path:
    return tmp_path


@pytest.mark.parametrize("prefix, ipv6, ipv4", [
    (128, "::a00:1", "10.0.0.1"),  # IPv4-compatible IPv6: the same 32-bit number
    (96, "::5", "0.0.0.0"),  # a /96 whose network is 0
])
def test_ipv4_and_ipv6_never_share_a_count(tmp: Path, prefix: int, ipv6: str, ipv4: str) -> None:
    h = Harness(tmp, max_connections=2, ipv6_prefix=prefix)
    assert h.connect(ipv6) is None
    assert h.connect(ipv6) is None
    assert h.connect(ipv4) is None
    assert h.connect(ipv4) is None
    counts = h.service.rules.counts(ipv4)
    assert counts is not None and len(counts.times) == 2
    assert h.connect(ipv6) is not None  # the IPv6 client's third
    assert h.connect(ipv4) is not None  # the IPv4 client's own third


def test_ipv6_prefix_128_keeps_each_address(tmp: Path) -> None:
    h = Harness(tmp, max_connections=1, ipv6_prefix=128)
    assert h.connect("2001:db8::1") is None
    assert h.connect("2001:db8::2") is None
    refusal = h.connect("2001:db8::1")
    assert refusal is not None and refusal.startswith("2001:db8::1 blocked")


@pytest.mark.parametrize("uptime", [0.0, 100 * DAY, 3 * 365 * DAY])
def test_connection_window_to_the_millisecond_whatever_the_uptime(tmp: Path, uptime: float) -> None:
    """A connection exactly the window old has left it; one millisecond younger has not."""
    for name, wait, refused in (("out", 300.0, False), ("in", 299.999, True)):
        h = Harness(tmp / name, max_connections=2, connection_window_minutes=5)
        h.clock.advance(uptime)
        h.connect()
        h.clock.advance(0.5)
        h.connect()
        h.clock.advance(wait - 0.5)
        assert (h.connect() is not None) is refused, (uptime, wait)


@pytest.mark.parametrize("uptime", [0.0, 100 * DAY])
def test_auth_window_to_the_millisecond_with_connections_between(tmp: Path, uptime: float) -> None:
    """Failed pairs leave their own window as the connections leave theirs."""
    for name, wait, blocked in (("out", 900.0, False), ("in", 899.999, True)):
        h = Harness(tmp / name, max_auth_failures=2, auth_failure_window_minutes=15,
                    max_connections=100)
        h.clock.advance(uptime)
        h.open().auth_failed("a@b", b"1")
        for _ in range(3):  # connections and a repeat between the two failures
            h.clock.advance(wait / 4)
            h.open().auth_failed("a@b", b"1")
        h.clock.advance(wait / 4)
        assert h.open().auth_failed("a@b", b"2") is blocked, (uptime, wait)


def test_notice_events_keep_their_times_and_order(tmp: Path) -> None:
    h = Harness(tmp, max_auth_failures=2, max_failed_rcpts=50)
    h.clock.advance(100 * DAY + 0.25)
    t0 = h.clock.seconds()
    screen = h.open(protocol="smtp")
    screen.rcpt_unknown()
    h.clock.advance(1.5)
    screen = h.open(protocol="gopher")
    screen.auth_failed("bob@example.com", b"x")
    h.clock.advance(2)
    h.open(protocol="imap").auth_failed("eve@example.com", b"y")
    [notice] = h.notifier.blocks
    assert notice["events"] == [
        (t0, "-", "connect"),
        (t0, "smtp", "rcpt unknown (1 in this session)"),
        (t0 + 1.5, "-", "connect"),
        (t0 + 1.5, "gopher", "auth failed user=bob@example.com"),
        (t0 + 3.5, "-", "connect"),
        (t0 + 3.5, "imap", "auth failed user=eve@example.com"),
    ]


def test_a_clock_set_back_counts_on(tmp: Path) -> None:
    """A wall clock stepped back an hour: nothing breaks, connections still count."""
    h = Harness(tmp, max_connections=3)
    h.connect()
    h.clock.rightNow -= 3600
    h.connect()
    h.open().auth_failed("a@b", b"x")
    assert h.connect() is not None
    assert h.service.rules.counts("192.0.2.7") is None  # blocked: counts dropped


def test_text_keys_reach_the_client(tmp: Path) -> None:
    """The Redis backend names clients by text: forget_counts and block_client find them."""
    h = Harness(tmp, max_connections=2, ipv6_prefix=64)
    h.connect("2001:db8:1:2::1")
    h.connect("2001:db8:1:2::2")
    rules = h.service.rules
    assert rules.counts("2001:db8:1:2::/64") is not None
    # only the canonical text names a client, as when the dict was keyed by it
    for other in ("2001:db8:1:2::1", "2001:DB8:1:2::/64", "2001:db8:1:2::/48", "junk", ""):
        assert rules.counts(other) is None
    rules.forget_counts("2001:db8:1:2::/64")
    assert rules.counts("2001:db8:1:2::/64") is None
    assert h.connect("2001:db8:1:2::3") is None
    h.connect("192.0.2.9")
    rules.block_client("192.0.2.9", "connections", 3, 2, 5, "smtp")
    assert rules.counts("192.0.2.9") is None
    [notice] = h.notifier.blocks
    assert notice["events"] == [(START, "-", "connect")]


def test_times_are_the_clock_to_the_millisecond(tmp: Path) -> None:
    """A time goes in as the clock's reading and comes out the same (rounded, never cut down)."""
    h = Harness(tmp, max_connections=1000)
    for step in (0.3, 0.001, 1.7, 299.999, 100 * DAY + 0.003, 0.1, 0.7):
        h.clock.advance(step)
        h.connect()
        counts = h.service.rules.counts("192.0.2.7")
        assert counts is not None
        assert counts.last == pytest.approx(h.clock.seconds(), abs=1e-6)
        assert counts.times[-1] == counts.last


# The order: a client moves to the end at most once a minute (clients.py)


def slots(h: Harness, *hosts: str) -> list[int | None]:
    table = h.service.rules.table
    return [table.slot_of(host) for host in hosts]


def test_a_client_seen_within_a_minute_of_its_move_keeps_its_place_and_its_counts(
        tmp: Path) -> None:
    """Seen again inside the minute it stays put; the prune past its move still keeps it."""
    h = Harness(tmp, start=False, max_connections=10, max_auth_failures=2,
                connection_window_minutes=5, auth_failure_window_minutes=15)
    a, b = "10.0.0.1", "10.0.0.2"
    h.connect(a)
    h.clock.advance(1)
    h.connect(b)
    h.clock.advance(58)
    assert h.open(a).auth_failed("x@y", b"1") is False  # 59 s after its move: no move
    table = h.service.rules.table
    assert list(table.clients) == slots(h, a, b)
    # the horizon (15 min) past A's move, not past its failed login: kept
    h.clock.advance(15 * 60 - 59 + 10)
    table.prune()
    assert list(table.clients) == slots(h, a)  # B went, A stays
    counts = h.service.rules.counts(a)
    assert counts is not None and len(counts.auth) == 1 and len(counts.times) == 2
    assert h.open(a).auth_failed("x@y", b"2") is True  # 14:11 after the first: blocked
    h.clock.advance(1)
    h.connect(b)
    h.clock.advance(60)
    h.connect(b)  # a minute after its move: to the end
    h.connect("10.0.0.3")
    assert list(table.clients) == slots(h, b, "10.0.0.3")
    h.clock.advance(59)
    h.connect(b)
    assert list(table.clients) == slots(h, b, "10.0.0.3")


def test_prune_removes_exactly_the_idle_ones_when_order_and_last_seen_differ(
        tmp: Path) -> None:
    h = Harness(tmp, start=False, max_connections=10, connection_window_minutes=5,
                auth_failure_window_minutes=5)
    a, b, c, d, e = (f"10.0.0.{i}" for i in range(1, 6))
    h.connect(a)  # seen once at 0
    h.clock.advance(1)
    h.connect(b)
    h.connect(c)
    h.clock.advance(1)
    h.connect(c)  # C: a record seen at 2
    h.clock.advance(38)
    h.connect(b)  # B: seen at 40, still in its place of 1
    h.clock.advance(60)
    h.connect(d)  # D at 100
    h.connect(e)
    h.clock.advance(0.5)
    h.connect(e)  # E: a record at 100.5
    table = h.service.rules.table
    assert list(table.clients) == slots(h, a, b, c, d, e)
    h.clock.advance(300 - 100.5 + 20)  # the cutoff at 20
    assert table.prune(1) == (1, False)  # a slice of one: A
    assert table.prune() == (1, True)  # B kept, C gone, D the first moved since
    assert list(table.clients) == slots(h, b, d, e)
    h.clock.advance(20)  # the cutoff at 40: B was seen then, not after
    assert table.prune() == (1, True)
    assert list(table.clients) == slots(h, d, e)
    h.clock.advance(60)  # 100: D, seen once then
    assert table.prune() == (1, True)
    h.clock.advance(0.5)
    assert table.prune() == (1, True)
    assert table.clients == {}


def test_prune_looks_at_a_slice_and_the_service_comes_back_a_second_later(tmp: Path) -> None:
    from twisted_mail_screen.screening.clients import PRUNE_SLICE
    h = Harness(tmp, max_connections=10, max_tracked_clients=10**6,
                connection_window_minutes=5, auth_failure_window_minutes=5)
    many = PRUNE_SLICE + 500
    for i in range(many):
        h.connect(f"10.{i >> 16}.{(i >> 8) & 255}.{i & 255}")
    h.clock.pump([1] * 299)
    assert h.service.admin.stats()["tracked"] == many  # the minute's prunes found none idle
    h.clock.advance(1)  # the prune at 300 s, the horizon: one slice
    assert h.service.admin.stats()["tracked"] == 500
    h.clock.advance(1)  # the rest a tick later, not a minute
    assert h.service.admin.stats()["tracked"] == 0


def test_eviction_drops_the_least_recently_moved(tmp: Path) -> None:
    """Least recently seen to within a minute: a client seen inside its minute keeps its place."""
    h = Harness(tmp, max_connections=10, max_tracked_clients=100)
    hosts = [f"10.0.0.{i}" for i in range(101)]
    for host in hosts[:100]:
        h.connect(host)
        h.clock.advance(0.1)
    h.clock.advance(20)
    h.connect(hosts[0])  # 30 s after its move: stays first
    h.clock.advance(40)
    h.connect(hosts[1])  # a minute after its move: to the end
    h.connect(hosts[100])  # over the cap: the two first go
    counts = h.service.rules.counts
    assert [counts(x) is None for x in hosts[:4]] == [True, False, True, False]
    assert h.service.admin.stats()["evicted"] == 2
