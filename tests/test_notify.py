"""
Tests for L{twisted_mail_screen.screening.notify}: the postmaster notices and their
own rate limit.
"""

from __future__ import annotations

import email
from email import policy
from email.message import EmailMessage

from twisted.internet.defer import Deferred, fail
from twisted.internet.task import Clock
from twisted.logger import Logger, formatEvent

from twisted_mail_screen.screening.blocklist import BlockList
from twisted_mail_screen.screening.config import ScreeningConfig
from twisted_mail_screen.screening.notify import PostmasterNotifier
from twisted_mail_screen.screening.service import ScreeningService

START = 1_800_000_000.0


def make(max_messages: int = 5, period: float = 600.0, deliver=None):  # type: ignore[no-untyped-def]
    clock = Clock()
    clock.advance(START)
    sent: list[bytes] = []
    logged: list[str] = []
    notifier = PostmasterNotifier(
        clock, deliver or (lambda data: sent.append(data)), "mx.example.com",
        "postmaster@example.com", max_messages=max_messages, period_seconds=period,
        log=Logger(observer=lambda e: logged.append(formatEvent(e))))
    return notifier, clock, sent, logged


def parse(data: bytes) -> EmailMessage:
    return email.message_from_bytes(data, policy=policy.default)  # type: ignore[return-value]


def block(notifier: PostmasterNotifier, address: str = "192.0.2.7") -> None:
    notifier.notify_block(address, "auth_failures", 10, 10, 15, "imap", START + 1800, 30,
                          [(START - 5, "imap", "auth failed user=bob@example.com"),
                           (START, "imap", "auth failed user=eve@example.com")])


def test_block_notice_content() -> None:
    """A block notice is a proper message naming address, rule, counts, expiry, events, command."""
    notifier, _, sent, _ = make()
    block(notifier)
    [data] = sent
    assert b"\r\n" not in data
    msg = parse(data)
    assert msg["From"] == "MAILER-DAEMON@mx.example.com"
    assert msg["To"] == "postmaster@example.com"
    assert msg["Auto-Submitted"] == "auto-generated"
    assert msg["Message-ID"].endswith("@mx.example.com>")
    assert msg["Date"] == "Fri, 15 Jan 2027 08:00:00 +0000"
    assert "192.0.2.7" in msg["Subject"] and "auth_failures" in msg["Subject"]
    body = msg.get_content()
    assert "auth_failures: 10 (limit 10) within 15 minutes" in body
    assert "imap" in body
    assert "2027-01-15T08:30:00Z" in body
    assert "auth failed user=eve@example.com" in body
    assert "mailscreen block remove 192.0.2.7" in body


def test_freeze_notice_content() -> None:
    """A freeze notice names the account, the client and the thaw command."""
    notifier, _, sent, _ = make()
    notifier.notify_freeze("bob@example.com", "192.0.2.7", "pop3", 5, 5, True, None)
    msg = parse(sent[0])
    assert "bob@example.com" in msg["Subject"]
    body = msg.get_content()
    assert "mailscreen frozen thaw bob@example.com" in body
    assert "frozen until thawed" in body and "192.0.2.7" in body


def test_not_frozen_notice() -> None:
    """With freezing off the notice says so and offers no thaw command."""
    notifier, _, sent, _ = make()
    notifier.notify_freeze("bob@example.com", "192.0.2.7", "imap", 5, 5, False, None)
    body = parse(sent[0]).get_content()
    assert "not frozen" in body and "thaw" not in body


def test_rate_limit_then_digest() -> None:
    """Beyond five in a period, notices wait for one digest at the period's end."""
    notifier, clock, sent, _ = make()
    for i in range(8):
        block(notifier, f"192.0.2.{i}")
    assert len(sent) == 5
    clock.advance(599)
    assert len(sent) == 5
    clock.advance(1)
    assert len(sent) == 6
    digest = parse(sent[-1])
    assert "digest: 3" in digest["Subject"]
    body = digest.get_content()
    for i in (5, 6, 7):
        assert f"mailscreen block remove 192.0.2.{i}" in body


def test_quiet_period_resets() -> None:
    """After a period without overflow, single notices flow again."""
    notifier, clock, sent, _ = make()
    block(notifier)
    clock.advance(600)
    clock.advance(600)
    for i in range(5):
        block(notifier, f"192.0.2.{i}")
    assert len(sent) == 6


def test_thousand_blocks_handful_of_mails() -> None:
    """A storm of 1000 blocks in ten minutes gives five notices and one digest."""
    notifier, clock, sent, _ = make()
    for i in range(1000):
        block(notifier, f"10.0.{i // 256}.{i % 256}")
        clock.advance(0.5)
    clock.advance(600)
    assert len(sent) == 6
    digest = parse(sent[-1])
    assert "digest: 995" in digest["Subject"]
    assert "and 495 more" in digest.get_content()
    # The storm goes on for another hour: one digest per period, no singles.
    for i in range(3600):
        block(notifier, f"10.1.{i // 256}.{i % 256}")
        clock.advance(1)
    clock.advance(1200)
    assert len(sent) == 6 + 6
    assert all("digest" in parse(m)["Subject"] for m in sent[6:])


def test_flush_sends_pending() -> None:
    """flush() at shutdown sends what is waiting and cancels the timer."""
    notifier, clock, sent, _ = make(max_messages=1)
    block(notifier)
    block(notifier, "192.0.2.99")
    notifier.flush()
    assert len(sent) == 2 and "digest" in parse(sent[1])["Subject"]
    assert clock.getDelayedCalls() == []


def test_service_stop_flushes_notices() -> None:
    """Stopping the screening service sends the notices its notifier still holds."""
    notifier, clock, sent, _ = make(max_messages=1)
    quiet = Logger(observer=lambda e: None)
    service = ScreeningService(ScreeningConfig(max_auth_failures=1), clock,
                               BlockList(None, clock, quiet), None, notifier, log=quiet)
    service.start()
    service.open("192.0.2.7", "imap").auth_failed("bob@example.com", b"x")
    service.open("192.0.2.8", "imap").auth_failed("bob@example.com", b"x")
    assert len(sent) == 1
    service.stop()
    assert len(sent) == 2 and "digest" in parse(sent[1])["Subject"]


def test_delivery_failures_are_logged() -> None:
    """A failing deliver (raising, or a failed Deferred) is logged, never raised."""
    def broken(data: bytes) -> None:
        raise OSError("disk full")

    notifier, _, _, logged = make(deliver=broken)
    block(notifier)
    assert any("could not deliver" in line for line in logged)

    notifier, _, _, logged = make(deliver=lambda data: fail(OSError("gone")))
    block(notifier)
    assert any("could not deliver" in line for line in logged)

    waiting: Deferred[None] = Deferred()
    notifier, _, _, _ = make(deliver=lambda data: waiting)
    block(notifier)
    waiting.callback(None)
