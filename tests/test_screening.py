"""
Tests for L{twisted_mail_screen.screening.service}: every rule at N-1, at N and
after expiry, with L{Clock} as the only time.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any

import pytest
from twisted.internet.task import Clock
from twisted.logger import Logger, formatEvent

from twisted_mail_screen.screening.blocklist import BlockList, WhitelistFile
from twisted_mail_screen.screening.listfile import format_expiry
from twisted_mail_screen.screening.freeze import MemoryFreezeStore
from twisted_mail_screen.screening.interfaces import ClientScreen, Screening
from twisted_mail_screen.screening.notify import PostmasterNotifier
from twisted_mail_screen.screening.service import ScreeningService
from twisted_mail_screen.testing import RecordingNotifier
from twisted_mail_screen.screening.config import (
    FreezeConfig, ScreeningConfig, SessionAuthConfig)

START = 1_800_000_000.0
IP = "192.0.2.7"


class Harness:
    """A service on files in tmp_path, a Clock, a recording notifier and the log lines."""

    def __init__(self, tmp_path: Path, clock: Clock | None = None, start: bool = True,
                 freeze: FreezeConfig = FreezeConfig(), known: Any = None,
                 **overrides: Any) -> None:
        if clock is None:
            clock = Clock()
            clock.advance(START)
        self.clock = clock
        self.tmp_path = tmp_path
        self.lines: list[str] = []
        log = Logger(observer=lambda e: self.lines.append(formatEvent(e)))
        self.config = dataclasses.replace(ScreeningConfig(), **overrides)
        self.notifier = RecordingNotifier()
        self.freeze_store = MemoryFreezeStore(clock, log)
        self.service = ScreeningService(
            self.config, clock, BlockList(str(tmp_path / "blocklist.txt"), clock, log),
            self.freeze_store, self.notifier, freeze, log,
            WhitelistFile(str(tmp_path / "whitelist.txt"), clock, log), known)
        if start:
            self.service.start()

    def open(self, host: str = IP, protocol: str = "smtp") -> ClientScreen:
        return self.service.open(host, protocol)

    def connect(self, host: str = IP, protocol: str = "smtp") -> str | None:
        """Open and close at once; return the refusal."""
        screen = self.open(host, protocol)
        screen.closed()
        return screen.refusal

    def blocked(self, host: str = IP) -> bool:
        return self.connect(host) is not None

    def restart(self, **overrides: Any) -> "Harness":
        self.service.stop()
        return Harness(self.tmp_path, self.clock, **overrides)


@pytest.fixture
def tmp(tmp_path: Path) -> Path:
    return tmp_path


def test_is_a_screening(tmp: Path) -> None:
    """The service satisfies the Screening seam and serves a fresh client."""
    h = Harness(tmp)
    screening: Screening = h.service
    screen = screening.open(IP, "imap")
    assert screen.refusal is None
    assert screen.auth_failed("u", b"p") is False
    screen.auth_succeeded("u")
    assert screen.rcpt_unknown() is False and screen.rset() is False
    screen.closed()
    screen.closed()


# Connection rate


def test_connections_below_limit(tmp: Path) -> None:
    """max_connections connections in the window are all served."""
    h = Harness(tmp, max_connections=3)
    assert [h.connect() for _ in range(3)] == [None, None, None]
    assert h.service.admin.blocks() == []


def test_connection_over_limit_blocks(tmp: Path) -> None:
    """The connection that makes the count X+1 is refused and starts a block."""
    h = Harness(tmp, max_connections=3, block_minutes=30)
    for _ in range(3):
        assert h.connect() is None
    refusal = h.connect()
    assert refusal == f"{IP} blocked until {format_expiry(START + 1800)} (connections)"
    [(addr, expires, reason)] = h.service.admin.blocks()
    assert (addr, expires) == (IP, START + 1800)
    assert reason == "connections: 4/3 in 5m (smtp)"
    assert h.notifier.blocks[0]["rule"] == "connections"
    assert any("action=block client=192.0.2.7 rule=connections count=4/3 window=5m "
               "minutes=30" in line for line in h.lines)


def test_block_expires(tmp: Path) -> None:
    """A block holds until its expiry, then the client is served again."""
    h = Harness(tmp, max_connections=1, block_minutes=30)
    h.connect()
    assert h.blocked()
    h.clock.advance(1799)
    assert h.blocked()
    h.clock.advance(1)
    assert h.connect() is None


def test_connections_across_protocols(tmp: Path) -> None:
    """The connection window counts every protocol together."""
    h = Harness(tmp, max_connections=3)
    for protocol in ("smtp", "pop3", "imap"):
        assert h.connect(protocol=protocol) is None
    assert h.connect(protocol="submission") is not None


def test_window_boundary_exact(tmp: Path) -> None:
    """An event exactly Y minutes old has left the window; a moment earlier it has not."""
    h = Harness(tmp / "a", max_connections=2, connection_window_minutes=5)
    h.connect()
    h.clock.advance(1)
    h.connect()
    h.clock.advance(299)  # the first connection is now exactly 300 s old
    assert h.connect() is None
    os.makedirs(tmp / "b")
    h = Harness(tmp / "b", max_connections=2, connection_window_minutes=5)
    h.connect()
    h.clock.advance(1)
    h.connect()
    h.clock.advance(298.999)
    assert h.connect() is not None


def test_sliding_window_steady_client(tmp: Path) -> None:
    """A phone reconnecting every few minutes is never blocked by the defaults."""
    h = Harness(tmp)
    for _ in range(24 * 20):
        assert h.connect(protocol="imap") is None
        h.clock.advance(180)


def test_refused_connections_do_not_extend(tmp: Path) -> None:
    """Connections refused during a block neither count nor move the expiry."""
    h = Harness(tmp, max_connections=2, block_minutes=10)
    h.connect()
    h.connect()
    assert h.blocked()
    [(_, expires, _)] = h.service.admin.blocks()
    for _ in range(100):
        h.clock.advance(5)
        assert h.blocked()
    assert h.service.admin.blocks()[0][1] == expires
    h.clock.advance(expires - h.clock.seconds())
    assert h.connect() is None
    assert h.connect() is None  # counters started afresh
    assert len(h.notifier.blocks) == 1


# Simultaneous connections


def test_simultaneous_refused_not_blocked(tmp: Path) -> None:
    """The connection over max_simultaneous is refused; others are served once one closes."""
    h = Harness(tmp, max_simultaneous=2)
    a, b = h.open(), h.open()
    assert a.refusal is None and b.refusal is None
    c = h.open()
    assert c.refusal is not None and "simultaneous" in c.refusal
    assert h.service.admin.blocks() == []
    a.closed()
    d = h.open()
    assert d.refusal is None


def test_simultaneous_blocks_when_configured(tmp: Path) -> None:
    """With block_on_simultaneous the IP is blocked too."""
    h = Harness(tmp, max_simultaneous=2, block_on_simultaneous=True)
    a, b = h.open(), h.open()
    c = h.open()
    assert c.refusal is not None and "(simultaneous)" in c.refusal
    a.closed()
    b.closed()
    assert h.blocked()
    assert h.service.admin.blocks()[0][2] == "simultaneous: 3/2 at once (smtp)"


# Authentication failures


def fail_auth(h: Harness, n: int, protocol: str = "imap", host: str = IP,
              user: str = "bob@example.com") -> list[bool]:
    results = []
    for i in range(n):
        screen = h.open(host, protocol)
        results.append(screen.auth_failed(user, os.urandom(8)))
        screen.closed()
    return results


def test_auth_failures_below_limit(tmp: Path) -> None:
    """N-1 failures within the window do not block."""
    h = Harness(tmp, max_auth_failures=5)
    assert fail_auth(h, 4) == [False] * 4
    assert not h.blocked()


def test_auth_failures_at_limit(tmp: Path) -> None:
    """The Nth failure blocks and (IMAP) closes the session."""
    h = Harness(tmp, max_auth_failures=5, auth_failure_window_minutes=15)
    assert fail_auth(h, 5) == [False] * 4 + [True]
    assert h.blocked()
    note = h.notifier.blocks[0]
    assert (note["rule"], note["count"], note["limit"], note["protocol"]) == (
        "auth_failures", 5, 5, "imap")
    assert any("auth failed user=bob@example.com" in e[2] for e in note["events"])
    assert any("action=block client=192.0.2.7 rule=auth_failures count=5/5 window=15m "
               "minutes=30 offence=1 protocol=imap" in line for line in h.lines)


def test_auth_failures_across_protocols(tmp: Path) -> None:
    """Failures on SMTP, POP3 and IMAP add up."""
    h = Harness(tmp, max_auth_failures=3)
    assert fail_auth(h, 1, "smtp") == [False]
    assert fail_auth(h, 1, "pop3") == [False]
    assert fail_auth(h, 1, "imap") == [True]


def test_auth_failure_window(tmp: Path) -> None:
    """Failures further apart than the window never add up to N."""
    h = Harness(tmp, max_auth_failures=3, auth_failure_window_minutes=15)
    for _ in range(10):
        fail_auth(h, 2)
        h.clock.advance(15 * 60)
    assert not h.blocked()


def test_same_credentials_count_once(tmp: Path) -> None:
    """A client retrying one stale password counts once, whatever the protocol."""
    h = Harness(tmp, max_auth_failures=3, max_connections=0)
    for i in range(50):
        screen = h.open(protocol=("imap", "pop3", "smtp")[i % 3])
        assert screen.auth_failed("bob@example.com", b"old-password") is False
        screen.closed()
    assert not h.blocked()
    screen = h.open()
    screen.auth_failed("bob@example.com", b"another")
    assert screen.auth_failed("bob@example.com", b"third") is True


def test_secret_never_stored(tmp: Path) -> None:
    """Only a short keyed hash of the pair is kept, never the password."""
    h = Harness(tmp, max_auth_failures=10)
    screen = h.open()
    screen.auth_failed("bob@example.com", b"hunter2-secret")
    counts = h.service.rules.counts(IP)
    assert counts is not None
    [(_, digest)] = counts.auth
    assert len(digest) == 8 and b"hunter2" not in digest
    assert not any("hunter2" in line for line in h.lines)


def test_smtp_close_after_block_setting(tmp: Path) -> None:
    """SMTP sessions close on block only with close_smtp_after_block; POP3/IMAP always."""
    h = Harness(tmp / "a", max_auth_failures=1, close_smtp_after_block=False)
    assert h.open(protocol="submission").auth_failed("u@x", b"p") is False
    assert h.open("192.0.2.8", "pop3").auth_failed("u@x", b"p") is True
    os.makedirs(tmp / "b")
    h = Harness(tmp / "b", max_auth_failures=1, close_smtp_after_block=True)
    assert h.open(protocol="smtp").auth_failed("u@x", b"p") is True


def test_session_continues_after_block_does_not_rebloc(tmp: Path) -> None:
    """A session left open after its block counts nothing more and sends no more notices."""
    h = Harness(tmp, max_failed_rcpts=2, close_smtp_after_block=False)
    screen = h.open()
    screen.rcpt_unknown()
    assert screen.rcpt_unknown() is False
    for _ in range(10):
        assert screen.rcpt_unknown() is False
    assert len(h.notifier.blocks) == 1


# Per-session limits: unknown recipients and RSET


def test_failed_rcpts(tmp: Path) -> None:
    """N-1 unknown recipients are fine; the Nth blocks and closes; RSET does not reset it."""
    h = Harness(tmp, max_failed_rcpts=3, max_rsets=0)
    screen = h.open()
    assert screen.rcpt_unknown() is False
    assert screen.rset() is False
    assert screen.rcpt_unknown() is False
    assert not h.service.admin.blocks()
    assert screen.rcpt_unknown() is True
    assert h.service.admin.blocks()[0][2] == "failed_rcpts: 3/3 in one session (smtp)"
    screen.closed()
    assert h.blocked()


def test_failed_rcpts_per_connection(tmp: Path) -> None:
    """Unknown recipients in separate connections do not add up."""
    h = Harness(tmp, max_failed_rcpts=3)
    for _ in range(5):
        screen = h.open()
        screen.rcpt_unknown()
        screen.rcpt_unknown()
        screen.closed()
    assert not h.blocked()


def test_rsets(tmp: Path) -> None:
    """N-1 RSETs are fine; the Nth blocks; after expiry the client is served again."""
    h = Harness(tmp, max_rsets=4, block_minutes=30)
    screen = h.open()
    assert [screen.rset() for _ in range(3)] == [False] * 3
    assert screen.rset() is True
    screen.closed()
    assert h.blocked()
    h.clock.advance(1800)
    assert h.connect() is None


def test_zero_disables_a_rule(tmp: Path) -> None:
    """A limit of 0 switches its rule off."""
    h = Harness(tmp, max_connections=0, max_rsets=0, max_failed_rcpts=0,
                max_auth_failures=0, max_simultaneous=0)
    screens = [h.open() for _ in range(500)]
    for screen in screens[:50]:
        screen.rset()
        screen.rcpt_unknown()
        screen.auth_failed("a@b", os.urandom(8))
    assert h.service.admin.blocks() == []


# Authenticated sessions


def test_exempt_authenticated(tmp: Path) -> None:
    """After a successful AUTH nothing in that session can block the IP."""
    h = Harness(tmp, max_rsets=2, max_failed_rcpts=2, max_auth_failures=2,
                session_auth=SessionAuthConfig(max_failures=0))
    screen = h.open()
    screen.auth_succeeded("alice@example.com")
    for _ in range(10):
        assert screen.rset() is False
        assert screen.rcpt_unknown() is False
        assert screen.auth_failed("x@y", os.urandom(4)) is False
    assert h.service.admin.blocks() == []


def test_not_exempt_when_configured(tmp: Path) -> None:
    """With exempt_authenticated = false, authenticated sessions count like others."""
    h = Harness(tmp, max_rsets=2, exempt_authenticated=False)
    screen = h.open()
    screen.auth_succeeded("alice@example.com")
    screen.rset()
    assert screen.rset() is True


# Repeat offenders


def offend(h: Harness) -> float:
    """Trigger a block by RSETs and return its length in minutes."""
    screen = h.open()
    while not h.service.admin.blocks():
        screen.rset()
    screen.closed()
    [(_, expires, _)] = h.service.admin.blocks()
    return (expires - h.clock.seconds()) / 60


def test_repeat_offender_escalation_and_cap(tmp: Path) -> None:
    """Each repeat within the memory doubles the block, up to max_block_minutes."""
    h = Harness(tmp, max_rsets=1, block_minutes=30, repeat_multiplier=2,
                max_block_minutes=200, repeat_memory_hours=24)
    lengths = []
    for _ in range(5):
        lengths.append(offend(h))
        h.clock.advance(lengths[-1] * 60)
    assert lengths == [30, 60, 120, 200, 200]
    assert [b["offence"] for b in h.notifier.blocks] == [1, 2, 3, 4, 5]


def test_repeat_memory_forgets(tmp: Path) -> None:
    """An offence after the repeat memory has passed starts at block_minutes again."""
    h = Harness(tmp, max_rsets=1, block_minutes=30, repeat_memory_hours=1)
    assert offend(h) == 30
    h.clock.advance(30 * 60 + 3599)
    assert offend(h) == 60
    h.clock.advance(60 * 60 + 3600)
    assert offend(h) == 30


def test_unblock_forgives(tmp: Path) -> None:
    """An administrator's unblock also forgets the offence history."""
    h = Harness(tmp, max_rsets=1, block_minutes=30)
    offend(h)
    assert h.service.admin.unblock(IP)
    assert h.connect() is None
    assert offend(h) == 30


# White list


def test_whitelist_never_counted(tmp: Path) -> None:
    """A white-listed client is never counted or blocked."""
    h = Harness(tmp, whitelist=("192.0.2.0/24",), max_connections=2, max_rsets=1,
                max_simultaneous=1, max_auth_failures=1)
    screens = [h.open() for _ in range(50)]
    assert all(s.refusal is None for s in screens)
    for s in screens:
        assert s.rset() is False and s.auth_failed("a@b", b"x") is False
    assert h.service.admin.blocks() == []
    assert h.service.admin.stats()["tracked"] == 0


def test_whitelist_wins_over_blocklist(tmp: Path) -> None:
    """A white-listed address is served even while it is on the block list."""
    h = Harness(tmp, whitelist=("192.168.*.*",))
    h.service.admin.block("192.168.1.0/24", None, "typo by admin")
    h.service.admin.block(IP, None, "")
    assert h.connect("192.168.1.5") is None
    assert h.connect(IP) is not None


def test_runtime_whitelist_persists(tmp: Path) -> None:
    """whitelist_add is kept in whitelist.txt and survives a restart; remove works."""
    h = Harness(tmp, max_connections=1)
    h.service.admin.whitelist_add("192.0.2.0/28", "monitoring")
    assert "192.0.2.0/28" in (tmp / "whitelist.txt").read_text()
    assert [h.connect() for _ in range(5)] == [None] * 5
    h2 = h.restart(max_connections=1, whitelist=("10.0.0.1",))
    assert h2.service.admin.whitelist_list() == [("10.0.0.1", "config"), ("192.0.2.0/28", "runtime")]
    assert h2.connect() is None and h2.connect() is None
    assert h2.service.admin.whitelist_remove("192.0.2.0/28")
    assert not h2.service.admin.whitelist_remove("192.0.2.0/28")
    h2.connect()
    assert h2.blocked()


def test_whitelist_hand_edit(tmp: Path) -> None:
    """A line added to whitelist.txt by hand takes effect within a second."""
    h = Harness(tmp, max_connections=1)
    (tmp / "whitelist.txt").write_text("192.0.2.*  # lab\n")
    h.clock.advance(1)
    assert [h.connect() for _ in range(3)] == [None] * 3


def test_unix_socket_never_screened(tmp: Path) -> None:
    """A peer that is not an IP address (a UNIX socket) is never screened."""
    h = Harness(tmp, max_connections=1)
    assert [h.connect("") for _ in range(5)] == [None] * 5


# IPv6


def test_ipv6_aggregated_by_prefix(tmp: Path) -> None:
    """Addresses in one /64 share counters and a block; another /64 does not."""
    h = Harness(tmp, max_connections=3)
    for i in range(3):
        assert h.connect(f"2001:db8:1:2::{i + 1:x}") is None
    refusal = h.connect("2001:db8:1:2:ffff::9")
    assert refusal is not None and refusal.startswith("2001:db8:1:2::/64 blocked")
    assert h.blocked("2001:db8:1:2::abcd")
    assert not h.blocked("2001:db8:1:3::1")
    assert h.service.admin.blocks()[0][0] == "2001:db8:1:2::/64"


def test_ipv4_mapped_is_ipv4(tmp: Path) -> None:
    """An IPv4-mapped IPv6 peer counts and is blocked as its IPv4 address."""
    h = Harness(tmp, max_connections=2)
    h.connect("::ffff:192.0.2.7")
    h.connect("192.0.2.7")
    assert h.connect("::ffff:192.0.2.7") is not None
    assert h.service.admin.blocks()[0][0] == "192.0.2.7"
    assert h.blocked("192.0.2.7")


# Files: hand edits, restarts, disabled


def test_hand_edit_plus_minutes(tmp: Path) -> None:
    """+MINUTES added by hand is picked up by the periodic check and made absolute."""
    h = Harness(tmp)
    assert h.connect() is None
    with open(tmp / "blocklist.txt", "a") as f:
        f.write(f"{IP}  +10  # by hand\n")
    h.clock.advance(1)
    assert h.blocked()
    text = (tmp / "blocklist.txt").read_text()
    assert "+10" not in text and format_expiry(START + 1 + 600) in text
    h.clock.advance(599)
    assert h.blocked()
    h.clock.advance(1)
    assert h.connect() is None
    h.clock.advance(1)
    assert IP not in (tmp / "blocklist.txt").read_text()  # lapsed entries are tidied


def test_hand_removal_unblocks(tmp: Path) -> None:
    """Deleting a line by hand lifts that block within a second."""
    h = Harness(tmp, max_connections=1)
    h.connect()
    assert h.blocked()
    h.clock.advance(1)
    (tmp / "blocklist.txt").write_text("# emptied by hand\n")
    h.clock.advance(1)
    assert h.connect() is None


def test_restart_keeps_expiries(tmp: Path) -> None:
    """A new service on the same files refuses the same clients until the same second."""
    h = Harness(tmp, max_auth_failures=1)
    h.open().auth_failed("a@b", b"x")
    h.service.admin.block("2001:db8::/48", 60, "spam run")
    before = h.service.admin.blocks()
    h.clock.advance(100)
    h2 = h.restart()
    assert h2.service.admin.blocks() == before
    assert h2.blocked(IP) and h2.blocked("2001:db8:0:5::1")
    h2.clock.advance(before[0][1] - h2.clock.seconds())
    assert h2.connect() is None


def test_automatic_blocks_written_within_a_second(tmp: Path) -> None:
    """Automatic blocks reach the file by the next periodic check."""
    h = Harness(tmp, max_connections=1)
    h.connect()
    h.connect()
    h.clock.advance(1)
    assert IP in (tmp / "blocklist.txt").read_text()


def test_unstarted_service_writes_at_once(tmp: Path) -> None:
    """Without the periodic check a block is written immediately."""
    h = Harness(tmp, start=False, max_connections=1)
    h.connect()
    h.connect()
    assert IP in (tmp / "blocklist.txt").read_text()


def test_disabled_leaves_everything_alone(tmp: Path) -> None:
    """enabled = false: nothing counted or enforced, the block file untouched."""
    path = tmp / "blocklist.txt"
    path.write_text(f"{IP}  +30  # hand\n")
    stat = os.stat(path)
    h = Harness(tmp, enabled=False, max_connections=1, max_rsets=1)
    for _ in range(20):
        screen = h.open()
        assert screen.refusal is None
        assert screen.rset() is False
        assert screen.auth_failed("a@b", b"c") is False
        screen.closed()
    h.clock.advance(3600)
    h.service.stop()
    assert path.read_text() == f"{IP}  +30  # hand\n"
    assert os.stat(path).st_mtime_ns == stat.st_mtime_ns
    assert h.clock.getDelayedCalls() == []
    assert h.service.admin.stats()["tracked"] == 0


# Bounded state


def test_eviction_cap(tmp: Path) -> None:
    """No more than max_tracked_clients are tracked; the idlest go first."""
    h = Harness(tmp, max_tracked_clients=100)
    for i in range(1000):
        h.connect(f"10.0.{i // 256}.{i % 256}")
        h.clock.advance(0.01)
    stats = h.service.admin.stats()
    assert stats["tracked"] <= 100
    assert stats["evicted"] >= 900
    assert h.service.rules.counts("10.0.3.231") is not None
    assert h.service.rules.counts("10.0.0.0") is None
    assert any("action=evict" in line for line in h.lines)


def test_idle_clients_pruned(tmp: Path) -> None:
    """Idle counters are dropped by the periodic prune once every window has passed."""
    h = Harness(tmp, max_auth_failures=5)
    for i in range(50):
        h.open(f"10.0.0.{i}").auth_failed("a@b", b"x")
    assert h.service.admin.stats()["tracked"] == 50
    h.clock.pump([1] * 60)
    assert h.service.admin.stats()["tracked"] == 50
    h.clock.pump([1] * (15 * 60))
    assert h.service.admin.stats()["tracked"] == 0


def test_recent_clients_survive_prune(tmp: Path) -> None:
    """Pruning keeps clients still inside a window."""
    h = Harness(tmp, max_connections=2)
    h.clock.advance(100)
    h.connect()
    h.clock.pump([1] * 200)
    h.connect()
    assert h.blocked()


# Per-session authentication limit and freezing


def test_session_auth_closes(tmp: Path) -> None:
    """The session_auth limit closes the session without blocking the IP."""
    h = Harness(tmp, max_auth_failures=100,
                session_auth=SessionAuthConfig(max_failures=3))
    screen = h.open(protocol="imap")
    assert screen.auth_failed("bob@example.com", b"1") is False
    assert screen.auth_failed("bob@example.com", b"2") is False
    assert screen.auth_failed("bob@example.com", b"3") is True
    assert h.service.admin.blocks() == []
    assert not h.freeze_store.is_frozen("bob@example.com")
    assert h.notifier.freezes == []
    assert any("action=close client=192.0.2.7 rule=session_auth count=3/3" in line
               for line in h.lines)


def test_session_auth_freezes_and_notifies(tmp: Path) -> None:
    """With freeze_account and notify_postmaster the tried account is frozen and reported."""
    h = Harness(tmp, freeze=FreezeConfig(minutes=60), session_auth=SessionAuthConfig(
        max_failures=2, freeze_account=True, notify_postmaster=True))
    screen = h.open(protocol="pop3")
    screen.auth_failed("bob@example.com", b"1")
    assert screen.auth_failed("bob@example.com", b"2") is True
    assert h.freeze_store.is_frozen("bob@example.com")
    assert h.freeze_store.entries()[0].expires == START + 3600
    assert h.notifier.freezes == [dict(username="bob@example.com", address=IP,
                                       frozen=True, failures=2)]
    assert h.service.admin.thaw("bob@example.com")
    assert not h.freeze_store.is_frozen("bob@example.com")


def test_session_auth_protocols(tmp: Path) -> None:
    """Protocols not listed are not subject to the session limit."""
    h = Harness(tmp, session_auth=SessionAuthConfig(max_failures=2, protocols=("imap",)))
    screen = h.open(protocol="smtp")
    assert [screen.auth_failed("a@b", str(i).encode()) for i in range(4)] == [False] * 4


def test_session_auth_unknown_accounts_not_frozen(tmp: Path) -> None:
    """With known_account given, guesses at nonexistent accounts are not frozen."""
    h = Harness(tmp, known=lambda user: user == "bob@example.com",
                session_auth=SessionAuthConfig(max_failures=1, freeze_account=True))
    h.open().auth_failed("nobody@example.com", b"x")
    h.open("192.0.2.9").auth_failed("bob@example.com", b"x")
    assert [e.name for e in h.freeze_store.entries()] == ["bob@example.com"]


# Administration


def test_admin_block_unblock(tmp: Path) -> None:
    """block/unblock/blocks act at once and are written at once."""
    h = Harness(tmp)
    entry = h.service.admin.block("198.51.100.0/24", 15, "spam run")
    assert entry.reason == "manual: spam run"
    assert h.blocked("198.51.100.77")
    assert "198.51.100.0/24" in (tmp / "blocklist.txt").read_text()
    assert h.service.admin.blocks() == [("198.51.100.0/24", START + 900, "manual: spam run")]
    refusal = h.connect("198.51.100.77")
    assert refusal == f"198.51.100.77 blocked until {format_expiry(START + 900)} (manual)"
    assert h.service.admin.unblock("198.51.100.77")
    assert not h.blocked("198.51.100.77")
    assert not h.service.admin.unblock("198.51.100.77")
    forever = h.service.admin.block(IP, None, "")
    assert forever.expires is None
    assert h.connect() == f"{IP} blocked until removed (manual)"


def test_thousand_blocks_few_mails(tmp: Path) -> None:
    """1000 clients blocked in a storm reach the postmaster as a handful of mails."""
    clock = Clock()
    clock.advance(START)
    sent: list[bytes] = []
    quiet = Logger(observer=lambda e: None)
    notifier = PostmasterNotifier(clock, sent.append, "mx.example.com",
                                  "postmaster@example.com", log=quiet)
    service = ScreeningService(
        ScreeningConfig(max_auth_failures=1), clock,
        BlockList(str(tmp / "blocklist.txt"), clock, quiet), None, notifier, log=quiet)
    service.start()
    for i in range(1000):
        service.open(f"10.1.{i // 256}.{i % 256}", "smtp").auth_failed("a@b", b"x")
        clock.advance(0.1)
    clock.pump([1] * 700)
    assert len(service.admin.blocks()) == 1000
    assert len(sent) == 6
    text = (tmp / "blocklist.txt").read_text()
    assert text.count("auth_failures: 1/1") == 1000


def test_refusal_logged(tmp: Path) -> None:
    """A refused connection is one structured log line naming the entry and rule."""
    h = Harness(tmp)
    h.service.admin.block("192.0.2.0/24", 10, "x")
    h.connect(IP, "pop3")
    assert any(line.startswith("screening: action=refuse client=192.0.2.7 rule=manual "
                               "blocked=192.0.2.0/24 until=") and "protocol=pop3" in line
               for line in h.lines)


def test_auth_failure_window_boundary_exact(tmp: Path) -> None:
    """A failure exactly auth_failure_window_minutes old has left the window; a moment younger has not."""
    h = Harness(tmp / "a", max_auth_failures=2, auth_failure_window_minutes=15)
    fail_auth(h, 1)
    h.clock.advance(15 * 60)
    assert fail_auth(h, 1) == [False]
    assert not h.blocked()
    os.makedirs(tmp / "b")
    h = Harness(tmp / "b", max_auth_failures=2, auth_failure_window_minutes=15)
    fail_auth(h, 1)
    h.clock.advance(15 * 60 - 0.001)
    assert fail_auth(h, 1) == [True]


def decision_lines(h: Harness, action: str) -> list[str]:
    return [line for line in h.lines if f"action={action} " in line or line.endswith(f"action={action}")]


def test_one_log_line_per_decision(tmp: Path) -> None:
    """Each screening decision is exactly one structured line naming who, rule, counts, action."""
    h = Harness(tmp, max_connections=2, block_minutes=10, freeze=FreezeConfig(minutes=60),
                session_auth=SessionAuthConfig(max_failures=2, freeze_account=True))
    h.connect()
    h.connect()
    h.connect()  # the third blocks
    [block] = decision_lines(h, "block")
    assert block.startswith("screening: action=block client=192.0.2.7 rule=connections "
                            "count=3/2 window=5m minutes=10 offence=1 protocol=smtp until=")
    h.connect()
    [refuse] = decision_lines(h, "refuse")
    assert refuse.startswith("screening: action=refuse client=192.0.2.7 rule=connections "
                             "blocked=192.0.2.7 until=")
    screen = h.open("192.0.2.8", "imap")
    screen.auth_failed("bob@example.com", b"same")
    screen.auth_failed("bob@example.com", b"same")  # the same pair: ignored, and the session limit
    [ignore] = decision_lines(h, "ignore")
    assert "client=192.0.2.8 rule=auth_failures count=1/10" in ignore
    [freeze] = decision_lines(h, "freeze")
    assert freeze.startswith("screening: action=freeze client=192.0.2.8 rule=session_auth "
                             "count=2/2 protocol=imap account=bob@example.com until=")
    h.service.admin.unblock(IP)
    [unblock] = decision_lines(h, "unblock")
    assert unblock == "screening: action=unblock client=192.0.2.7 rule=connections"
    h.service.admin.whitelist_add("198.51.100.0/24", "lab")
    h.service.admin.whitelist_remove("198.51.100.0/24")
    assert len(decision_lines(h, "whitelist-add")) == 1
    assert len(decision_lines(h, "whitelist-remove")) == 1
    h.service.admin.block("203.0.113.9", 1, "by hand")
    h.clock.advance(61)
    [expire] = decision_lines(h, "expire")
    assert expire.startswith("screening: action=expire client=203.0.113.9 reason=manual")
    h.service.admin.thaw("bob@example.com")
    assert len(decision_lines(h, "thaw")) == 1
    actions = [line.split()[1] for line in h.lines if line.startswith("screening: action=")]
    assert len(actions) == 10, h.lines


def test_blocking_costs_the_same_with_a_long_list(tmp: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """
    Adding, finding and lifting one block does a constant amount of work
    however many blocks exist (no index rebuild per block).
    """
    from twisted_mail_screen.screening import blocklist as blocklist_module

    h = Harness(tmp, max_connections=1)
    for i in range(5000):
        h.service.state.blocklist.add(f"10.{i // 65536}.{i // 256 % 256}.{i % 256}",
                                       START + 3600, "manual")
    calls = []
    real = blocklist_module.parse_network
    monkeypatch.setattr(blocklist_module, "parse_network",
                        lambda *a, **k: calls.append(a) or real(*a, **k))
    h.connect()
    assert h.blocked()  # an automatic block: the 5001st entry
    assert h.blocked("10.0.19.135")
    assert h.service.admin.unblock(IP)
    assert not h.blocked("192.0.2.7")
    assert len(calls) <= 6, len(calls)


def test_expiry_scan_follows_new_earlier_entries(tmp: Path) -> None:
    """An entry added with an earlier expiry than all others still lapses on time."""
    clock = Clock()
    clock.advance(START)
    blocks = BlockList(str(tmp / "blocklist.txt"), clock)
    blocks.add("192.0.2.1", START + 100, "manual")
    assert blocks.expire() == []
    blocks.add("192.0.2.2", START + 30, "manual")
    clock.advance(30)
    assert [e.name for e in blocks.expire()] == ["192.0.2.2"]
    assert blocks.lookup("192.0.2.2") is None and blocks.lookup("192.0.2.1") is not None
    clock.advance(70)
    assert [e.name for e in blocks.expire()] == ["192.0.2.1"]
    assert blocks.lookup("192.0.2.1") is None
