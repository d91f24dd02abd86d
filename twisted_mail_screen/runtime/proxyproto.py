# -*- test-case-name: tests.test_proxy -*-
"""
PROXY-protocol listeners (C{haproxy:...} endpoint strings) that hand a
connection to the mail protocol only once the PROXY header has been read,
and only when the connection comes from a trusted proxy (C{proxy.trusted}).

Twisted's public C{twisted.protocols.haproxy} exports only C{proxyEndpoint},
whose wrapper starts the mail protocol as the TCP connection opens
(so the greeting, and the screening decision, would be made on the load
balancer's address), accepts a header from any peer, and reports an empty
v1 source or a v2 AF_UNIX source as the peer C{""}. Its parsers live in
private modules. So the header is parsed here, strictly: a v1 line is at
most 107 bytes including CRLF, a v2 header at most 16 + 65,535 bytes, and
only a listed proxy gets that far.

A header whose framing is wrong closes the connection. LOCAL commands,
UNKNOWN, AF_UNIX, datagram and unspecified sources, and a source that is
not a valid address of its family (an empty field, say) leave the session
on the proxy's own address: C{getPeer()} is never empty.
"""

from __future__ import annotations

import ipaddress
import struct
from dataclasses import dataclass
from typing import Any

from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.interfaces import IAddress, IReactorTime, IStreamServerEndpoint
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from twisted.protocols.policies import ProtocolWrapper, WrappingFactory
from zope.interface import directlyProvides, implementer, providedBy

from twisted_mail_screen.screening.netmatch import Network, NetworkIndex, parse_host

HEADER_TIMEOUT = 30.0

V1_PREFIX = b"PROXY "
V1_MAX = 107  # the spec's worst case: "PROXY UNKNOWN" + two full IPv6 addresses and ports + CRLF
V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
V2_FIXED = 16
# v2 address block sizes (spec 2.2): IPv4, IPv6 and AF_UNIX source + destination
_V2_INET, _V2_INET6, _V2_UNIX = 12, 36, 216

log = Logger()


class BadHeader(Exception):
    """The bytes are not a PROXY v1 or v2 header."""


@dataclass(frozen=True)
class Header:
    """
    A parsed header. C{source} is the client's address, or C{None} when the
    session keeps the proxy's own address; C{note} says why, for the log.
    """

    source: IAddress | None
    note: str = ""


def _v1_address(family: str, host: str, port: str) -> IAddress | None:
    if "%" in host or not port.isascii() or not port.isdigit():
        return None
    if (port != "0" and port.startswith("0")) or int(port) > 65535:
        return None
    try:
        if family == "TCP4":
            return IPv4Address("TCP", str(ipaddress.IPv4Address(host)), int(port))
        return IPv6Address("TCP", str(ipaddress.IPv6Address(host)), int(port))
    except ValueError:
        return None


def _parse_v1(line: bytes) -> Header:
    try:
        parts = line.decode("ascii").split(" ")
    except UnicodeDecodeError:
        raise BadHeader("v1 header is not ASCII") from None
    if len(parts) < 2:
        raise BadHeader("v1 header has no protocol")
    if parts[1] == "UNKNOWN":
        return Header(None, "UNKNOWN")
    if parts[1] not in ("TCP4", "TCP6"):
        raise BadHeader(f"v1 protocol {parts[1][:8]!r}")
    if len(parts) != 6:
        raise BadHeader("v1 header needs four address fields")
    source = _v1_address(parts[1], parts[2], parts[4])
    if source is None or _v1_address(parts[1], parts[3], parts[5]) is None:
        return Header(None, f"unusable address in {line[6:].decode('ascii')!r}")
    return Header(source)


def _parse_v2(command: int, family: int, transport: int, block: bytes) -> Header:
    if command == 0:
        return Header(None, "LOCAL")
    if family == 3:
        if len(block) < _V2_UNIX:
            raise BadHeader("v2 AF_UNIX address block too short")
        return Header(None, "AF_UNIX")
    if family == 0 or transport != 1:
        return Header(None, "not a TCP connection")
    size = _V2_INET if family == 1 else _V2_INET6
    if len(block) < size:
        raise BadHeader("v2 address block too short")
    half = (size - 4) // 2
    port = struct.unpack("!H", block[2 * half:2 * half + 2])[0]
    if family == 1:
        return Header(IPv4Address("TCP", str(ipaddress.IPv4Address(block[:half])), port))
    return Header(IPv6Address("TCP", str(ipaddress.IPv6Address(block[:half])), port))


class HeaderReader:
    """
    Incremental parser: feed it bytes until it returns the header and the
    bytes that followed it. Buffers at most one header.
    """

    def __init__(self) -> None:
        self._buffer = b""

    def feed(self, data: bytes) -> tuple[Header, bytes] | None:
        """
        @return: C{(header, rest)} once the header is complete, else C{None}.
        @raise BadHeader: as the bytes cannot start a valid header.
        """
        buf = self._buffer = self._buffer + data
        if buf[:1] == V2_SIGNATURE[:1]:
            return self._v2(buf)
        if buf[:6] != V1_PREFIX[:len(buf)]:
            raise BadHeader("no PROXY signature")
        end = buf.find(b"\r\n", 0, V1_MAX)
        if end < 0:
            if len(buf) >= V1_MAX:
                raise BadHeader("v1 header longer than 107 bytes")
            return None
        return _parse_v1(buf[:end]), buf[end + 2:]

    def _v2(self, buf: bytes) -> tuple[Header, bytes] | None:
        if buf[:12] != V2_SIGNATURE[:len(buf)]:
            raise BadHeader("no PROXY signature")
        if len(buf) < V2_FIXED:
            return None
        version, command = buf[12] >> 4, buf[12] & 0x0F
        family, transport = buf[13] >> 4, buf[13] & 0x0F
        if version != 2 or command > 1:
            raise BadHeader(f"v2 version/command byte {buf[12]:#04x}")
        if family > 3 or transport > 2:
            raise BadHeader(f"v2 family/transport byte {buf[13]:#04x}")
        end = V2_FIXED + struct.unpack("!H", buf[14:16])[0]
        if len(buf) < end:
            return None
        return _parse_v2(command, family, transport, buf[V2_FIXED:end]), buf[end:]


class _HeaderFirst(ProtocolWrapper):
    """
    Refuses untrusted peers at once; otherwise reads the header and only
    then connects the mail protocol, with C{getPeer()} already the client.
    """

    factory: "_HeaderFirstFactory"

    def makeConnection(self, transport: Any) -> None:
        directlyProvides(self, providedBy(transport))
        Protocol.makeConnection(self, transport)
        self.factory.registerProtocol(self)
        self._started = False
        self._peer: IAddress | None = None
        self._reader = HeaderReader()
        self._timer: Any = None
        proxy = transport.getPeer()
        if not self.factory.trusts(proxy):
            log.warn("proxy: refused a connection from {peer}: not in proxy.trusted",
                     peer=_describe(proxy))
            self.loseConnection()
            return
        self._timer = self.factory.clock.callLater(self.factory.header_timeout, self._timed_out)

    def _timed_out(self) -> None:
        log.info("proxy: no PROXY header from {peer} in {seconds:g} s, closing",
                 peer=_describe(self.transport.getPeer()), seconds=self.factory.header_timeout)
        self.loseConnection()

    def getPeer(self) -> IAddress:
        return self._peer if self._peer is not None else self.transport.getPeer()

    def dataReceived(self, data: bytes) -> None:
        if self._started:
            self.wrappedProtocol.dataReceived(data)
            return
        if self.disconnecting:
            return
        try:
            parsed = self._reader.feed(data)
        except BadHeader as e:
            log.warn("proxy: bad PROXY header from {peer} ({problem}), closing",
                     peer=_describe(self.transport.getPeer()), problem=str(e))
            self._stop_timer()
            self.loseConnection()
            return
        if parsed is None:
            return
        header, rest = parsed
        self._stop_timer()
        if header.source is not None:
            self._peer = header.source
        elif header.note != "LOCAL":
            log.info("proxy: {peer} sent {note}; the session keeps the proxy's address",
                     peer=_describe(self.transport.getPeer()), note=header.note)
        self._started = True
        self.wrappedProtocol.makeConnection(self)
        if rest and not self.disconnecting:
            self.wrappedProtocol.dataReceived(rest)

    def _stop_timer(self) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None

    def connectionLost(self, reason: Any) -> None:
        self._stop_timer()
        if self._started:
            super().connectionLost(reason)
        else:
            self.factory.unregisterProtocol(self)


def _describe(address: Any) -> str:
    host = getattr(address, "host", None)
    if host is not None:
        return f"{host}:{getattr(address, 'port', '')}"
    return f"UNIX socket {getattr(address, 'name', '') or '(unnamed)'}"


class _HeaderFirstFactory(WrappingFactory):
    protocol = _HeaderFirst
    noisy = False

    def __init__(self, wrapped: Any, clock: IReactorTime, header_timeout: float,
                 trusted: NetworkIndex[bool]) -> None:
        super().__init__(wrapped)
        self.clock = clock
        self.header_timeout = header_timeout
        self._trusted = trusted

    def trusts(self, address: Any) -> bool:
        """Only IP peers can be listed, so a UNIX-socket peer is never trusted."""
        host = getattr(address, "host", None)
        parsed = parse_host(host) if isinstance(host, str) else None
        return parsed is not None and bool(self._trusted.lookup(*parsed))


@implementer(IStreamServerEndpoint)
class ProxiedEndpoint:
    """
    An endpoint whose connections come from one of the C{trusted} proxies
    and start with a PROXY v1/v2 header; any other connection is closed.
    """

    def __init__(self, inner: IStreamServerEndpoint, clock: IReactorTime,
                 trusted: tuple[Network, ...] = (), header_timeout: float = HEADER_TIMEOUT) -> None:
        self._inner = inner
        self._clock = clock
        self._timeout = header_timeout
        self._trusted: NetworkIndex[bool] = NetworkIndex()
        for network in trusted:
            self._trusted.add(network, True)

    def listen(self, factory: Any) -> Any:
        if not len(self._trusted):
            log.warn("proxy: proxy.trusted is empty, so this haproxy: listener refuses every connection")
        return self._inner.listen(_HeaderFirstFactory(factory, self._clock, self._timeout, self._trusted))

