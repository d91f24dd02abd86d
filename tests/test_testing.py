"""
Tests for the in-memory twins of L{twisted_mail_screen.testing}: each
behaves as the seam it stands in for, as protocol code sees it.
"""

from __future__ import annotations

from pathlib import Path

from twisted.internet import reactor
from twisted.internet.address import IPv4Address
from twisted.internet.error import ConnectionDone
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure

from twisted_mail_screen.config.settings import load_config
from twisted_mail_screen.runtime.service import MailService, build_service
from twisted_mail_screen.testing import (
    FakeScreening, InlineWorkers, RecordingNotifier, ephemeral_overrides)


def test_inline_workers_run_at_once() -> None:
    """The result, or the exception, is in the Deferred before C{run} returns."""
    workers = InlineWorkers()
    got: list[object] = []
    workers.run(lambda a, b=0: a + b, 1, b=2).addCallback(got.append)
    workers.run(int, "not a number").addErrback(lambda f: got.append(f.type))
    assert got == [3, ValueError]
    assert workers.calls == 2


def service_with(tmp_path: Path, screening: FakeScreening) -> MailService:
    config = load_config(None, ephemeral_overrides(str(tmp_path / "data"), ("smtp",)))
    service = build_service(config, reactor, Clock(), workers=InlineWorkers())
    next(l.factory for l in service.listeners if l.kind == "smtp").screening = screening
    return service


def session(service: MailService, lines: bytes) -> tuple[object, StringTransport]:
    addr = IPv4Address("TCP", "192.0.2.7", 40000)
    proto = next(l.factory for l in service.listeners if l.kind == "smtp").buildProtocol(addr)
    transport = StringTransport(peerAddress=addr)
    proto.makeConnection(transport)
    if lines and not transport.disconnecting:
        proto.dataReceived(lines)
    proto.connectionLost(Failure(ConnectionDone()))
    return proto, transport


def test_fake_screening_refuses_on_demand(tmp_path: Path) -> None:
    """A refusal set on the fake is what SMTP answers with; the close is recorded."""
    screening = FakeScreening(refusal="too many connections")
    _, transport = session(service_with(tmp_path, screening), b"")
    assert transport.value().startswith(b"421 4.7.0 ")
    assert b"too many connections" in transport.value()
    (screen,) = screening.screens
    assert (screen.host, screen.protocol) == ("192.0.2.7", "smtp")
    assert screen.events == [("closed", "")]


def test_fake_screen_records_events_and_closes_on_demand(tmp_path: Path) -> None:
    """Events are recorded in order; one named in C{close_on} ends the session."""
    screening = FakeScreening(close_on=frozenset({"rset"}))
    _, transport = session(service_with(tmp_path, screening), b"EHLO c\r\nRSET\r\nNOOP\r\n")
    (screen,) = screening.screens
    assert screen.events == [("rset", ""), ("closed", "")]
    assert not transport.value().endswith(b"250 2.0.0 Ok\r\n")  # no NOOP reply after the close


def test_recording_notifier_records_instead_of_mailing() -> None:
    notifier = RecordingNotifier()
    notifier.notify_block("192.0.2.7", "connections", 10, 10, 1, "smtp", 60.0, 1)
    notifier.notify_freeze("bob@example.com", "192.0.2.7", "imap", 5, 5, True, None)
    notifier.flush()
    assert [(b["address"], b["rule"]) for b in notifier.blocks] == [("192.0.2.7", "connections")]
    assert notifier.freezes == [dict(username="bob@example.com", address="192.0.2.7",
                                     frozen=True, failures=5)]
    assert notifier.flushes == 1
