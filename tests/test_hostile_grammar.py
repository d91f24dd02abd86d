"""
Near-valid commands (tests/hostile_grammar.py) against SMTP, POP3 and
IMAP: numbers past 32/64 bits and of 5,000 digits, Unicode digits, NUL
and other control characters, nesting of parentheses and NOT/OR, one
item repeated thousands of times, literals announced at 4294967296
octets, bad base64 in AUTHENTICATE/AUTH. Every test fails on a logged
failure (a C{twisted.logger} observer), on any internal-error reply and
on any malformed reply.

Most examples run against the protocol objects of tests/test_hostile.py
(in-memory transports, synchronous worker pool: thousands of examples a
minute); a smaller set goes over real sockets to a L{RunningServer},
whose reactor thread and worker pools run as in production. The inputs
that once gave internal errors (issue 10) are also replayed one by one.

Long run: see tests/test_hostile.py (C{MAILSCREEN_FUZZ_LONG=1}).
"""

from __future__ import annotations

import inspect
import os
import re
import socket
import sys
import threading
from contextlib import contextmanager
from typing import Callable

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from twisted.internet.error import ConnectionDone
from twisted.logger import globalLogPublisher
from twisted.python.failure import Failure

from tests.hostile_grammar import (imap_selected_command, imap_unauth_command, pop3_command,
                                   smtp_command)
from tests.test_hostile import (FIXED, LONG, Failures, check_imap, check_pop3, check_smtp, chunked,
                                connect, cuts, feed, no_internal_error, server)
from twisted_mail_screen.config.settings import load_config
from twisted_mail_screen.testing import RunningServer, ephemeral_overrides

__all__ = ["server"]  # the in-memory server fixture, shared with tests/test_hostile.py

GRAMMAR_EXAMPLES = int(os.environ.get("HOSTILE_EXAMPLES", "20000" if LONG else "400"))
GRAMMAR = settings(max_examples=GRAMMAR_EXAMPLES, deadline=None, derandomize=FIXED,
                   suppress_health_check=list(HealthCheck))
SOCKET_EXAMPLES = max(1, GRAMMAR_EXAMPLES // 10)
OVER_SOCKETS = settings(max_examples=SOCKET_EXAMPLES, deadline=None, derandomize=FIXED,
                        suppress_health_check=list(HealthCheck))


# In memory

FUZZ_USER = "fz@x.test"


def refill(service, address: str = FUZZ_USER) -> None:
    """A few messages to work on (earlier examples may have expunged or moved them)."""
    md = service.store.maildir(address)
    if not md.exists() or len(md.scan()) < 3:
        for i in range(3):
            service.store.deliver([address], b"Subject: m%d\r\nFrom: a@x.test\r\n\r\nbody %d\r\n" % (i, i))


def line_tags(stream: bytes) -> set[bytes]:
    """Every first word of a line: inside a refused literal, data lines pass for commands."""
    return {l.split(b" ")[0].strip(b"\r") for l in stream.split(b"\n")}


@contextmanager
def production_stack():
    """
    The stack a server has in production: hypothesis raises the recursion
    limit while a test runs, which would hide a RecursionError (a NOT chain
    1,100 deep) that a real server, with Python's default of 1000, meets.
    """
    depth = len(inspect.stack(0))
    old = sys.getrecursionlimit()
    sys.setrecursionlimit(depth + 1000)
    try:
        yield
    finally:
        sys.setrecursionlimit(old)


def run(service, clock, kind: str, stream: bytes, cuts: list[int]) -> bytes:
    proto, transport = connect(service, kind)
    with production_stack():
        feed(proto, transport, chunked(stream, cuts))
        clock.advance(1)
    out = transport.value()
    proto.connectionLost(Failure(ConnectionDone()))
    return out


def replay(server, kind: str, stream: bytes, cuts: list[int], check: Callable[[bytes], object],
           fill: bool = True) -> None:
    """
    Run C{stream} in memory (after L{refill} when C{fill}); fail on an
    internal-error reply, on what C{check} finds wrong and on any logged failure.
    """
    service, clock, failures = server
    before = len(failures.events)
    if fill:
        refill(service)
    out = run(service, clock, kind, stream, cuts)
    no_internal_error(out)
    check(out)
    assert len(failures.events) == before, [e.get("log_format") for e in failures.events[before:]]


@GRAMMAR
@given(commands=st.lists(imap_selected_command(), min_size=1, max_size=6), cuts=cuts)
def test_imap_grammar_fuzz(server, commands, cuts):
    stream = b"l LOGIN fz@x.test pw\r\ns SELECT INBOX\r\n" + \
        b"".join(b"g%d " % i + c + b"\r\n" + (b"s SELECT INBOX\r\n" if c[:1] in b"SE" else b"")
                 for i, c in enumerate(commands))
    replay(server, "imap", stream, cuts, lambda out: check_imap(out, line_tags(stream)))


@GRAMMAR
@given(commands=st.lists(imap_unauth_command(), min_size=1, max_size=6), cuts=cuts)
def test_imap_unauthenticated_grammar_fuzz(server, commands, cuts):
    stream = b"".join(b"u%d " % i + c + b"\r\n" for i, c in enumerate(commands))
    replay(server, "imap", stream, cuts, lambda out: check_imap(out, line_tags(stream)), fill=False)


@GRAMMAR
@given(commands=st.lists(smtp_command(), min_size=1, max_size=8), cuts=cuts)
def test_smtp_grammar_fuzz(server, commands, cuts):
    stream = b"EHLO fz.example\r\n" + b"".join(c + b"\r\n" for c in commands)
    replay(server, "smtp", stream, cuts, check_smtp, fill=False)


@GRAMMAR
@given(commands=st.lists(pop3_command(), min_size=1, max_size=8), cuts=cuts, login=st.booleans())
def test_pop3_grammar_fuzz(server, commands, cuts, login):
    stream = (b"USER fz@x.test\r\nPASS pw\r\n" if login else b"") + b"".join(c + b"\r\n" for c in commands)
    replay(server, "pop3", stream, cuts, check_pop3)


# The inputs that once gave an internal error (issue 10), each on its own.
DIGITS = b"9" * 5000
KNOWN = [
    ("imap", b"x SEARCH " + b"NOT " * 1100 + b"ALL"),
    ("imap", b"x FETCH " + DIGITS + b" FLAGS"),
    ("imap", b"x FETCH 1 BODY.PEEK[]<" + DIGITS + b".1>"),
    ("imap", b"x SEARCH LARGER " + DIGITS),
    ("imap", b"x SELECT \x00x"),
    ("imap", b"x CREATE " + b"a" * 300),
    ("imap", b"x CREATE " + b"/".join([b"a"] * 200)),
    ("imap", b"x SELECT {" + DIGITS + b"+}"),
    ("imap", b"x SEARCH BEFORE 0-Jan-0000"),
    ("imap", b"x SEARCH SENTON 31-Feb-2020"),
    ("imap", b'x APPEND INBOX "99-Jan-2020 99:99:99 +0000" {1+}\r\nx'),
    ("smtp", b"MAIL FROM:<a@x.example> SIZE=" + DIGITS),
    ("smtp", "MAIL FROM:<a@x.example> SIZE=²".encode()),
    ("smtp", b"AUTH PLAIN ===="),
    ("pop3", "TOP 1 ²".encode()),
    ("pop3", "RETR ٣".encode()),
    ("pop3", b"LIST " + DIGITS),
]


@pytest.mark.parametrize("kind,command", KNOWN, ids=[f"{k}-{c[:30]!r}" for k, c in KNOWN])
def test_known_hostile_inputs(server, kind, command):
    prefix = {"imap": b"l LOGIN fz@x.test pw\r\ns SELECT INBOX\r\n", "smtp": b"EHLO fz.example\r\n",
              "pop3": b"USER fz@x.test\r\nPASS pw\r\n"}[kind]

    def refused(out: bytes) -> None:
        last = out.rstrip(b"\r\n").rsplit(b"\r\n", 1)[-1]
        assert re.match({"imap": rb"x (BAD|NO) ", "smtp": rb"5\d\d ", "pop3": rb"-ERR "}[kind], last), last[:200]

    replay(server, kind, prefix + command + b"\r\n", [], refused)


# Over real sockets

# What ends each protocol's session from any state the commands may have left it in
# (a literal one byte short, IDLE, an AUTH continuation, DATA); the half-close after
# it ends even a literal that is being discarded.
GOODBYE = {"imap": b"\r\nDONE\r\n*\r\nzz LOGOUT\r\nzz LOGOUT\r\n",
           "smtp": b"\r\n*\r\n.\r\nQUIT\r\n", "pop3": b"\r\n*\r\nQUIT\r\n"}


@pytest.fixture(scope="module")
def live(tmp_path_factory):
    failures = Failures()
    globalLogPublisher.addObserver(failures)
    data = str(tmp_path_factory.mktemp("hostile-live") / "data")
    running = RunningServer(load_config(None, ephemeral_overrides(data, ("smtp", "pop3", "imap")))).start()
    yield running, failures
    running.stop()
    globalLogPublisher.removeObserver(failures)
    assert not failures.events, [e["log_failure"].getTraceback() if "log_failure" in e else e.get("log_format")
                                 for e in failures.events]


def exchange(port: int, stream: bytes) -> bytes:
    """Send C{stream}, then half-close; every byte the server sends until it closes."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=30)

    def write() -> None:
        try:
            sock.sendall(stream)
            sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass  # the server closed first

    writer = threading.Thread(target=write)
    writer.start()
    out = bytearray()
    try:
        while chunk := sock.recv(65536):
            out += chunk
    finally:
        writer.join()
        sock.close()
    return bytes(out)


def over_socket(live, kind: str, stream: bytes) -> None:
    running, failures = live
    before = len(failures.events)
    if kind != "smtp":
        refill(running.service)
    out = exchange(running.port(kind), stream + GOODBYE[kind])
    assert out[:1] in (b"*", b"2", b"+"), out[:100]  # the greeting
    no_internal_error(out)
    assert len(failures.events) == before, [e.get("log_format") for e in failures.events[before:]]


@OVER_SOCKETS
@given(commands=st.lists(imap_selected_command(), min_size=1, max_size=6))
def test_imap_grammar_fuzz_over_sockets(live, commands):
    over_socket(live, "imap", b"l LOGIN fz@x.test pw\r\ns SELECT INBOX\r\n" +
                b"".join(b"g%d " % i + c + b"\r\n" for i, c in enumerate(commands)))


@OVER_SOCKETS
@given(commands=st.lists(smtp_command(), min_size=1, max_size=8))
def test_smtp_grammar_fuzz_over_sockets(live, commands):
    over_socket(live, "smtp", b"EHLO fz.example\r\n" + b"".join(c + b"\r\n" for c in commands))


@OVER_SOCKETS
@given(commands=st.lists(pop3_command(), min_size=1, max_size=8))
def test_pop3_grammar_fuzz_over_sockets(live, commands):
    over_socket(live, "pop3", b"USER fz@x.test\r\nPASS pw\r\n" + b"".join(c + b"\r\n" for c in commands))
