# -*- test-case-name: tests.test_inbound_auth -*-
"""
Blocking DNS lookups for SPF, DKIM and DMARC, made with dnspython in the
message-authentication worker pool (never on the reactor thread), against
the system's resolvers or the ones C{[mail_auth] nameservers} names.

pyspf looks names up through its module-level C{spf.DNSLookup}; it is
pointed once at L{_spf_lookup}, which asks the L{Lookup} the calling
worker thread is using (L{Lookup.active}), so several servers in one
process (a test suite) each keep their own resolvers.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import dns.exception
import dns.resolver
import spf


class DNSTemporary(Exception):
    """A lookup that failed for now (timeout, SERVFAIL, no server answered): temperror."""


_active = threading.local()


class Lookup:
    """Resolvers for one server; thread-safe (each query builds its own state)."""

    def __init__(self, nameservers: tuple[tuple[str, int], ...] = (), timeout: float = 10.0) -> None:
        resolver = dns.resolver.Resolver(configure=not nameservers)
        if nameservers:
            resolver.nameservers = [host for host, _ in nameservers]
            resolver.nameserver_ports = {host: port for host, port in nameservers}
        resolver.lifetime = timeout
        resolver.timeout = min(timeout, 5.0)
        self._resolver = resolver
        self.timeout = timeout

    def answers(self, name: str, qtype: str) -> list[Any]:
        """The records of C{name}; C{[]} when it has none or does not exist."""
        try:
            return list(self._resolver.resolve(name, qtype, search=False))
        except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer):
            return []
        except (dns.exception.Timeout, dns.resolver.NoNameservers, dns.resolver.LifetimeTimeout) as e:
            raise DNSTemporary(f"DNS {qtype} {name}: {e}") from e
        except dns.exception.DNSException as e:
            raise DNSTemporary(f"DNS {qtype} {name}: {e}") from e

    def txt(self, name: str) -> list[bytes]:
        """Each TXT record of C{name}, its strings joined."""
        return [b"".join(r.strings) for r in self.answers(name, "TXT")]

    def dkim_key(self, name: bytes | str, timeout: float = 5) -> bytes | None:
        """dkimpy's C{dnsfunc}: the key record, C{None} when there is none."""
        records = self.txt(name.decode() if isinstance(name, bytes) else name)
        return records[0] if records else None

    @contextmanager
    def active(self) -> Iterator["Lookup"]:
        """Make this the lookup pyspf uses in the calling thread."""
        previous = getattr(_active, "lookup", None)
        _active.lookup = self
        try:
            yield self
        finally:
            _active.lookup = previous


def _spf_lookup(name: str, qtype: str, strict: Any = True, timeout: float = 20) -> list[Any]:
    """pyspf's lookup contract: [((name, qtype), value)], L{spf.TempError} for a failure."""
    lookup: Lookup | None = getattr(_active, "lookup", None)
    if lookup is None:
        raise spf.TempError("DNS: no resolver for this thread")
    try:
        records = lookup.answers(name, qtype)
    except DNSTemporary as e:
        raise spf.TempError(str(e)) from e
    out: list[Any] = []
    for r in records:
        if qtype in ("A", "AAAA"):
            out.append(((name, qtype), r.address))
        elif qtype == "MX":
            out.append(((name, qtype), (r.preference, r.exchange.to_text(True))))
        elif qtype == "PTR":
            out.append(((name, qtype), r.target.to_text(True)))
        elif qtype in ("TXT", "SPF"):
            out.append(((name, qtype), r.strings))
    return out


spf.DNSLookup = _spf_lookup
