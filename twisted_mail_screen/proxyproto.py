# -*- test-case-name: tests.test_screening_sockets -*-
"""
PROXY-protocol listeners (C{haproxy:...} endpoint strings) that hand a
connection to the mail protocol only once the PROXY header has been read.

Twisted's own wrapper starts the wrapped protocol as soon as the TCP
connection opens, so the greeting, and the screening decision, would be
made on the load balancer's address. Here the session starts after the
header, so C{getPeer()} is the real client from the first moment. A client
that sends no header within C{header_timeout} seconds is dropped.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.interfaces import IReactorTime, IStreamServerEndpoint
from twisted.internet.protocol import Protocol
from twisted.protocols.haproxy._wrapper import HAProxyProtocolWrapper
from twisted.protocols.policies import WrappingFactory
from zope.interface import directlyProvides, implementer, providedBy

HEADER_TIMEOUT = 30.0


class _Held(Protocol):
    """Stands in for the mail protocol while the header is parsed."""

    def __init__(self) -> None:
        self.data: list[bytes] = []

    def dataReceived(self, data: bytes) -> None:
        self.data.append(data)


class _HeaderFirst(HAProxyProtocolWrapper):
    factory: "_HeaderFirstFactory"

    def makeConnection(self, transport: Any) -> None:
        directlyProvides(self, providedBy(transport))
        Protocol.makeConnection(self, transport)
        self.factory.registerProtocol(self)
        self._started = False
        self._timer = self.factory.clock.callLater(self.factory.header_timeout, self.loseConnection)

    def dataReceived(self, data: bytes) -> None:
        if self._started:
            return self.wrappedProtocol.dataReceived(data)
        wrapped, held = self.wrappedProtocol, _Held()
        self.wrappedProtocol = held
        try:
            super().dataReceived(data)
        finally:
            self.wrappedProtocol = wrapped
        if self._proxyInfo is not None and not self.disconnecting:
            self._started = True
            if self._timer.active():
                self._timer.cancel()
            wrapped.makeConnection(self)
            for chunk in held.data:
                wrapped.dataReceived(chunk)

    def connectionLost(self, reason: Any) -> None:
        if self._timer.active():
            self._timer.cancel()
        if self._started:
            super().connectionLost(reason)
        else:
            self.factory.unregisterProtocol(self)


class _HeaderFirstFactory(WrappingFactory):
    protocol = _HeaderFirst
    noisy = False

    def __init__(self, wrapped: Any, clock: IReactorTime, header_timeout: float) -> None:
        super().__init__(wrapped)
        self.clock = clock
        self.header_timeout = header_timeout


@implementer(IStreamServerEndpoint)
class ProxiedEndpoint:
    """An endpoint whose connections start with a PROXY v1/v2 header."""

    def __init__(self, inner: IStreamServerEndpoint, clock: IReactorTime,
                 header_timeout: float = HEADER_TIMEOUT) -> None:
        self._inner = inner
        self._clock = clock
        self._timeout = header_timeout

    def listen(self, factory: Any) -> Any:
        return self._inner.listen(_HeaderFirstFactory(factory, self._clock, self._timeout))


def server_endpoint(reactor: Any, description: str, clock: IReactorTime) -> IStreamServerEndpoint:
    """C{serverFromString}, with C{haproxy:} prefixes handled as above."""
    from twisted.internet.endpoints import serverFromString

    if description.startswith("haproxy:"):
        return ProxiedEndpoint(server_endpoint(reactor, description[len("haproxy:"):], clock), clock)
    return serverFromString(reactor, description)
