# -*- test-case-name: tests.test_tls_clients -*-
"""
Listening endpoints from the configuration's endpoint strings.

Plain strings go to Twisted's C{serverFromString}. Two prefixes are ours:

- C{haproxy:} (L{proxyproto}): connections from trusted load balancers
  that start with a PROXY header;
- C{ssl:} (implicit TLS, RFC 8314): built here rather than by Twisted's
  own C{ssl:} parser, so that every TLS listener uses the server's TLS
  profile (L{tls.load_server_context}: TLS 1.2+ with ECDHE and AEAD only;
  Twisted's default also accepts CBC suites), takes its certificate from
  C{[tls]} when the string names none, and, behind a proxy
  (C{haproxy:ssl:...}), reads the PROXY header in the clear before the TLS
  handshake, where HAProxy sends it.
"""

from __future__ import annotations

import re
from typing import Any, Callable

from twisted.internet.defer import Deferred, execute
from twisted.internet.interfaces import IListeningPort, IReactorTime, IStreamServerEndpoint
from zope.interface import implementer

from twisted_mail_screen.relay.config import split_endpoint
from twisted_mail_screen.screening.netmatch import Network

#: The C{ssl:} options passed on to the TCP listener; C{privateKey} and
#: C{certKey} are read here; any other option is refused.
_TCP_OPTIONS = ("interface", "backlog")


class EndpointError(ValueError):
    pass


@implementer(IStreamServerEndpoint)
class TLSEndpoint:
    """Connections to C{inner} start with a TLS handshake under C{options}."""

    def __init__(self, inner: IStreamServerEndpoint, options: Any) -> None:
        self._inner = inner
        self._options = options

    def listen(self, factory: Any) -> Any:
        from twisted.protocols.tls import TLSMemoryBIOFactory

        return self._inner.listen(TLSMemoryBIOFactory(self._options, False, factory))


@implementer(IStreamServerEndpoint)
class ReactorListen:
    """
    Listens by one of the reactor's own methods (C{listenTCP},
    C{listenUNIX}), as Twisted's C{TCP4ServerEndpoint} and
    C{UNIXServerEndpoint} do. Ours because a test host without TLS, relay
    or Redis needs nothing else from C{twisted.internet.endpoints}, whose
    import is 8 ms of the first server a test process starts.
    """

    def __init__(self, method: Callable[..., IListeningPort], address: Any, **options: Any) -> None:
        self._method = method
        self._address = address
        self._options = options

    def listen(self, factory: Any) -> "Deferred[IListeningPort]":
        return execute(self._method, self._address, factory, **self._options)


def control_endpoint(reactor: Any, path: str) -> ReactorListen:
    """The control socket's endpoint: C{unix:PATH:mode=600:lockfile=1} (runtime/control.py)."""
    return ReactorListen(reactor.listenUNIX, path, backlog=50, mode=0o600, wantPID=True)


def _split_ssl(description: str) -> tuple[str, str | None, str | None]:
    """C{ssl:PORT:k=v...} -> (the C{tcp:} string, certKey, privateKey)."""
    positional, options = split_endpoint(description)
    if len(positional) < 2:
        raise EndpointError("ssl: needs a port first (ssl:993:interface=...)")
    if len(positional) > 2:
        raise EndpointError(f"ssl: option {positional[2]!r} is not name=value")
    from twisted.internet.endpoints import quoteStringArgument

    tcp = ["tcp", quoteStringArgument(positional[1])]
    for name, value in options.items():
        if name in _TCP_OPTIONS:
            tcp.append(f"{name}={quoteStringArgument(value)}")
        elif name not in ("certKey", "privateKey"):
            raise EndpointError(f"ssl: option {name!r} is not supported "
                                f"(use privateKey, certKey, {', '.join(_TCP_OPTIONS)})")
    return ":".join(tcp), options.get("certKey"), options.get("privateKey")


#: The commonest listen string, "tcp:PORT" or "tcp:PORT:interface=IPv4": built
#: directly, as serverFromString would build it (backlog 50). Its parser walks
#: the string a character at a time, which a test suite starting a server per
#: test (six endpoints each) pays for every time.
_PLAIN_TCP = re.compile(r"tcp:(?:port=)?(\d{1,5})(?::interface=(\d{1,3}(?:\.\d{1,3}){3}))?")


def _plain_tcp(reactor: Any, description: str) -> IStreamServerEndpoint | None:
    match = _PLAIN_TCP.fullmatch(description)
    if match is None:
        return None
    return ReactorListen(reactor.listenTCP, int(match[1]), backlog=50, interface=match[2] or "")


def server_endpoint(reactor: Any, description: str, clock: IReactorTime,
                    trusted: tuple[Network, ...] = (), tls: Any = None) -> IStreamServerEndpoint:
    """
    The endpoint for one C{listen.*} string. C{trusted} are the networks
    allowed to send PROXY headers; C{tls} the C{[tls]} options, used by
    C{ssl:} strings that name no files of their own.

    @raise EndpointError: or Twisted's own errors, for an unusable string.
    """
    proxied = description.startswith("haproxy:")
    if proxied:
        description = description[len("haproxy:"):]
    options = None
    if description.startswith("ssl:"):
        description, certificate, key = _split_ssl(description)
        if certificate or key:
            from twisted_mail_screen.runtime.tls import load_server_context

            options = load_server_context(certificate or key or "", key or certificate or "")
        elif tls is not None:
            options = tls
        else:
            raise EndpointError("ssl: needs [tls] certificate and key, or certKey= and privateKey=")
    endpoint = _plain_tcp(reactor, description)
    if endpoint is None:
        from twisted.internet.endpoints import serverFromString

        endpoint = serverFromString(reactor, description)
    if proxied:
        # Imported here: most servers (every test's) have no load balancer in front.
        from twisted_mail_screen.runtime.proxyproto import ProxiedEndpoint

        endpoint = ProxiedEndpoint(endpoint, clock, trusted)
    if options is not None:
        endpoint = TLSEndpoint(endpoint, options)
    return endpoint
