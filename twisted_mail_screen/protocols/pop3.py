# -*- test-case-name: tests.test_pop3 -*-
"""
The POP3 server (RFC 1939, with CAPA RFC 2449, AUTH RFC 5034, STLS RFC
2595) on the same Maildirs SMTP writes.

A session works on a snapshot of the mailbox taken at login (only names
and sizes; bodies are read when asked for). DELE only marks a message;
the files are removed in the UPDATE state, after QUIT, so a dropped
connection deletes nothing. One POP3 session per mailbox at a time.
"""

from __future__ import annotations

import hashlib
import os
import re
from dataclasses import dataclass, field
from typing import Any, Callable

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.internet.protocol import Factory
from twisted.logger import Logger
from twisted.python.failure import Failure

from twisted_mail_screen.store.auth import Authenticator
from twisted_mail_screen.config.settings import Config
from twisted_mail_screen.screening.interfaces import Screening
from twisted_mail_screen.protocols.session import SASLError, ScreenedSession, sasl_plain
from twisted_mail_screen.store.maildir import Maildir, MailStore, MessageFile
from twisted_mail_screen.store.maildir_names import unique_of
from twisted_mail_screen.runtime.workers import Blocking


#: Messages up to this size (octets as sent) are read whole, a batch at a
#: time; larger ones are streamed in L{STREAM_CHUNK} pieces.
SMALL_MESSAGE = 64 * 1024
#: Read-ahead: at most this many messages and octets held per session.
READ_AHEAD_MESSAGES = 64
READ_AHEAD_BYTES = 512 * 1024
#: The first read-ahead batch of a session; each further batch doubles.
READ_AHEAD_START = 8
#: Bytes read from disk per pool call when streaming a large message.
STREAM_CHUNK = 256 * 1024


_DOT_LINE = re.compile(rb"\n\.")
#: A command's number argument: ASCII digits only (int() also takes "²"-like
#: Unicode digits, "1_0" and thousands of digits, the last with a ValueError).
_NUMBER = re.compile(r"[0-9]{1,20}")


def _number(text: str) -> int | None:
    """C{text} as a non-negative number, or C{None} when it is not one."""
    return int(text) if _NUMBER.fullmatch(text) else None


def to_wire(data: bytes) -> bytes:
    """A stored message as CRLF lines, dot-stuffed (RFC 1939 section 3)."""
    if b"\r" in data:
        data = data.replace(b"\r\n", b"\n")
    return lf_to_wire(data)


def lf_to_wire(data: bytes) -> bytes:
    """L{to_wire} of data whose CRLFs are already LFs (as L{top_of} returns)."""
    data = data.replace(b"\n", b"\r\n")  # every LF now ends a CRLF line
    if data and not data.endswith(b"\n"):
        data += b"\r\n"
    if data.startswith(b"."):
        data = b"." + data
    if _DOT_LINE.search(data) is None:  # faster than bytes.find for a 2-octet needle
        return data
    return data.replace(b"\n.", b"\n..")


def top_of(data: bytes, lines: int) -> bytes:
    """The header and the first C{lines} body lines of a stored message."""
    data = data.replace(b"\r\n", b"\n")
    head_end = data.find(b"\n\n")
    if head_end < 0:
        return data
    cut = head_end + 2
    for _ in range(lines):
        nl = data.find(b"\n", cut)
        if nl < 0:
            return data
        cut = nl + 1
    return data[:cut]


class WireStream:
    """
    L{to_wire} (and, with C{top}, L{top_of}) applied to a message that
    arrives in pieces: the output of L{feed} for every piece followed by
    L{end} is byte-identical to C{to_wire(whole)} (or, for TOP,
    C{lf_to_wire(top_of(whole, top))}), whatever the cuts. C{done} is true once TOP has
    everything it needs, so the rest need not be read.
    """

    def __init__(self, top: int | None = None) -> None:
        self._carry = b""  # a trailing CR, which may begin a CRLF
        self._line_start = True  # the next output octet begins a line
        self._empty = True
        self._top = top  # body lines still wanted; None: no limit
        self._in_header = top is not None
        self._last_lf = False  # (TOP) the last normalised octet was LF
        self.done = False

    def feed(self, chunk: bytes) -> bytes:
        if self.done:
            return b""
        chunk = self._carry + chunk
        if chunk.endswith(b"\r"):
            chunk, self._carry = chunk[:-1], b"\r"
        else:
            self._carry = b""
        if b"\r" in chunk:
            chunk = chunk.replace(b"\r\n", b"\n")
        if self._top is not None:
            chunk = self._cut(chunk)
        return self._encode(chunk)

    def end(self) -> bytes:
        out = b"" if self.done else self._encode(self._carry)
        self._carry = b""
        self.done = True
        if not self._empty and not self._line_start:
            out += b"\r\n"
        return out

    def _cut(self, chunk: bytes) -> bytes:
        """Keep what C{top_of} keeps: LF-normalised C{chunk} up to the wanted lines."""
        pos = 0
        if self._in_header:
            if self._last_lf and chunk.startswith(b"\n"):
                head_end = -1  # the blank line straddles the cut
            else:
                head_end = chunk.find(b"\n\n")
                if head_end < 0:
                    if chunk:
                        self._last_lf = chunk.endswith(b"\n")
                    return chunk
            self._in_header = False
            pos = head_end + 2
        while self._top:
            nl = chunk.find(b"\n", pos)
            if nl < 0:
                return chunk
            pos = nl + 1
            self._top -= 1
        self.done = True
        self._carry = b""
        return chunk[:pos]

    def _encode(self, chunk: bytes) -> bytes:
        if not chunk:
            return b""
        self._empty = False
        chunk = chunk.replace(b"\n", b"\r\n")
        if self._line_start and chunk.startswith(b"."):
            chunk = b"." + chunk
        self._line_start = chunk.endswith(b"\n")
        return chunk.replace(b"\n.", b"\n..")


def read_files(maildir: Maildir, messages: list[MessageFile],
               sizes: list[int]) -> list[bytes | None]:
    """
    Read whole message files (blocking: a pool thread); C{None} for one
    that is gone. One call reads a read-ahead batch, so a session pays one
    thread hand-off per batch instead of one per RETR. C{sizes} (the CRLF
    sizes, never below the stored size) let one read take the whole file.
    """
    out: list[bytes | None] = []
    path = maildir.file_path
    for m, size in zip(messages, sizes):
        try:
            fd = os.open(path(m), os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            out.append(None)
            continue
        try:
            data = os.read(fd, size + 1)
            if len(data) > size:  # larger than its name says: read on to the end
                parts = [data]
                while data:
                    data = os.read(fd, 65536)
                    parts.append(data)
                data = b"".join(parts)
        finally:
            os.close(fd)
        out.append(data)
    return out


def uidl_of(message: MessageFile) -> str:
    """
    A UIDL that never changes for this file: its Maildir unique name, or a
    hash of it where that would break RFC 1939's 70-character limit.
    """
    unique = unique_of(message.name)
    if len(unique) <= 70 and all(0x21 <= ord(c) <= 0x7E for c in unique):
        return unique
    return hashlib.sha256(unique.encode("utf-8", "surrogateescape")).hexdigest()[:40]


@dataclass
class Drop:
    """A locked mailbox as one POP3 session sees it."""

    address: str
    maildir: Maildir
    messages: list[MessageFile]
    sizes: list[int]
    deleted: set[int] = field(default_factory=set)


def open_drop(address: str, maildir: Maildir) -> Drop:
    """Scan a mailbox (blocking): names and sizes only."""
    if not maildir.exists():
        maildir.create()
    maildir.clean_tmp()
    messages = maildir.scan()
    sizes = []
    present = []
    for m in messages:
        try:
            sizes.append(maildir.size(m))
            present.append(m)
        except FileNotFoundError:
            continue  # removed by another client since the scan
    return Drop(address, maildir, present, sizes)


class ReadAhead:
    """Message contents read before their RETR, bounded by L{READ_AHEAD_BYTES}."""

    def __init__(self) -> None:
        self.data: dict[int, bytes | None] = {}
        self.bytes = 0
        self.pending: set[int] = set()  # being read in the pool
        self.waiters: list[tuple[int, int | None, Deferred]] = []  # (message, TOP lines, answer)
        self.window = READ_AHEAD_START

    def put(self, n: int, data: bytes | None) -> None:
        self.data[n] = data
        self.bytes += len(data) if data else 0

    def take(self, n: int) -> bytes | None:
        data = self.data.pop(n)
        self.bytes -= len(data) if data else 0
        return data

    def discard(self, n: int) -> None:
        if n in self.data:
            self.take(n)

    def clear(self) -> None:
        self.data.clear()
        self.bytes = 0


class POP3Server(ScreenedSession):
    """One POP3 session."""

    log = Logger()
    factory: "POP3Factory"
    max_line_length = 1024

    def __init__(self) -> None:
        super().__init__()
        self.drop: Drop | None = None
        self._user: str | None = None
        self._sasl: Callable[[bytes], Any] | None = None
        self._authenticating = False
        self._ahead = ReadAhead()

    def connectionMade(self) -> None:
        f = self.factory
        self.clock = f.clock
        self.idle_timeout = f.config.pop3.idle_timeout
        super().connectionMade()
        if self.open_screen(f.screening, "pop3"):
            self.ok("twisted-mail-screen POP3 ready")

    def refuse(self, reason: str) -> None:
        self.err(f"[SYS/TEMP] {reason}")

    def session_ended(self) -> None:
        self._ahead.clear()
        if self.drop is not None:
            self.factory.locks.discard(self.drop.address)
            self.drop = None
        self.close_screen()

    def ok(self, text: str = "") -> None:
        self.send(f"+OK {text}\r\n".encode() if text else b"+OK\r\n")

    def err(self, text: str) -> None:
        self.send(f"-ERR {text}\r\n".encode())

    def line_too_long(self) -> None:
        self.err("Line too long")

    def timed_out(self) -> None:
        self.err("Disconnected for inactivity")
        self.close()

    def internal_error(self) -> None:
        self.err("[SYS/TEMP] Internal error, closing")
        self.close()

    def line_received(self, line: bytes) -> Deferred | None:
        if self._sasl is not None:
            step, self._sasl = self._sasl, None
            return step(line)
        verb, _, arg = line.decode("utf-8", "replace").partition(" ")
        verb = verb.upper()
        state = "TRANSACTION" if self.drop is not None else "AUTHORIZATION"
        handler = getattr(self, f"{state}_{verb}", None) if verb.isalpha() else None
        if handler is None:
            self.err("Unknown command" if not hasattr(self, f"TRANSACTION_{verb}") and
                     not hasattr(self, f"AUTHORIZATION_{verb}") else f"{verb} not allowed now")
            return None
        return handler(arg)

    # AUTHORIZATION state

    def _plaintext_ok(self) -> bool:
        return self.factory.authenticator.plaintext_allowed(self.peer_host, self.secure)

    def AUTHORIZATION_CAPA(self, arg: str) -> None:
        self.TRANSACTION_CAPA(arg)

    def TRANSACTION_CAPA(self, arg: str) -> None:
        caps = ["TOP", "UIDL", "RESP-CODES", "AUTH-RESP-CODE", "PIPELINING",
                "IMPLEMENTATION twisted-mail-screen"]
        if self.drop is None:
            if self.factory.tls is not None and not self.secure:
                caps.append("STLS")
            if self._plaintext_ok():
                caps += ["USER", "SASL PLAIN"]
        self.send(("+OK Capability list follows\r\n" + "".join(c + "\r\n" for c in caps)
                   + ".\r\n").encode())

    def AUTHORIZATION_STLS(self, arg: str) -> None:
        if self.factory.tls is None or self.secure:
            return self.err("STLS not available")
        self.ok("Begin TLS negotiation")
        self.start_tls(self.factory.tls)
        self._user = None

    def AUTHORIZATION_USER(self, arg: str) -> None:
        if not self._plaintext_ok():
            return self.err("[AUTH] Plaintext authentication disallowed on non-secure connections")
        if not arg:
            return self.err("Syntax: USER name")
        self._user = arg.strip()
        self.ok("Send PASS")

    def AUTHORIZATION_PASS(self, arg: str) -> Deferred | None:
        if self._user is None:
            return self.err("Send USER first")
        user, self._user = self._user, None
        return self._login(user, arg)

    def AUTHORIZATION_AUTH(self, arg: str) -> Deferred | None:
        if not arg:
            self.send(b"+OK\r\nPLAIN\r\n.\r\n")
            return None
        mechanism, _, initial = arg.partition(" ")
        if mechanism.upper() != "PLAIN":
            return self.err("Unsupported authentication mechanism")
        if not self._plaintext_ok():
            return self.err("[AUTH] Plaintext authentication disallowed on non-secure connections")
        if initial and initial != "=":
            return self._auth_plain(initial.encode())
        self._sasl = self._auth_plain
        self.send(b"+ \r\n")
        return None

    def _auth_plain(self, line: bytes) -> Deferred | None:
        try:
            credentials = sasl_plain(line)
        except SASLError as e:
            return self.err(f"Cannot decode response: {e}")
        if credentials is None:
            return self.err("Authentication cancelled")
        return self._login(*credentials)

    def AUTHORIZATION_QUIT(self, arg: str) -> None:
        self.ok("Bye")
        self.close()

    def AUTHORIZATION_NOOP(self, arg: str) -> None:
        self.err("NOOP not allowed before login")

    def _login(self, username: str, password: str) -> Deferred:
        f = self.factory
        d = f.authenticator.authenticate(username, password)

        def checked(address: str | None) -> Deferred | None:
            if address is None:
                self.err("[AUTH] Authentication failed")
                if self.auth_failed(username, password):
                    self.close()
                return None
            self.auth_succeeded(address)
            if address in f.locks:
                self.err("[IN-USE] Mailbox is locked by another POP3 session")
                return None
            f.locks.add(address)
            opened = f.blocking.run(open_drop, address, f.store.maildir(address))
            return opened.addCallbacks(self._opened, self._open_failed, errbackArgs=(address,))

        return d.addCallback(checked)

    def _opened(self, drop: Drop) -> None:
        if self._closing:
            self.factory.locks.discard(drop.address)
            return
        self.drop = drop
        self.ok(f"Logged in, {len(drop.messages)} messages ({sum(drop.sizes)} octets)")

    def _open_failed(self, reason: Any, address: str) -> None:
        self.factory.locks.discard(address)
        self.log.failure("pop3: cannot open mailbox {address}", reason, address=address)
        self.err("[SYS/TEMP] Cannot open mailbox")

    # TRANSACTION state

    def _message(self, arg: str) -> int | None:
        """The 0-based index of a live message named by C{arg}, else reply."""
        assert self.drop is not None
        words = arg.split()
        n = _number(words[0]) if words else None
        if n is None:
            self.err("Syntax error: message number expected")
            return None
        n -= 1
        if not 0 <= n < len(self.drop.messages) or n in self.drop.deleted:
            self.err("No such message")
            return None
        return n

    def TRANSACTION_STAT(self, arg: str) -> None:
        drop = self.drop
        assert drop is not None
        live = [i for i in range(len(drop.messages)) if i not in drop.deleted]
        self.ok(f"{len(live)} {sum(drop.sizes[i] for i in live)}")

    def _listing(self, arg: str, value: Callable[[int], str]) -> None:
        drop = self.drop
        assert drop is not None
        if arg.strip():
            n = self._message(arg)
            if n is not None:
                self.ok(f"{n + 1} {value(n)}")
            return
        lines = [f"{i + 1} {value(i)}\r\n" for i in range(len(drop.messages)) if i not in drop.deleted]
        self.send(("+OK\r\n" + "".join(lines) + ".\r\n").encode())

    def TRANSACTION_LIST(self, arg: str) -> None:
        assert self.drop is not None
        sizes = self.drop.sizes
        self._listing(arg, lambda i: str(sizes[i]))

    def TRANSACTION_UIDL(self, arg: str) -> None:
        assert self.drop is not None
        messages = self.drop.messages
        self._listing(arg, lambda i: uidl_of(messages[i]))

    # RETR and TOP.
    #
    # A small message (up to SMALL_MESSAGE octets) comes from the session's
    # read-ahead: one pool call reads it and the next few live messages in
    # one go, and the following RETRs are answered from memory without a
    # thread hand-off; while a client keeps reading in order, the next batch
    # is read in the background once half of the current one is used. The
    # reactor itself never opens or reads a file, so a cold page cache or a
    # slow disk stalls only this session, never the others. A large message
    # is streamed: a chunk is read in the pool, sent, and the next one is
    # read only once the client has taken the last (the output gate of
    # lineproto), so memory per session stays bounded whatever the size.

    def _send_message(self, n: int, top: int | None) -> Deferred | None:
        drop = self.drop
        assert drop is not None
        if drop.sizes[n] > SMALL_MESSAGE:
            return self._stream(n, top)
        ahead = self._ahead
        if n in ahead.data:
            self._answer(ahead.take(n), top)
            self._read_ahead(n + 1, False)
            return None
        if n in ahead.pending:
            d: Deferred = Deferred()
            ahead.waiters.append((n, top, d))
            return d
        d = Deferred()
        ahead.waiters.append((n, top, d))
        self._read_ahead(n, True)
        return d

    def _answer(self, data: bytes | None, top: int | None) -> None:
        if data is None:
            self.err("Message was removed by another client")
            return
        wire = to_wire(data) if top is None else lf_to_wire(top_of(data, top))
        self.send(b"".join((b"+OK message follows\r\n", wire, b".\r\n")))

    def _read_ahead(self, n: int, needed: bool) -> None:
        """
        Read live message C{n} and the ones after it into the read-ahead, in
        one pool call. Unless C{needed} (a RETR waits for C{n}), only when
        less than half a batch is left and no read is in flight.
        """
        drop = self.drop
        ahead = self._ahead
        if drop is None or self._closing:
            return
        if not needed:
            if ahead.pending or len(ahead.data) * 2 > ahead.window:
                return
            n = max(ahead.data, default=n - 1) + 1
        picked: list[int] = []
        budget = READ_AHEAD_BYTES - ahead.bytes
        sizes, deleted, count = drop.sizes, drop.deleted, len(drop.messages)
        while n < count and len(picked) < ahead.window:
            if n not in deleted and n not in ahead.data and n not in ahead.pending:
                if sizes[n] > SMALL_MESSAGE or (picked and sizes[n] > budget):
                    break
                budget -= sizes[n]
                picked.append(n)
            n += 1
        if not picked:
            return
        ahead.window = min(READ_AHEAD_MESSAGES, ahead.window * 2)
        ahead.pending.update(picked)
        messages = drop.messages
        d = self.factory.blocking.run(read_files, drop.maildir, [messages[i] for i in picked],
                                      [sizes[i] for i in picked])
        d.addCallbacks(self._read_done, self._read_failed, callbackArgs=(picked,),
                       errbackArgs=(picked,))

    def _read_done(self, contents: list[bytes | None], picked: list[int]) -> None:
        ahead = self._ahead
        ahead.pending.difference_update(picked)
        if self.drop is not None and not self._closing:
            deleted = self.drop.deleted
            for i, data in zip(picked, contents):
                if i not in deleted:
                    ahead.put(i, data)
        with self.corked():  # the waiting RETR and the pipelined ones after it: few sends
            self._wake_waiters(None)

    def _read_failed(self, reason: Failure, picked: list[int]) -> None:
        # A RETR waiting on this batch gets the error (and the session is
        # closed as for any failed command); with no waiter it is dropped, and
        # the RETR that later needs one of these messages reads it again.
        self._ahead.pending.difference_update(picked)
        self._wake_waiters(reason)

    def _wake_waiters(self, reason: Failure | None) -> None:
        ahead = self._ahead
        waiters, ahead.waiters = ahead.waiters, []
        for n, top, d in waiters:
            if n in ahead.pending:
                ahead.waiters.append((n, top, d))  # in a batch still being read
            elif reason is not None:
                d.errback(reason)
            elif n in ahead.data:
                self._answer(ahead.take(n), top)
                d.callback(None)
            else:  # not reachable while commands are answered one at a time
                self.err("No such message")
                d.callback(None)

    def _stream(self, n: int, top: int | None) -> Deferred:
        """Send a large message chunk by chunk, waiting for the client between chunks."""
        drop = self.drop
        assert drop is not None
        path = drop.maildir.file_path(drop.messages[n])
        run = self.factory.blocking.run
        encoder = WireStream(top)
        done: Deferred = Deferred()
        handle: list[Any] = []

        def opened(f: Any) -> None:
            handle.append(f)
            self.send(b"+OK message follows\r\n")
            next_chunk()

        def not_opened(reason: Failure) -> None:
            if reason.check(FileNotFoundError):
                self.err("Message was removed by another client")
                done.callback(None)
            else:
                done.errback(reason)

        def next_chunk() -> None:
            if self._closing:
                finish(None)
            else:
                run(handle[0].read, STREAM_CHUNK).addCallbacks(got, finish)

        def got(chunk: bytes) -> None:
            if self._closing:
                return finish(None)
            self._reset_timer()  # a long download to a slow reader is not idleness
            if chunk:
                self.send(encoder.feed(chunk))
            if not chunk or encoder.done:
                self.send(encoder.end() + b".\r\n")
                return finish(None)
            if self.output.paused:
                self.output.waiter = next_chunk  # called once it drains or the peer goes
            else:
                next_chunk()

        def finish(result: Failure | None) -> None:
            if handle:
                handle.pop().close()
            if result is None:
                done.callback(None)
            else:
                done.errback(result)

        run(open, path, "rb", buffering=0).addCallbacks(opened, not_opened)
        return done

    def TRANSACTION_RETR(self, arg: str) -> Deferred | None:
        n = self._message(arg)
        return None if n is None else self._send_message(n, None)

    def TRANSACTION_TOP(self, arg: str) -> Deferred | None:
        parts = arg.split()
        lines = _number(parts[1]) if len(parts) == 2 else None
        if lines is None:
            return self.err("Syntax: TOP msg lines")
        n = self._message(parts[0])
        return None if n is None else self._send_message(n, lines)

    def TRANSACTION_DELE(self, arg: str) -> None:
        n = self._message(arg)
        if n is not None:
            assert self.drop is not None
            self.drop.deleted.add(n)
            self._ahead.discard(n)
            self.ok(f"Message {n + 1} deleted")

    def TRANSACTION_RSET(self, arg: str) -> None:
        assert self.drop is not None
        self.drop.deleted.clear()
        self.ok()

    def TRANSACTION_NOOP(self, arg: str) -> None:
        self.ok()

    def TRANSACTION_QUIT(self, arg: str) -> Deferred:
        drop = self.drop
        assert drop is not None
        doomed = [drop.messages[i] for i in sorted(drop.deleted)]

        def update() -> int:
            for m in doomed:
                drop.maildir.remove(m)
            return len(doomed)

        def done(count: int) -> None:
            self.ok(f"Bye, {count} messages deleted")
            self.close()

        def failed(reason: Any) -> None:
            self.log.failure("pop3: UPDATE failed for {address}", reason, address=drop.address)
            self.err("[SYS/TEMP] Some deleted messages were not removed")
            self.close()

        return self.factory.blocking.run(update).addCallbacks(done, failed)


class POP3Factory(Factory):
    """Builds POP3 sessions; C{locks} is shared by every POP3 listener."""

    protocol = POP3Server
    noisy = False

    def __init__(self, *, config: Config, store: MailStore, blocking: Blocking,
                 authenticator: Authenticator, screening: Screening, clock: IReactorTime,
                 locks: set[str], tls: Any = None) -> None:
        self.config = config
        self.store = store
        self.blocking = blocking
        self.authenticator = authenticator
        self.screening = screening
        self.clock = clock
        self.locks = locks
        self.tls = tls
