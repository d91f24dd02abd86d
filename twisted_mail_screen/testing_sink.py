# -*- test-case-name: tests.test_pytest_plugin -*-
"""
A scriptable capture SMTP sink on loopback: it plays the remote MX or
the smarthost of a server under test, records every transaction
(L{Received}: envelope, data as sent, whether over TLS, the AUTH used),
and answers what the test's policy says (4xx, 5xx, no STARTTLS, a held
greeting). The pytest plugin points a server's smarthost at one
(C{mailserver(relay_sink=True)}, C{mailserver.relayed}); the project's
relay and queue tests use it through C{tests/relay_sink.py}.

It runs in the reactor thread of L{twisted_mail_screen.testing}; its
lists are appended to there and read from the test's thread.
"""

from __future__ import annotations

import base64
from dataclasses import dataclass, field
from typing import Any, Callable

from twisted.internet import defer
from twisted.internet.protocol import Factory, Protocol

from twisted_mail_screen.testing import in_reactor


@dataclass
class Received:
    sender: str
    recipients: list[str]
    data: bytes
    secure: bool
    auth: str | None


@dataclass
class Sink:
    """
    C{policy(stage, arg, sink)} returns a reply line ("451 4.3.0 busy") to
    override the default answer, or C{None}. Stages: "connect", "starttls",
    "mail", "rcpt", "data". At "starttls", C{BREAK} answers 220 and then
    drops the connection instead of starting TLS (a broken handshake).
    """

    policy: Callable[[str, str, "Sink"], str | None] = lambda stage, arg, sink: None
    #: a policy answer of STALL means "never answer" (the client must time out or die)
    tls: Any = None  # server context for STARTTLS
    implicit_tls: Any = None  # server context for an implicit-TLS listener
    offer_starttls: bool = True
    auth_mechanisms: str = "PLAIN LOGIN"  # the EHLO AUTH parameter
    extensions: tuple[str, ...] = ()  # more EHLO keywords ("SMTPUTF8", "DSN"); offered only
    messages: list[Received] = field(default_factory=list)
    connections: int = 0
    active: int = 0
    max_active: int = 0
    transactions_per_connection: list[int] = field(default_factory=list)
    gate: Any = None  # a Deferred: greet only once it has fired
    port: int = 0
    interface: str = "127.0.0.1"  # "::1" for an IPv6 sink, "127.0.0.2" for a second host
    listen_port: int = 0  # 0: chosen by the OS
    stalled: list[str] = field(default_factory=list)
    commands: list[str] = field(default_factory=list)  # every command line, exactly as received
    _listening: Any = None

    def start(self) -> "Sink":
        def listen() -> Any:
            from twisted.internet import reactor
            factory = Factory.forProtocol(lambda: SinkProtocol(self))
            if self.implicit_tls is not None:
                return reactor.listenSSL(self.listen_port, factory, self.implicit_tls,
                                         interface=self.interface)
            return reactor.listenTCP(self.listen_port, factory, interface=self.interface)

        self._listening = in_reactor(listen)
        self.port = self._listening.getHost().port
        return self

    def stop(self) -> None:
        if self._listening is not None:
            in_reactor(self._listening.stopListening)
            self._listening = None

    def hold_greeting(self) -> None:
        self.gate = defer.Deferred()

    def open_gate(self) -> None:
        gate, self.gate = self.gate, None
        in_reactor(lambda: gate.callback(None))

    def recipients(self) -> list[str]:
        return [r for m in self.messages for r in m.recipients]


STALL = "STALL"
BREAK = "BREAK"


class SinkProtocol(Protocol):
    def __init__(self, sink: Sink) -> None:
        self.sink = sink
        self.buffer = b""
        self.data: bytes | None = None
        self.sender: str | None = None
        self.rcpts: list[str] = []
        self.secure = sink.implicit_tls is not None
        self.auth: str | None = None
        self.login: list[str] | None = None
        self.count = 0

    def connectionMade(self) -> None:
        self.sink.connections += 1
        self.sink.active += 1
        self.sink.max_active = max(self.sink.max_active, self.sink.active)
        if self.sink.gate is not None:
            self.sink.gate.addCallback(lambda _: self.greet())
        else:
            self.greet()

    def greet(self) -> None:
        override = self.sink.policy("connect", "", self.sink)
        self.say(override or "220 sink.test ESMTP")
        if override and override.startswith(("4", "5")):
            self.transport.loseConnection()

    def connectionLost(self, reason: Any = None) -> None:
        self.sink.active -= 1
        self.sink.transactions_per_connection.append(self.count)

    def say(self, line: str) -> None:
        if line == STALL:
            self.sink.stalled.append(self.sender or "")
            return
        self.transport.write(line.encode() + b"\r\n")

    def dataReceived(self, data: bytes) -> None:
        self.buffer += data
        while True:
            if self.data is not None:
                end = self.buffer.find(b"\r\n.\r\n")
                if end < 0:
                    return
                self.data += self.buffer[:end + 2]
                self.buffer = self.buffer[end + 5:]
                self.finish_data()
                continue
            end = self.buffer.find(b"\r\n")
            if end < 0:
                return
            line, self.buffer = self.buffer[:end].decode(), self.buffer[end + 2:]
            self.sink.commands.append(line)
            self.command(line)

    def command(self, line: str) -> None:
        if self.login is not None:  # AUTH LOGIN: the username, then the password
            self.login.append(base64.b64decode(line).decode())
            if len(self.login) == 1:
                self.say("334 UGFzc3dvcmQ6")
                return
            self.auth = "LOGIN " + ":".join(self.login)
            self.login = None
            self.say(self.sink.policy("auth", self.auth, self.sink) or "235 2.7.0 ok")
            return
        verb, _, arg = line.partition(" ")
        verb = verb.upper()
        policy = self.sink.policy
        if verb == "EHLO":
            lines = ["sink.test", "PIPELINING", "SIZE 10000000", "8BITMIME",
                     f"AUTH {self.sink.auth_mechanisms}", *self.sink.extensions]
            if self.sink.tls is not None and self.sink.offer_starttls and not self.secure:
                lines.append("STARTTLS")
            self.say("\r\n".join(f"250-{l}" for l in lines[:-1]) + f"\r\n250 {lines[-1]}")
        elif verb == "HELO":
            self.say("250 sink.test")
        elif verb == "STARTTLS":
            override = policy("starttls", "", self.sink)
            if override == BREAK:
                self.say("220 2.0.0 go ahead")
                self.transport.loseConnection()  # the client's handshake meets EOF
                return
            if override:
                self.say(override)
                return
            self.say("220 2.0.0 go ahead")
            self.transport.startTLS(self.sink.tls)
            self.secure = True
            self.buffer = b""
        elif verb == "AUTH":
            mech, _, token = arg.partition(" ")
            if mech.upper() == "LOGIN":
                self.login = []
                self.say("334 VXNlcm5hbWU6")
                return
            self.auth = base64.b64decode(token).decode() if token else mech
            self.say(policy("auth", self.auth, self.sink) or "235 2.7.0 ok")
        elif verb == "MAIL":
            self.sender = arg[arg.index("<") + 1:arg.index(">")]
            self.rcpts = []
            self.say(policy("mail", self.sender, self.sink) or "250 2.1.0 ok")
        elif verb == "RCPT":
            rcpt = arg[arg.index("<") + 1:arg.index(">")]
            reply = policy("rcpt", rcpt, self.sink) or "250 2.1.5 ok"
            if reply.startswith("2"):
                self.rcpts.append(rcpt)
            self.say(reply)
        elif verb == "DATA":
            self.data = b""
            self.say("354 go")
        elif verb == "RSET":
            self.sender, self.rcpts = None, []
            self.say("250 2.0.0 ok")
        elif verb == "QUIT":
            self.say("221 2.0.0 bye")
            self.transport.loseConnection()
        else:
            self.say("250 2.0.0 ok")

    def finish_data(self) -> None:
        data, self.data = self.data, None
        assert data is not None
        reply = self.sink.policy("data", ",".join(self.rcpts), self.sink) or "250 2.0.0 queued"
        if reply.startswith("2"):
            body = data.replace(b"\r\n..", b"\r\n.")
            self.sink.messages.append(Received(self.sender or "", list(self.rcpts), body,
                                               self.secure, self.auth))
            self.count += 1
        self.say(reply)
