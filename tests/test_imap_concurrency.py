"""Several sessions, SMTP and POP3 on one folder: updates at the points RFC 3501 allows."""

from __future__ import annotations

import os
import smtplib
import time

import pytest
from twisted.internet.task import Clock

from tests.test_imap import Raw

KINDS = ("smtp", "pop3", "imap")
USER = b"bob@localhost"


def send(server, subject: str = "s") -> None:
    s = smtplib.SMTP("127.0.0.1", server.port("smtp"))
    s.sendmail("a@example.org", [USER.decode()], f"Subject: {subject}\r\n\r\nbody\r\n".encode())
    s.quit()


def session(server) -> Raw:
    r = Raw(server.port("imap"))
    assert r.command(b"l", b"LOGIN bob@localhost x")[-1].startswith(b"l OK")
    assert r.command(b"s", b"SELECT INBOX")[-1].startswith(b"s OK")
    return r


def read_until(r: Raw, needle: bytes, timeout: float) -> list[bytes]:
    """Lines until one contains C{needle} (a short real wait on the socket)."""
    r.sock.settimeout(timeout)
    lines = []
    try:
        while True:
            line = r.line()
            lines.append(line)
            if needle in line:
                return lines
    finally:
        r.sock.settimeout(10)


@pytest.fixture
def server(start_server):
    return start_server(kinds=KINDS)


def test_two_sessions_see_each_others_store_and_expunge(server):
    for i in range(3):
        send(server, f"m{i}")
    a, b = session(server), session(server)
    a.command(b"a1", b"STORE 2 +FLAGS (\\Flagged)")
    lines = b.command(b"b1", b"NOOP")
    assert b"* 2 FETCH (UID 2 FLAGS (\\Flagged))" in lines
    a.command(b"a2", b"STORE 1 +FLAGS.SILENT (\\Deleted)")
    a.command(b"a3", b"EXPUNGE")
    # no EXPUNGE while answering FETCH, STORE or SEARCH; the message still has its number
    lines = b.command(b"b2", b"FETCH 1:* (UID)")
    assert not any(b"EXPUNGE" in l for l in lines)
    assert b"* 2 FETCH (UID 2)" in lines and b"* 3 FETCH (UID 3)" in lines
    lines = b.command(b"b3", b"SEARCH ALL")
    assert not any(b"EXPUNGE" in l for l in lines) and b"* SEARCH 2 3" in lines
    lines = b.command(b"b4", b"STORE 3 +FLAGS (\\Seen)")
    assert not any(b"EXPUNGE" in l for l in lines)
    assert b"* 3 FETCH (FLAGS (\\Seen))" in lines
    # UID commands and NOOP may carry it
    lines = b.command(b"b5", b"UID FETCH 3 (FLAGS)")
    assert lines[:2] == [b"* 3 FETCH (UID 3 FLAGS (\\Seen))", b"* 1 EXPUNGE"]
    lines = b.command(b"b6", b"FETCH 2 (UID)")
    assert lines[0] == b"* 2 FETCH (UID 3)"
    a.close()
    b.close()


def test_expunge_pending_then_delivered_on_noop(server):
    for i in range(2):
        send(server, f"m{i}")
    a, b = session(server), session(server)
    a.command(b"a1", b"STORE 1 +FLAGS.SILENT (\\Deleted)")
    a.command(b"a2", b"EXPUNGE")
    send(server, "m2")
    a.command(b"a3", b"NOOP")
    lines = b.command(b"b1", b"FETCH 1 (UID)")  # EXISTS may come, EXPUNGE may not
    assert not any(b"EXPUNGE" in l for l in lines)
    lines = b.command(b"b2", b"NOOP")
    assert b"* 1 EXPUNGE" in lines
    lines = b.command(b"b3", b"FETCH 1:* (UID)")
    assert b"* 1 FETCH (UID 2)" in lines and b"* 2 FETCH (UID 3)" in lines
    a.close()
    b.close()


def test_idle_sees_smtp_delivery_within_a_second(server):
    a = session(server)
    a.send(b"i1 IDLE\r\n")
    assert a.line().startswith(b"+")
    started = time.monotonic()
    send(server, "while idle")
    lines = read_until(a, b"EXISTS", timeout=3)
    assert lines[-1] == b"* 1 EXISTS"
    assert time.monotonic() - started < 2.0
    a.send(b"DONE\r\n")
    assert a.until(b"i1")[-1].startswith(b"i1 OK")
    a.close()


def test_idle_poll_runs_on_the_injected_clock(start_server, tmp_path):
    clock = Clock()
    server = start_server(kinds=KINDS, clock=clock)
    a = session(server)
    b = session(server)
    a.send(b"i1 IDLE\r\n")
    assert a.line().startswith(b"+")
    # a file written by another program, and a flag change by another session
    new = tmp_path / "data/mail/localhost/bob/new"
    (new / "1700000000.byhand.host").write_bytes(b"Subject: hand\n\nx\n")
    server.advance(1.0)
    lines = read_until(a, b"EXISTS", timeout=5)
    assert lines[-1] == b"* 1 EXISTS"
    b.command(b"b0", b"NOOP")
    b.command(b"b1", b"STORE 1 +FLAGS.SILENT (\\Answered)")
    lines = read_until(a, b"FETCH", timeout=5)
    assert b"\\Answered" in lines[-1]
    b.command(b"b2", b"STORE 1 +FLAGS.SILENT (\\Deleted)")
    b.command(b"b3", b"EXPUNGE")
    lines = read_until(a, b"EXPUNGE", timeout=5)
    assert lines[-1] == b"* 1 EXPUNGE"
    a.send(b"DONE\r\n")
    assert a.until(b"i1")[-1].startswith(b"i1 OK")
    a.close()
    b.close()


def test_idle_timeout_on_injected_clock(start_server):
    clock = Clock()
    server = start_server(kinds=KINDS, clock=clock, imap__idle_timeout=60)
    a = session(server)
    server.advance(59)
    assert a.command(b"n", b"NOOP")[-1].startswith(b"n OK")
    server.advance(61)
    assert b"BYE" in a.line()
    a.sock.settimeout(5)
    assert a.sock.recv(100) == b""


def test_message_vanishing_under_a_session(server, tmp_path):
    for i in range(2):
        send(server, f"m{i}")
    a = session(server)
    cur = tmp_path / "data/mail/localhost/bob/cur"
    for name in os.listdir(cur):
        os.unlink(cur / name)
    lines = a.command(b"f", b"FETCH 1:* (BODY.PEEK[] FLAGS)")
    assert lines[-1].startswith(b"f OK")
    lines = a.command(b"x", b"SEARCH TEXT body")
    assert lines[-1].startswith(b"x OK")
    lines = a.command(b"c", b"COPY 1:2 Archive")
    assert lines[-1].startswith(b"c OK")
    lines = a.command(b"n", b"NOOP")
    assert b"* 2 EXPUNGE" in lines and b"* 1 EXPUNGE" in lines
    a.close()


def test_concurrent_appends_and_deliveries_lose_nothing(server):
    a, b = session(server), session(server)
    for i in range(10):
        a.send(b"a%d APPEND INBOX {19+}\r\nSubject: a\r\n\r\nbody\r\n" % i)
        b.send(b"b%d APPEND INBOX {19+}\r\nSubject: b\r\n\r\nbody\r\n" % i)
        send(server, f"smtp{i}")
    a.until(b"a9")
    b.until(b"b9")
    lines = a.command(b"n", b"NOOP")
    lines = a.command(b"u", b"UID SEARCH ALL")
    uids = [int(x) for x in lines[-2].split()[2:]]
    assert uids == list(range(1, 31))
    a.close()
    b.close()


def test_session_drop_mid_fetch_does_not_hurt_others(server):
    for i in range(5):
        send(server, f"m{i}")
    a = session(server)
    a.send(b"f FETCH 1:* (BODY.PEEK[])\r\n")
    a.sock.close()
    b = session(server)
    assert b.command(b"n", b"FETCH 1:* (UID)")[-1].startswith(b"n OK")
    b.close()


def test_folder_existence_checks_run_in_the_worker_pool(server, monkeypatch):
    """SELECT, EXAMINE, STATUS, APPEND and COPY stat the Maildir, never on the reactor thread."""
    import threading

    from twisted_mail_screen.store.maildir import Maildir
    from twisted_mail_screen.testing import REACTOR_THREAD

    threads: list[str] = []
    exists = Maildir.exists

    def recording(self: Maildir) -> bool:
        threads.append(threading.current_thread().name)
        return exists(self)

    send(server, "m")
    monkeypatch.setattr(Maildir, "exists", recording)
    r = Raw(server.port("imap"))
    assert r.command(b"l", b"LOGIN bob@localhost x")[-1].startswith(b"l OK")
    for tag, command in [(b"e", b"EXAMINE INBOX"), (b"s", b"SELECT INBOX"),
                         (b"t", b"STATUS INBOX (MESSAGES)"), (b"c", b"COPY 1 INBOX"),
                         (b"a", b"APPEND INBOX {1+}\r\nx")]:
        before = len(threads)
        assert r.command(tag, command)[-1].startswith(tag + b" OK"), command
        assert len(threads) > before, command
    assert REACTOR_THREAD not in threads
