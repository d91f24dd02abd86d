# -*- test-case-name: tests.test_relay -*-
"""
A small SMTP client (RFC 5321) for the outbound queue.

Twisted's C{ESMTPClient} sends one message per C{getMailFrom} loop and
folds every problem into one error callback; the queue needs more: the
reply of each recipient separately, several transactions on one
connection, STARTTLS that fails (temporarily) rather than downgrades, and
every timeout on the injected clock. This client is a line parser with a
C{command() -> Deferred[Reply]} primitive; the conversation itself is
written in L{Conversation} as plain sequential code.
"""

from __future__ import annotations

import base64
import re
from dataclasses import dataclass, field, replace
from typing import Any, Iterator

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.internet.protocol import Factory, Protocol
from twisted.python.failure import Failure

from twisted_mail_screen.protocols.pop3_wire import to_wire as stuffed
from twisted_mail_screen.store.envelope import xtext_encode

MAX_REPLY_LINES = 200
MAX_LINE = 4096
NL = b"\n"
_ENHANCED = re.compile(r"^([245])\.\d{1,3}\.\d{1,3}$")


@dataclass(frozen=True)
class Reply:
    """A server reply: its code and its text lines joined with spaces."""

    code: int
    text: str
    lines: tuple[str, ...] = ()
    #: Accepted by a next hop that took no DSN parameters: a success the
    #: sender asked to hear of is ours to report, as "relayed" (RFC 3461 5.2.2).
    relayed: bool = False

    def __str__(self) -> str:
        return f"{self.code} {self.text}".strip()

    @property
    def positive(self) -> bool:
        return 200 <= self.code < 400

    @property
    def permanent(self) -> bool:
        return 500 <= self.code < 600

    @property
    def status(self) -> str:
        """The enhanced status code (RFC 3463): the server's, or a generic one."""
        first = self.text.split(" ", 1)[0]
        if _ENHANCED.match(first) and first[0] == str(self.code)[0]:
            return first
        return {2: "2.0.0", 5: "5.0.0"}.get(self.code // 100, "4.0.0")


class SMTPFailure(Exception):
    """
    A conversation that could not go on; C{reply} is the (possibly
    synthesized) reply reported to the queue and in bounces.
    """

    def __init__(self, reply: Reply) -> None:
        super().__init__(str(reply))
        self.reply = reply


def local_failure(text: str, status: str = "4.4.0", code: int = 451) -> SMTPFailure:
    """A failure found on this side (timeout, TLS, connection lost)."""
    return SMTPFailure(Reply(code, f"{status} {text}"))


class SMTPClient(Protocol):
    """Reads replies; one command (or the greeting) outstanding at a time."""

    def __init__(self, clock: IReactorTime, timeout: float) -> None:
        self.clock = clock
        self.timeout = timeout
        self._buffer = b""
        self._lines: list[str] = []
        self._waiting: Deferred | None = None
        self._timer: IDelayedCall | None = None
        self._lost: Failure | None = None
        self.connected_d: Deferred = Deferred()
        self.tls_started = False

    def connectionMade(self) -> None:
        self._expect(self.timeout)
        self.connected_d.callback(self)

    def greeting(self) -> Deferred:
        """The 220 greeting (already being waited for)."""
        assert self._waiting is not None
        return self._waiting

    def _expect(self, timeout: float) -> Deferred:
        self._waiting = Deferred()
        self._timer = self.clock.callLater(timeout, self._timed_out)
        return self._waiting

    def _timed_out(self) -> None:
        self._timer = None
        self._fail(local_failure("timed out waiting for the server's reply", "4.4.2"))
        self.transport.abortConnection()

    def _fire(self, result: Any) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        d, self._waiting = self._waiting, None
        if d is not None:
            d.callback(result)

    def _fail(self, exc: Exception) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        d, self._waiting = self._waiting, None
        if d is not None:
            d.errback(Failure(exc))

    def command(self, line: str | bytes, timeout: float | None = None) -> "Deferred[Reply]":
        if isinstance(line, str):
            line = line.encode("utf-8")
        return self.send_and_wait(line + b"\r\n", timeout)

    def send_and_wait(self, data: bytes, timeout: float | None = None) -> "Deferred[Reply]":
        if self._lost is not None:
            return _failed(self._lost)
        d = self._expect(timeout or self.timeout)
        self.transport.write(data)
        return d

    def dataReceived(self, data: bytes) -> None:
        self._buffer += data
        while True:
            end = self._buffer.find(b"\n")
            if end < 0:
                if len(self._buffer) > MAX_LINE:
                    self._protocol_error("reply line too long")
                return
            raw, self._buffer = self._buffer[:end], self._buffer[end + 1:]
            line = raw.rstrip(b"\r").decode("utf-8", "replace")
            if len(line) < 3 or not line[:3].isdigit() or line[3:4] not in ("", " ", "-"):
                self._protocol_error(f"malformed reply {line[:80]!r}")
                return
            self._lines.append(line)
            if len(self._lines) > MAX_REPLY_LINES:
                self._protocol_error("reply too long")
                return
            if line[3:4] != "-":
                lines, self._lines = self._lines, []
                texts = tuple(l[4:].strip() for l in lines)
                reply = Reply(int(line[:3]), " ".join(texts), texts)
                if self._waiting is None:
                    self._protocol_error(f"unexpected reply {reply}")
                    return
                self._fire(reply)

    def _protocol_error(self, what: str) -> None:
        self._fail(local_failure(f"protocol error: {what}", "4.5.0"))
        self.transport.abortConnection()

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[override]
        text = reason.getErrorMessage() if reason is not None else "connection lost"
        failure = local_failure(f"lost connection: {text}", "4.4.2")
        self._lost = Failure(failure)
        self._fail(failure)
        if not self.connected_d.called:
            self.connected_d.errback(Failure(failure))

    def start_tls(self, creator: Any) -> None:
        self.tls_started = True
        self.transport.startTLS(creator)

    def close(self) -> None:
        if self._lost is None:
            self.transport.loseConnection()

    def abort(self) -> None:
        if self._lost is None:
            self.transport.abortConnection()


def _failed(failure: Failure) -> Deferred:
    d: Deferred = Deferred()
    d.errback(failure)
    return d


class ClientFactory(Factory):
    noisy = False

    def __init__(self, clock: IReactorTime, timeout: float) -> None:
        self.clock = clock
        self.timeout = timeout

    def buildProtocol(self, addr: Any) -> SMTPClient:
        p = SMTPClient(self.clock, self.timeout)
        p.factory = self
        return p


def to_wire(message: bytes) -> bytes:
    """
    A stored message (LF line endings) as DATA content: CRLF line
    endings, leading dots doubled, ending with the final dot line. The
    stuffing is POP3's (RFC 5321 4.5.2 and RFC 1939 3 agree), done with
    C{bytes.replace}: a large message must not hold the reactor thread.
    """
    return stuffed(message) + b".\r\n"


#: A BDAT chunk's share of the stored message: each is made CRLF on the
#: reactor when its turn comes (a MiB of C{bytes.replace}: well under a millisecond).
CHUNK = 1 << 20


def bdat_chunks(message: bytes, size: int = CHUNK) -> Iterator[bytes]:
    """
    A stored message (LF line endings) as CHUNKING content (RFC 3030), in
    pieces made from about C{size} octets each: CRLF line endings, a last
    line ended, neither dot-stuffed nor ended by a dot line. Joined, they
    are L{to_wire}'s lines without its stuffing and final dot.
    """
    start, end = 0, len(message)
    while True:
        stop = min(start + size, end)
        if stop < end and message[stop - 1:stop] == b"\r":
            stop += 1  # a CRLF kept whole, so it is not made CR CR LF
        piece = message[start:stop]
        if b"\r" in piece:
            piece = piece.replace(b"\r\n", b"\n")
        piece = piece.replace(b"\n", b"\r\n")
        if stop == end and message and not message.endswith(b"\n"):
            piece += b"\r\n"
        yield piece
        if stop == end:
            return
        start = stop


@dataclass(frozen=True)
class Extensions:
    """
    What a transaction asks of the next hop beyond the addresses:
    C{smtputf8} when the message needs SMTPUTF8 (RFC 6531: a non-ASCII
    address or header), RET and ENVID for MAIL, and each recipient's
    NOTIFY and ORCPT (RFC 3461), sent only where the next hop offers DSN.
    """

    smtputf8: bool = False
    ret: str = ""
    envid: str = ""
    notify: dict[str, tuple[str, ...]] = field(default_factory=dict)
    orcpt: dict[str, str] = field(default_factory=dict)

    def mail(self, offered: dict[str, str]) -> str:
        params = " SMTPUTF8" if self.smtputf8 and "SMTPUTF8" in offered else ""
        if "DSN" in offered:
            params += f" RET={self.ret}" if self.ret else ""
            params += f" ENVID={xtext_encode(self.envid)}" if self.envid else ""
        return params

    def rcpt(self, address: str, offered: dict[str, str]) -> str:
        if "DSN" not in offered:
            return ""
        notify, orcpt = self.notify.get(address), self.orcpt.get(address)
        params = f" NOTIFY={','.join(notify)}" if notify else ""
        if orcpt:
            kind, _, original = orcpt.partition(";")
            params += f" ORCPT={kind};{xtext_encode(original)}"
        return params


NO_EXTENSIONS = Extensions()


@dataclass
class Session:
    """An open, greeted (and maybe encrypted and authenticated) connection."""

    client: SMTPClient
    host: str
    extensions: dict[str, str]
    secure: bool


async def open_session(client: SMTPClient, host: str, helo: str, *, starttls: str,
                       tls_creator: Any, implicit_tls: bool,
                       credentials: tuple[str, str] | None) -> Session:
    """
    Greeting, EHLO (or HELO), STARTTLS per the policy, AUTH if configured.

    @raise SMTPFailure: on any refusal or failure (temporary or not).
    """
    try:
        greeting = await client.greeting()
    except SMTPFailure as e:
        if implicit_tls:
            raise _tls_failure(host, e) from e
        raise
    if greeting.code != 220:
        raise SMTPFailure(greeting)
    extensions = await _ehlo(client, helo)
    secure = implicit_tls
    if not secure and starttls != "none" and "STARTTLS" in extensions and tls_creator is not None:
        reply = await client.command("STARTTLS")
        if reply.code != 220:
            if starttls == "required":
                raise SMTPFailure(Reply(451, f"4.7.4 STARTTLS refused by {host}: {reply}"))
        else:
            client.start_tls(tls_creator)
            secure = True
            try:
                extensions = await _ehlo(client, helo)  # the handshake happens here
            except SMTPFailure as e:
                raise _tls_failure(host, e) from e
    if not secure and starttls == "required":
        raise SMTPFailure(Reply(451, f"4.7.4 {host} does not offer STARTTLS, which is required"))
    if credentials is not None:
        if not secure:
            raise SMTPFailure(Reply(451, "4.7.4 refusing to send relay credentials without TLS"))
        await _authenticate(client, extensions, *credentials)
    return Session(client, host, extensions, secure)


def _tls_failure(host: str, e: SMTPFailure) -> SMTPFailure:
    """A failed handshake (or certificate check) is temporary, never a downgrade."""
    text = e.reply.text.split(" ", 1)[-1] if e.reply.code == 451 else str(e.reply)
    text = text.removeprefix("lost connection: ")
    return SMTPFailure(Reply(451, f"4.7.5 TLS negotiation with {host} failed: {text}"))


async def _ehlo(client: SMTPClient, helo: str) -> dict[str, str]:
    reply = await client.command(f"EHLO {helo}")
    if reply.code == 250:
        return _extensions(reply)
    if reply.code in (421,):
        raise SMTPFailure(reply)
    reply = await client.command(f"HELO {helo}")
    if reply.code != 250:
        raise SMTPFailure(reply)
    return {}


def _extensions(reply: Reply) -> dict[str, str]:
    """EHLO keywords (upper case) with their parameters; the first line is the greeting."""
    out: dict[str, str] = {}
    for line in reply.lines[1:]:
        keyword, _, params = line.partition(" ")
        out[keyword.upper()] = params.upper()
    return out


async def _authenticate(client: SMTPClient, extensions: dict[str, str],
                        username: str, password: str) -> None:
    mechanisms = extensions.get("AUTH", "").split()
    if "PLAIN" in mechanisms or not mechanisms:
        token = base64.b64encode(f"\0{username}\0{password}".encode()).decode()
        reply = await client.command(f"AUTH PLAIN {token}")
    else:
        reply = await client.command("AUTH LOGIN")
        if reply.code == 334:
            reply = await client.command(base64.b64encode(username.encode()).decode())
        if reply.code == 334:
            reply = await client.command(base64.b64encode(password.encode()).decode())
    if reply.code != 235:
        # Our credentials are wrong: the administrator's problem, never the
        # sender's, so it is a temporary failure whatever the code says.
        raise SMTPFailure(Reply(451, f"4.7.8 relay authentication failed: {reply}"))


async def transaction(session: Session, sender: str, recipients: list[str],
                      message: bytes, data_timeout: float, wire: bytes | None = None,
                      extensions: Extensions = NO_EXTENSIONS) -> dict[str, Reply]:
    """
    One mail transaction. Returns each recipient's final reply: the RCPT
    refusal, or the reply to the end of DATA. C{wire} is C{to_wire(message)}
    when the caller has made it already (off the reactor thread).
    A message that needs SMTPUTF8 is not sent to a host without it: each
    recipient gets a permanent 5.6.7 (RFC 6531 3.7.5), bounced as any.

    @raise SMTPFailure: when the connection fails part-way.
    """
    client = session.client
    offered = session.extensions
    if extensions.smtputf8 and "SMTPUTF8" not in offered:
        reply = Reply(553, f"5.6.7 {session.host} does not offer SMTPUTF8, which this message "
                           "needs (RFC 6531 3.7.5)")
        return {r: reply for r in recipients}
    params = extensions.mail(offered)
    if "SIZE" in session.extensions:
        params += f" SIZE={len(message) + message.count(NL)}"
    if "8BITMIME" in session.extensions and not message.isascii():
        params += " BODY=8BITMIME"
    reply = await client.command(f"MAIL FROM:<{sender}>{params}")
    if reply.code != 250:
        await _rset(client)
        return {r: reply for r in recipients}
    results: dict[str, Reply] = {}
    accepted: list[str] = []
    for rcpt in recipients:
        reply = await client.command(f"RCPT TO:<{rcpt}>{extensions.rcpt(rcpt, offered)}")
        if reply.code in (250, 251):
            accepted.append(rcpt)
        else:
            results[rcpt] = reply
    if not accepted:
        await _rset(client)
        return results
    if "CHUNKING" in offered:
        reply = await _send_chunks(client, message, data_timeout)
        if not reply.positive:
            await _rset(client)  # a refused chunk ends the transaction (RFC 3030 3)
            results.update({r: reply for r in accepted})
            return results
    else:
        reply = await client.command("DATA")
        if reply.code != 354:
            await _rset(client)
            results.update({r: reply for r in accepted})
            return results
        reply = await client.send_and_wait(to_wire(message) if wire is None else wire, data_timeout)
    if reply.positive and "DSN" not in offered:
        reply = replace(reply, relayed=True)
    results.update({r: reply for r in accepted})
    return results


async def _send_chunks(client: SMTPClient, message: bytes, timeout: float) -> Reply:
    """
    The message in BDAT chunks to a host that offers CHUNKING, each reply
    waited for (the last one's answers for the message); stops at the
    first refusal.
    """
    pieces = bdat_chunks(message)
    piece = next(pieces)
    while True:
        following = next(pieces, None)
        last = b" LAST" if following is None else b""
        reply = await client.send_and_wait(b"BDAT %d%s\r\n" % (len(piece), last) + piece, timeout)
        if following is None or reply.code != 250:
            return reply
        piece = following


async def _rset(client: SMTPClient) -> None:
    reply = await client.command("RSET")
    if reply.code != 250:
        raise SMTPFailure(reply)


async def quit(client: SMTPClient) -> None:
    try:
        await client.command("QUIT", timeout=10)
    except SMTPFailure:
        pass
    finally:
        client.close()
