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
from dataclasses import dataclass, field
from typing import Any, Callable

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.internet.protocol import Factory
from twisted.logger import Logger

from twisted_mail_screen.auth import Authenticator, SASLError, decode_base64, parse_sasl_plain
from twisted_mail_screen.config import Config
from twisted_mail_screen.interfaces import ClientScreen, Screening
from twisted_mail_screen.lineproto import CommandProtocol
from twisted_mail_screen.maildir import Maildir, MailStore, MessageFile
from twisted_mail_screen.workers import Blocking


def to_wire(data: bytes) -> bytes:
    """A stored message as CRLF lines, dot-stuffed (RFC 1939 section 3)."""
    data = data.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")
    if data and not data.endswith(b"\r\n"):
        data += b"\r\n"
    if data.startswith(b"."):
        data = b"." + data
    return data.replace(b"\r\n.", b"\r\n..")


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


def uidl_of(message: MessageFile) -> str:
    """
    A UIDL that never changes for this file: its Maildir unique name, or a
    hash of it where that would break RFC 1939's 70-character limit.
    """
    unique = message.base.split(",", 1)[0]
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


class POP3Server(CommandProtocol):
    """One POP3 session."""

    log = Logger()
    factory: "POP3Factory"
    max_line_length = 1024

    def __init__(self) -> None:
        super().__init__()
        self.secure = False
        self.peer_host = ""
        self.screen: ClientScreen | None = None
        self.drop: Drop | None = None
        self._user: str | None = None
        self._sasl: Callable[[bytes], Any] | None = None
        self._authenticating = False

    def connectionMade(self) -> None:
        f = self.factory
        self.clock = f.clock
        self.idle_timeout = f.config.pop3.idle_timeout
        super().connectionMade()
        self.peer_host = getattr(self.transport.getPeer(), "host", "") or ""
        self.screen = f.screening.open(self.peer_host, "pop3")
        if self.screen.refusal is not None:
            self.send(f"-ERR [SYS/TEMP] {self.screen.refusal}\r\n".encode())
            self.close()
            return
        self.ok("twisted-mail-screen POP3 ready")

    def session_ended(self) -> None:
        if self.drop is not None:
            self.factory.locks.discard(self.drop.address)
            self.drop = None
        if self.screen is not None:
            self.screen.closed()
            self.screen = None

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
        self.discard_input()
        self.transport.startTLS(self.factory.tls)
        self.secure = True
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
        if line.strip() == b"*":
            return self.err("Authentication cancelled")
        try:
            username, password = parse_sasl_plain(decode_base64(line.strip()))
        except SASLError as e:
            return self.err(f"Cannot decode response: {e}")
        return self._login(username, password)

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
                if self.screen is not None and self.screen.auth_failed(username, password.encode()):
                    self.close()
                return None
            if self.screen is not None:
                self.screen.auth_succeeded(address)
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
        try:
            n = int(arg.split()[0]) - 1
        except (ValueError, IndexError):
            self.err("Syntax error: message number expected")
            return None
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

    def _send_message(self, n: int, transform: Callable[[bytes], bytes]) -> Deferred:
        drop = self.drop
        assert drop is not None
        path = drop.maildir.file_path(drop.messages[n])

        def read() -> bytes:
            with open(path, "rb") as f:
                return to_wire(transform(f.read()))

        def send(wire: bytes) -> None:
            self.send(b"+OK message follows\r\n")
            self.send(wire)
            self.send(b".\r\n")

        def gone(reason: Any) -> None:
            reason.trap(FileNotFoundError)
            self.err("Message was removed by another client")

        return self.factory.blocking.run(read).addCallbacks(send, gone)

    def TRANSACTION_RETR(self, arg: str) -> Deferred | None:
        n = self._message(arg)
        return None if n is None else self._send_message(n, lambda data: data)

    def TRANSACTION_TOP(self, arg: str) -> Deferred | None:
        parts = arg.split()
        if len(parts) != 2 or not parts[1].isdigit():
            return self.err("Syntax: TOP msg lines")
        n = self._message(parts[0])
        lines = int(parts[1])
        return None if n is None else self._send_message(n, lambda data: top_of(data, lines))

    def TRANSACTION_DELE(self, arg: str) -> None:
        n = self._message(arg)
        if n is not None:
            assert self.drop is not None
            self.drop.deleted.add(n)
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
