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
