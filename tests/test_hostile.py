"""
Hostile input against the SMTP, POP3 and IMAP protocol objects over
in-memory transports: random and malformed command streams split at
random places, huge lines, floods of pipelined commands. Whatever comes
in: no unhandled exception is logged, no reply is an internal error
(C{421 4.3.0}, C{NO [SERVERBUG]}, C{* BYE Internal error}, C{-ERR
[SYS/TEMP]}), every reply is well-formed, and memory stays bounded.

The protocols are built by a real service object's listener factories
(C{build_service}), with the blocking pool made synchronous so that
deliveries and mailbox scans complete inside C{dataReceived}.

The near-valid commands are in tests/test_hostile_grammar.py. Long run
of both (documented in docs/performance.md, last result recorded there):

    MAILSCREEN_FUZZ_LONG=1 python -m pytest tests/test_hostile.py tests/test_hostile_grammar.py -k fuzz
    HOSTILE_EXAMPLES=1000000 python -m pytest tests/test_hostile.py tests/test_hostile_grammar.py -k fuzz
"""

from __future__ import annotations

import os
import re

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from twisted.internet import reactor
from twisted.internet.address import IPv4Address
from twisted.internet.error import ConnectionDone
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.logger import globalLogPublisher
from twisted.python.failure import Failure

from twisted_mail_screen.config.settings import load_config
from twisted_mail_screen.runtime.service import build_service
from twisted_mail_screen.testing import InlineWorkers, ephemeral_overrides

# MAILSCREEN_FUZZ_LONG=1: 20,000 random examples per fuzz test (about half an hour
# in all); HOSTILE_EXAMPLES=N sets the count. The default run is short and
# derandomized, so it is the same run every time.
LONG = os.environ.get("MAILSCREEN_FUZZ_LONG", "") not in ("", "0")
EXAMPLES = int(os.environ.get("HOSTILE_EXAMPLES", "20000" if LONG else "100"))
FIXED = not LONG and "HOSTILE_EXAMPLES" not in os.environ
FUZZ = settings(max_examples=EXAMPLES, deadline=None, derandomize=FIXED or EXAMPLES <= 100,
                suppress_health_check=list(HealthCheck))

# What each protocol answers when a command raised: never the answer to bad input.
INTERNAL_ERROR = re.compile(rb"(?im)^(?:[0-9]{3}[ -]4\.3\.0\b.*|.*internal error.*|.*\[SERVERBUG\].*"
                            rb"|.*\[SYS/TEMP\].*)$")


def no_internal_error(out: bytes) -> None:
    m = INTERNAL_ERROR.search(out)
    assert m is None, f"internal-error reply: {m.group(0)[:200]!r}"


class Failures:
    """Collects every logged failure (unhandled errors included)."""

    def __init__(self) -> None:
        self.events: list[dict] = []

    def __call__(self, event: dict) -> None:
        if "log_failure" in event or event.get("isError"):
            self.events.append(event)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    data = str(tmp_path_factory.mktemp("hostile") / "data")
    config = load_config(None, ephemeral_overrides(data, ("smtp", "pop3", "imap")))
    clock = Clock()
    service = build_service(config, reactor, clock, workers=InlineWorkers())
    # a few messages for POP3 and IMAP to read
    for i in range(3):
        service.store.deliver(["u@x.test"], b"Subject: m%d\nFrom: a@x.test\n\nbody %d\n.dot\n" % (i, i))
    failures = Failures()
    globalLogPublisher.addObserver(failures)
    yield service, clock, failures
    globalLogPublisher.removeObserver(failures)


def factory(service, kind: str):
    return next(l.factory for l in service.listeners if l.kind == kind)


def connect(service, kind: str, host: str = "127.0.0.1"):
    addr = IPv4Address("TCP", host, 40000)
    proto = factory(service, kind).buildProtocol(addr)
    transport = StringTransport(peerAddress=addr, hostAddress=IPv4Address("TCP", "127.0.0.1", 25))
    proto.makeConnection(transport)
    return proto, transport


def feed(proto, transport, chunks) -> None:
    for chunk in chunks:
        if transport.disconnecting:
            break
        proto.dataReceived(chunk)


def finish(proto, failures, before: int) -> None:
    proto.connectionLost(Failure(ConnectionDone()))
    assert len(failures.events) == before, [e.get("log_format") for e in failures.events[before:]]


SMTP_REPLY = re.compile(rb"^\d{3}[ -]")


def check_smtp(out: bytes) -> None:
    assert out.endswith(b"\r\n")
    for line in out[:-2].split(b"\r\n"):
        assert SMTP_REPLY.match(line), line[:100]


def check_pop3(out: bytes) -> None:
    assert out.endswith(b"\r\n")
    # content lines (multi-line answers) may follow only a +OK, up to a "." line
    prev_ok = False
    open_block = False
    for line in out[:-2].split(b"\r\n"):
        if open_block:
            open_block = line != b"."
            continue
        if line.startswith((b"+OK", b"-ERR", b"+ ")):
            prev_ok = line.startswith(b"+OK")
            continue
        assert prev_ok, f"content line without +OK: {line[:100]!r}"
        open_block = line != b"."


LITERAL_OUT = re.compile(rb"\{(\d+)\}$")


def check_imap(out: bytes, tags: set[bytes]) -> None:
    assert out.endswith(b"\r\n")
    pos = 0
    while pos < len(out):
        end = out.index(b"\r\n", pos)
        line = out[pos:end]
        first = line.split(b" ", 1)[0]
        assert first in (b"*", b"+") or first in tags, line[:100]
        pos = end + 2
        while (m := LITERAL_OUT.search(line)) is not None:
            pos += int(m.group(1))
            end = out.index(b"\r\n", pos)
            line = out[pos:end]
            pos = end + 2


def chunked(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts} | {0, len(data)})
    return [data[a:b] for a, b in zip(points, points[1:])]


# SMTP

SMTP_WORDS = [b"HELO x", b"EHLO client.example", b"EHLO", b"MAIL FROM:<a@x.test>", b"MAIL FROM:<>",
              b"MAIL FROM:<a@x.test> SIZE=999999999999", b"MAIL FROM:<a@x.test> BODY=8BITMIME",
              b"MAIL FROM:a@x.test", b"MAIL FROM:<@route:a@x.test>", b"RCPT TO:<u@x.test>",
              b"RCPT TO:<u%v@x.test>", b"RCPT TO:<\"q u\"@x.test>", b"RCPT TO:<>", b"RCPT TO:",
              b"DATA", b"Subject: x", b"", b".", b"..", b"RSET", b"NOOP", b"VRFY u", b"HELP",
              b"AUTH PLAIN", b"AUTH PLAIN AHVAeC50ZXN0AHB3", b"AUTH LOGIN", b"AUTH LOGIN dQ==",
              b"AUTH CRAM-MD5", b"*", b"=", b"STARTTLS", b"BDAT 10", b"QUIT", b"\x00\xff\xfe",
              b"MAIL FROM:<" + b"a" * 300 + b"@x.test>", b"EHLO \xc3\xa9", b"RCPT TO:<u@x.test> NOTIFY=NEVER"]

streams = st.lists(st.one_of(st.sampled_from(SMTP_WORDS), st.binary(max_size=40)), max_size=40)
endings = st.sampled_from([b"\r\n", b"\n", b"\r", b"\r\r\n"])
cuts = st.lists(st.integers(min_value=0, max_value=10_000), max_size=12)


@FUZZ
@given(words=streams, eol=endings, cuts=cuts)
def test_smtp_fuzz(server, words, eol, cuts):
    service, clock, failures = server
    before = len(failures.events)
    proto, transport = connect(service, "smtp")
    feed(proto, transport, chunked(eol.join(words) + eol, cuts))
    clock.advance(1)
    no_internal_error(transport.value())
    check_smtp(transport.value())
    finish(proto, failures, before)


SESSION = (b"EHLO c\r\nMAIL FROM:<a@x.test>\r\nRCPT TO:<s@x.test>\r\nDATA\r\n"
           b"Subject: split\r\n\r\n..dot\r\nbody\r\n.\r\nRSET\r\nNOOP\r\nQUIT\r\n")


def codes(out: bytes) -> list[bytes]:
    return [l[:3] for l in out.split(b"\r\n") if l[3:4] == b" "]


def test_smtp_bytes_split_at_every_position(server):
    service, clock, failures = server
    before = len(failures.events)
    proto, transport = connect(service, "smtp")
    feed(proto, transport, [SESSION])
    whole = codes(transport.value())
    assert whole == [b"220", b"250", b"250", b"250", b"354", b"250", b"250", b"250", b"221"]
    for i in range(1, len(SESSION)):
        proto, transport = connect(service, "smtp")
        feed(proto, transport, [SESSION[:i], SESSION[i:]])
        assert codes(transport.value()) == whole, i
    one_by_one, transport = connect(service, "smtp")
    feed(one_by_one, transport, [SESSION[i:i + 1] for i in range(len(SESSION))])
    assert codes(transport.value()) == whole
    assert len(failures.events) == before


def test_smtp_100_megabyte_line_in_chunks(server):
    service, clock, failures = server
    proto, transport = connect(service, "smtp")
    chunk = b"x" * 65536
    for _ in range(100 * 16):
        proto.dataReceived(chunk)
        assert len(proto._buffer) <= 2 * len(chunk) + proto.max_line_length
    proto.dataReceived(b"\r\nNOOP\r\n")
    assert codes(transport.value())[-2:] == [b"500", b"250"]
    # and inside DATA
    proto.dataReceived(b"EHLO c\r\nMAIL FROM:<a@x.test>\r\nRCPT TO:<s@x.test>\r\nDATA\r\n")
    for _ in range(100 * 16):
        proto.dataReceived(chunk)
        assert len(proto._data.buffer) <= 2 * len(chunk) + 16
    proto.dataReceived(b"\r\n.\r\nNOOP\r\n")
    assert codes(transport.value())[-2:] == [b"500", b"250"]


def test_smtp_million_pipelined_commands(server):
    service, clock, failures = server
    proto, transport = connect(service, "smtp")
    block = b"NOOP\r\n" * 10_000
    for _ in range(100):
        if transport.disconnecting:
            break
        proto.dataReceived(block)
    out = transport.value()
    assert len(out) < 1_000_000 and transport.disconnecting
    assert codes(out)[-1] == b"421"


# POP3

POP3_WORDS = [b"USER u@x.test", b"USER", b"PASS x", b"PASS", b"CAPA", b"STAT", b"LIST", b"LIST 1",
              b"LIST 99", b"LIST -1", b"LIST x", b"UIDL", b"UIDL 2", b"RETR 1", b"RETR 0",
              b"RETR 4294967296", b"TOP 1 0", b"TOP 1", b"TOP 1 x", b"TOP 2 99999999999",
              b"DELE 1", b"DELE 1", b"RSET", b"NOOP", b"AUTH", b"AUTH PLAIN", b"AUTH PLAIN =",
              b"AUTH PLAIN AHVAeC50ZXN0AHg=", b"AUTH X", b"*", b"STLS", b"APOP u x", b"\xff\x00",
              b"QUIT", b""]


@FUZZ
@given(words=st.lists(st.one_of(st.sampled_from(POP3_WORDS), st.binary(max_size=30)), max_size=40),
       eol=endings, cuts=cuts, login=st.booleans())
def test_pop3_fuzz(server, words, eol, cuts, login):
    service, clock, failures = server
    before = len(failures.events)
    proto, transport = connect(service, "pop3")
    if login:
        words = [b"USER u@x.test", b"PASS x"] + [w for w in words if w != b"QUIT"]
    feed(proto, transport, chunked(eol.join(words) + eol, cuts))
    no_internal_error(transport.value())
    check_pop3(transport.value())
    finish(proto, failures, before)  # no QUIT after login: nothing deleted


def test_pop3_100_megabyte_line(server):
    service, clock, failures = server
    proto, transport = connect(service, "pop3")
    chunk = b"y" * 65536
    for _ in range(100 * 16):
        proto.dataReceived(chunk)
        assert len(proto._buffer) <= 2 * len(chunk) + proto.max_line_length
    proto.dataReceived(b"\r\nCAPA\r\n")
    check_pop3(transport.value())
    assert b"-ERR Line too long" in transport.value()


class BackpressureTransport(StringTransport):
    """A transport whose peer never reads: it pauses its producer past 1 MB buffered."""

    LIMIT = 1 << 20

    def write(self, data: bytes) -> None:
        super().write(data)
        if self.producer is not None and len(self.io.getvalue()) > self.LIMIT and not self._paused:
            self._paused = True
            self.producer.pauseProducing()

    _paused = False


@pytest.mark.parametrize("kind,command", [("pop3", b"CAPA\r\n"), ("imap", b"a NOOP\r\n")])
def test_million_pipelined_commands_output_is_bounded(server, kind, command):
    service, clock, failures = server
    addr = IPv4Address("TCP", "127.0.0.1", 40001)
    proto = factory(service, kind).buildProtocol(addr)
    transport = BackpressureTransport(peerAddress=addr)
    proto.makeConnection(transport)
    block = command * 10_000
    for _ in range(100):
        if transport.disconnecting or len(transport.value()) >= 8 * BackpressureTransport.LIMIT:
            break
        proto.dataReceived(block)
    assert len(transport.value()) < 8 * BackpressureTransport.LIMIT


# IMAP

IMAP_WORDS = [b"a1 CAPABILITY", b"a2 LOGIN u@x.test x", b"a3 SELECT INBOX", b"a4 EXAMINE INBOX",
              b"a5 FETCH 1:* (FLAGS RFC822.SIZE ENVELOPE)", b"a6 FETCH 1 BODY[]", b"a7 UID SEARCH HEADER Subject m1",
              b"a8 STORE 1 +FLAGS (\\Deleted)", b"a9 EXPUNGE", b"a10 NOOP", b"a11 LIST \"\" *",
              b"a12 CREATE Foo", b"a13 APPEND INBOX {5}", b"hello", b"a14 APPEND INBOX {1000000000000}",
              b"a15 APPEND INBOX {1000000000000+}", b"a16 FETCH 1:4294967296 FLAGS", b"a17 SEARCH ALL",
              b"a18 IDLE", b"DONE", b"a19 LOGOUT", b"a20 FETCH * (BODY.PEEK[HEADER.FIELDS (SUBJECT)])",
              b"a21 STATUS INBOX (MESSAGES UIDNEXT)", b"a22 CLOSE", b"a23 UID FETCH 1:* (UID)",
              b"a24 AUTHENTICATE PLAIN", b"a25 RENAME Foo Bar", b"a26 DELETE Bar", b"(((((((",
              b"a27 FETCH 1 (" + b"(" * 200 + b")", b"\x00\xff", b"", b"*"]
TAGS = {w.split(b" ")[0] for w in IMAP_WORDS if w[:1] == b"a"}


@FUZZ
@given(words=st.lists(st.one_of(st.sampled_from(IMAP_WORDS), st.binary(max_size=30)), max_size=30),
       eol=endings, cuts=cuts)
def test_imap_fuzz(server, words, eol, cuts):
    service, clock, failures = server
    before = len(failures.events)
    proto, transport = connect(service, "imap")
    feed(proto, transport, chunked(eol.join(words) + eol, cuts))
    out = transport.value()
    # Random bytes may be taken for a tag; every reply must still start with
    # "*", "+" or a tag the client sent (any first word of an input line).
    sent_tags = TAGS | {l.split(b" ")[0].strip(b"\r") for l in (eol.join(words)).split(b"\n")}
    no_internal_error(out)
    check_imap(out, sent_tags)
    finish(proto, failures, before)


def test_imap_terabyte_literal_is_refused(server):
    service, clock, failures = server
    proto, transport = connect(service, "imap")
    proto.dataReceived(b"a1 LOGIN u@x.test x\r\na2 APPEND INBOX {1000000000000}\r\n")
    out = transport.value()
    assert b"\r\n+ " not in out.split(b"a1 OK", 1)[-1], "a 10^12-byte literal was invited"
    assert re.search(rb"a2 (NO|BAD)", out)
    # a synchronising literal refused: the next line is a new command
    proto.dataReceived(b"a3 NOOP\r\n")
    assert b"a3 OK" in transport.value()
    # non-synchronising: the bytes are discarded as they come, never kept
    proto2, transport2 = connect(service, "imap")
    proto2.dataReceived(b"a1 LOGIN u@x.test x\r\na2 APPEND INBOX {1000000000000+}\r\n")
    for _ in range(100):
        proto2.dataReceived(b"z" * 65536)
        assert len(proto2._buffer) < 1 << 20
    assert re.search(rb"a2 (NO|BAD)", transport2.value())

