# -*- test-case-name: tests.test_pop3 -*-
"""
What every mail session does the same way, whatever its protocol: learn
the peer's address, ask the screening service whether it may be served,
answer a refusal in its own words, report authentication results, and
decode a SASL PLAIN response.

A protocol's session subclasses L{ScreenedSession} (itself the command
loop of L{lineproto}) and uses it in three places:

    def connectionMade(self):
        ...set clock and idle_timeout...
        super().connectionMade()
        if not self.open_screen(self.factory.screening, "pop3"):
            return              # refused: refuse() has answered, the session closes
        ...send the greeting...

    def refuse(self, reason):   # the protocol's refusal reply, e.g.
        self.send(f"-ERR [SYS/TEMP] {reason}\\r\\n".encode())

    def session_ended(self):
        ...
        self.close_screen()

and, for AUTH PLAIN, L{sasl_plain} turns the client's response line into
C{(username, password)}. The STARTTLS step is L{CommandProtocol.start_tls}.
Its factory subclasses L{SessionFactory}, which holds the services every
protocol's sessions ask (config, authenticator, screening, clock, tls,
faults).
"""

from __future__ import annotations

from typing import Any, Protocol

from twisted.internet.interfaces import IReactorTime
from twisted.internet.protocol import Factory

from twisted_mail_screen.config.settings import Config
from twisted_mail_screen.faults.plan import FaultPlan
from twisted_mail_screen.protocols.lineproto import CommandProtocol
from twisted_mail_screen.screening.interfaces import ClientScreen, Screening
from twisted_mail_screen.store.auth import Authenticator, SASLError, decode_base64, parse_sasl_plain

__all__ = ["ScreenedSession", "SASLError", "SessionFactory", "SessionObserver", "peer_host",
           "sasl_plain"]


def peer_host(transport: Any) -> str:
    """The peer's IP address as text; C{""} where there is none (a UNIX socket)."""
    return getattr(transport.getPeer(), "host", "") or ""


def sasl_plain(line: bytes) -> tuple[str, str] | None:
    """
    The C{(username, password)} of a base64 RFC 4616 PLAIN response, or
    C{None} when the client cancelled with C{*} (RFC 4954 4, RFC 5034 4,
    RFC 3501 6.2.2). Surrounding white space is ignored.

    @raise SASLError: not base64, not three NUL-separated UTF-8 fields, or an
        authorization identity other than the username; its text says which,
        for the protocol's "Cannot decode response" reply.
    """
    line = line.strip()
    if line == b"*":
        return None
    return parse_sasl_plain(decode_base64(line))


class SessionObserver(Protocol):
    """
    Told of what every session shares, for the server's metrics
    (L{twisted_mail_screen.runtime.metrics.ServerMetrics}).
    """

    def connection(self, protocol: str, accepted: bool) -> None:
        """A connection was screened: served (C{accepted}) or refused."""

    def auth_failed(self, protocol: str) -> None:
        """A login failed."""


class _Unobserved:
    def connection(self, protocol: str, accepted: bool) -> None:
        pass

    def auth_failed(self, protocol: str) -> None:
        pass


class SessionFactory(Factory):
    """
    The services every protocol's factory holds for its sessions: the
    settings, the login check, the screening service, the clock, the TLS
    context (C{None}: no STARTTLS) and, on a test host only, the injected
    faults (docs/faults.md). A protocol's factory takes its own services as
    keywords and passes these on.
    """

    noisy = False
    #: Set by the composition root (the server's metrics); nobody by default.
    observer: SessionObserver = _Unobserved()

    def __init__(self, *, config: Config, authenticator: Authenticator, screening: Screening,
                 clock: IReactorTime, tls: Any = None, faults: FaultPlan | None = None) -> None:
        self.config = config
        self.authenticator = authenticator
        self.screening = screening
        self.clock = clock
        self.tls = tls
        self.faults = faults


class ScreenedSession(CommandProtocol):
    """
    A command-loop session seen by the screening service.

    @ivar peer_host: the client's address (C{""} on a UNIX socket), set by
        L{open_screen}.
    @ivar screen: what the screening service watches for this connection,
        from L{open_screen} until L{close_screen}; C{None} outside that.
    """

    def __init__(self) -> None:
        super().__init__()
        self.peer_host = ""
        self.protocol_name = ""
        self.screen: ClientScreen | None = None

    def refuse(self, reason: str) -> None:
        """Send the protocol's refusal reply carrying C{reason} (the session closes after)."""
        raise NotImplementedError

    def open_screen(self, screening: Screening, protocol: str) -> bool:
        """
        Ask C{screening} whether this peer may be served over C{protocol}.
        C{False}: it may not, L{refuse} has answered and the session is
        closing, so the caller sends no greeting.
        """
        self.peer_host = peer_host(self.transport)
        self.screen = screening.open(self.peer_host, protocol)
        self.protocol_name = protocol
        self.observer().connection(protocol, self.screen.refusal is None)
        if self.screen.refusal is not None:
            self.refuse(self.screen.refusal)
            self.close()
            return False
        watch = getattr(self.screen, "watch", None)
        if watch is not None:  # a cluster backend's late answer (screening/redis_backend.py)
            watch(self.refuse_late)
        return True

    def refuse_late(self, reason: str) -> None:
        """Refuse a session already greeted (the cluster's count came back over the limit)."""
        if self.screen is not None:
            self.refuse(reason)
            self.close()

    def close_screen(self) -> None:
        """Tell the screening service the connection is gone (once)."""
        screen, self.screen = self.screen, None
        if screen is not None:
            screen.closed()

    def auth_succeeded(self, address: str) -> None:
        if self.screen is not None:
            self.screen.auth_succeeded(address)

    def observer(self) -> SessionObserver:
        factory = self.factory
        return factory.observer if isinstance(factory, SessionFactory) else _Unobserved()

    def auth_failed(self, username: str, password: str) -> bool:
        """Report a failed login; C{True} when the screening says to close the session."""
        self.observer().auth_failed(self.protocol_name)
        return self.screen is not None and self.screen.auth_failed(username, password.encode("utf-8"))
