# -*- test-case-name: tests.test_relay -*-
"""
Where mail for a domain goes: the smarthost, or the domain's MX hosts
(RFC 5321 5.1) and their IPv4 then IPv6 addresses, as endpoints to try
in order.
"""

from __future__ import annotations

import socket
from dataclasses import dataclass
from typing import Any

from twisted.internet import endpoints

from twisted_mail_screen.relay.client import Reply, SMTPFailure
from twisted_mail_screen.relay.config import (IMPLICIT_TLS, RelayConfig, endpoint_host_port,
                                              split_endpoint)


class PermanentDestinationError(Exception):
    """The destination can never be reached (no such domain, null MX)."""

    def __init__(self, reply: Reply) -> None:
        super().__init__(str(reply))
        self.reply = reply


@dataclass(frozen=True)
class Target:
    """One host to try: a display name, an endpoint and the TLS name."""

    name: str
    endpoint: Any
    tls_hostname: str | None


class Targets:
    """
    The hosts to try for a domain. C{resolver} (an C{IResolver},
    replaceable in tests) answers MX and address queries; it is made on
    first use, so a server that relays through a smarthost never reads
    the system's resolver configuration.
    """

    def __init__(self, relay: RelayConfig, reactor: Any, smarthost_tls: Any,
                 resolver: Any = None) -> None:
        self.relay = relay
        self.reactor = reactor
        self._smarthost_tls = smarthost_tls
        self._resolver = resolver

    @property
    def resolver(self) -> Any:
        if self._resolver is None:
            from twisted.names import client
            self._resolver = client.createResolver(reactor=self.reactor)
        return self._resolver

    @resolver.setter
    def resolver(self, value: Any) -> None:
        self._resolver = value

    async def targets(self, domain: str) -> list[Target]:
        """
        @raise PermanentDestinationError: the domain does not exist or takes no mail.
        @raise SMTPFailure: a temporary failure (DNS, no address at all).
        """
        relay = self.relay
        if relay.smarthost is not None:
            return [self._smarthost_target()]
        hosts = await self._mx_hosts(domain)
        targets = []
        for host in hosts:
            for address, ipv6 in await self._addresses(host):
                cls = endpoints.TCP6ClientEndpoint if ipv6 else endpoints.TCP4ClientEndpoint
                endpoint = cls(self.reactor, address, relay.mx_port, timeout=relay.connect_timeout)
                targets.append(Target(f"{host}[{address}]:{relay.mx_port}"
                                      if relay.mx_port != 25 else f"{host}[{address}]",
                                      endpoint, host))
        if not targets:
            raise SMTPFailure(Reply(451, f"4.4.4 no address found for the mail hosts of {domain}"))
        return targets

    def _smarthost_target(self) -> Target:
        relay = self.relay
        description = relay.smarthost
        assert description is not None
        positional, _ = split_endpoint(description)
        if positional[0].lower() in IMPLICIT_TLS:
            host, port = endpoint_host_port(description, 465)
            assert host is not None
            inner = endpoints.HostnameEndpoint(self.reactor, host, port,
                                               timeout=relay.connect_timeout)
            endpoint = endpoints.wrapClientTLS(self._smarthost_tls, inner)
            return Target(f"{host}:{port}", endpoint, relay.tls_hostname)
        endpoint = endpoints.clientFromString(self.reactor, description)
        host, port = endpoint_host_port(description, 25)
        return Target(f"{host}:{port}" if host else description, endpoint, relay.tls_hostname)

    async def _mx_hosts(self, domain: str) -> list[str]:
        from twisted.names import dns, error
        try:
            answers, _, _ = await self.resolver.lookupMailExchange(domain)
        except error.DNSNameError:
            raise PermanentDestinationError(Reply(550, f"5.1.2 domain {domain} does not exist"))
        except Exception as e:
            raise SMTPFailure(Reply(451, f"4.4.3 MX lookup for {domain} failed: {e}")) from e
        mx = sorted((rr.payload.preference, str(rr.payload.name).rstrip(".").lower())
                    for rr in answers if rr.type == dns.MX)
        if len(mx) == 1 and mx[0][1] == "":
            raise PermanentDestinationError(Reply(556, f"5.1.10 domain {domain} accepts no mail (null MX)"))
        if not mx:
            return [domain]  # RFC 5321 5.1: the domain itself is the implicit MX
        return list(dict.fromkeys(name for _, name in mx if name))

    async def _addresses(self, host: str) -> list[tuple[str, bool]]:
        from twisted.names import dns
        out: list[tuple[str, bool]] = []
        for lookup, rtype, ipv6 in ((self.resolver.lookupAddress, dns.A, False),
                                    (self.resolver.lookupIPV6Address, dns.AAAA, True)):
            try:
                answers, _, _ = await lookup(host)
            except Exception:
                continue
            out.extend((rr.payload.dottedQuad() if not ipv6 else _ipv6(rr.payload), ipv6)
                       for rr in answers if rr.type == rtype)
        return list(dict.fromkeys(out))


def _ipv6(payload: Any) -> str:
    return socket.inet_ntop(socket.AF_INET6, payload.address)
