"""
Slow and idle clients: idle timeouts close SMTP, POP3 and IMAP sessions
(driven by an injected Clock), a command dribbled a byte at a time cannot
hold a session forever, and many half-open sessions do not stop the
server from serving others.
"""

from __future__ import annotations

import smtplib
import socket
import time

import pytest
from twisted.internet.task import Clock


def read_all(s: socket.socket, timeout: float = 5.0) -> bytes:
    s.settimeout(timeout)
    out = b""
    while True:
        try:
            chunk = s.recv(65536)
        except socket.timeout:
            return out
        if not chunk:
            return out + b"<EOF>"
        out += chunk


def wait_greeting(s: socket.socket) -> bytes:
    s.settimeout(5)
    return s.recv(1024)


@pytest.mark.parametrize("kind,timeout_key,limit", [
    ("smtp", "smtp__idle_timeout", 300), ("pop3", "pop3__idle_timeout", 600),
    ("imap", "imap__idle_timeout", 1800)])
def test_idle_sessions_are_closed(start_server, kind, timeout_key, limit):
    clock = Clock()
    server = start_server(clock=clock, kinds=("smtp", "pop3", "imap"), **{timeout_key: limit})
    with socket.create_connection(("127.0.0.1", server.port(kind))) as s:
        assert wait_greeting(s)
        server.advance(limit - 1)
        s.sendall(b"NOOP\r\n" if kind != "imap" else b"a NOOP\r\n")  # activity resets the timer
        time.sleep(0.2)
        server.advance(limit - 1)
        s.setblocking(True)
        s.settimeout(0.3)
        try:
            got = s.recv(4096)
        except socket.timeout:
            got = b""
        assert got and b"<EOF>" not in got  # still open: only the NOOP's answer
        server.advance(2)
        tail = read_all(s)
        assert tail.endswith(b"<EOF>"), tail


def test_dribbled_command_cannot_hold_a_session_forever(start_server):
    """One byte every 200 s of a 300 s idle timeout: closed within a bounded time."""
    clock = Clock()
    server = start_server(clock=clock, smtp__idle_timeout=300)
    with socket.create_connection(("127.0.0.1", server.port("smtp"))) as s:
        wait_greeting(s)
        closed = False
        for i in range(60):  # 12000 s, 40 idle timeouts
            try:
                s.sendall(b"X")
            except OSError:
                closed = True
                break
            time.sleep(0.01)
            server.advance(200)
        s.settimeout(0.5)
        try:
            closed = closed or read_all(s, 0.5).endswith(b"<EOF>")
        except OSError:
            closed = True
        assert closed


def test_slowloris_does_not_exhaust_the_server(start_server):
    """300 half-open sessions (greeting read, half a command sent); others are still served."""
    server = start_server()
    port = server.port("smtp")
    loris = []
    try:
        for i in range(300):
            s = socket.create_connection(("127.0.0.1", port), timeout=5)
            s.sendall(b"EHLO slow")
            loris.append(s)
        t0 = time.monotonic()
        for n in range(5):
            client = smtplib.SMTP("127.0.0.1", port, timeout=5)
            assert client.sendmail("a@x.test", ["r@x.test"], b"Subject: %d\r\n\r\nok\r\n" % n) == {}
            client.quit()
        assert time.monotonic() - t0 < 5
    finally:
        for s in loris:
            s.close()
