# -*- test-case-name: tests.test_netmatch -*-
"""
Addresses and address lists for screening.

Screening keys every decision on the client's address, so the same peer must
always give the same key: an IPv4-mapped IPv6 address is the IPv4 address it
maps, and an IPv6 address is aggregated to its network at a configurable
prefix (a /64 by default), because an IPv6 host usually owns the whole /64
and could otherwise rotate addresses to escape every limit.

White lists accept what MDaemon's IP lists accept, so an administrator can
copy entries across: single addresses, CIDR networks, ranges
(C{10.0.0.5-10.0.0.20}) and wildcards (C{192.168.*.*}, C{10.0.?.1}, where
C{*} is any run of digits within one octet and C{?} or C{#} is one digit).

Lookups are a dictionary probe per distinct prefix length, so a list of
thousands of networks still answers in a few hundred nanoseconds.
"""

from __future__ import annotations

import functools
import ipaddress
import re
import socket
from collections.abc import Iterable, Iterator
from typing import Generic, TypeVar, Union

from twisted_mail_screen.config.base import ConfigError

V = TypeVar("V")
Network = Union[ipaddress.IPv4Network, ipaddress.IPv6Network]

_MAPPED_PREFIX = 0xFFFF
_WILDCARD_CHARS = frozenset("*?#")
_OCTET_PATTERN = re.compile(r"[0-9*?#]{1,3}\Z|\*\Z")


def parse_host(host: str) -> tuple[int, int] | None:
    """
    Parse a textual peer address into C{(version, integer)}, with an
    IPv4-mapped IPv6 address returned as the IPv4 address it carries.

    @return: C{None} when C{host} is not an IP address (a UNIX socket's
        C{""}, say); such peers are not screened.
    """
    if not host:
        return None
    try:
        return 4, int.from_bytes(socket.inet_pton(socket.AF_INET, host), "big")
    except OSError:
        pass
    text = host
    if text.startswith("[") and text.endswith("]"):
        text = text[1:-1]
    text = text.split("%", 1)[0]
    try:
        value = int.from_bytes(socket.inet_pton(socket.AF_INET6, text), "big")
    except (OSError, ValueError):
        return None
    if value >> 32 == _MAPPED_PREFIX:
        return 4, value & 0xFFFFFFFF
    return 6, value


def _key_for(version: int, value: int, ipv6_prefix: int) -> str:
    if version == 4:
        return socket.inet_ntop(socket.AF_INET, value.to_bytes(4, "big"))
    if ipv6_prefix >= 128:
        return str(ipaddress.IPv6Address(value))
    shift = 128 - ipv6_prefix
    network = (value >> shift) << shift
    return f"{ipaddress.IPv6Address(network)}/{ipv6_prefix}"


def client_key(host: str, ipv6_prefix: int) -> str:
    """
    The screening key for C{host}: IPv4 as is, IPv4-mapped IPv6 as the
    IPv4 address, other IPv6 as its network at C{ipv6_prefix}
    (C{2001:db8:1:2::/64}). A C{host} that is not an IP address is
    returned unchanged.
    """
    parsed = parse_host(host)
    if parsed is None:
        return host
    return _key_for(parsed[0], parsed[1], ipv6_prefix)


def key_for_parsed(version: int, value: int, ipv6_prefix: int) -> str:
    """L{client_key} for an address already parsed by L{parse_host}."""
    return _key_for(version, value, ipv6_prefix)


def format_network(network: Network) -> str:
    """
    Canonical text for a network: a lone address (/32, /128) is written
    without its prefix, an IPv4-mapped IPv6 network as IPv4.
    """
    if network.version == 6 and network.prefixlen >= 96:
        mapped = network.network_address.ipv4_mapped  # type: ignore[union-attr]
        if mapped is not None:
            network = ipaddress.IPv4Network((mapped, network.prefixlen - 96))
    if network.prefixlen == network.max_prefixlen:
        return str(network.network_address)
    return str(network)


def parse_network(text: str, key: str = "network") -> Network:
    """
    Parse a single address or CIDR network (host bits are cleared,
    brackets around IPv6 are allowed; IPv4-mapped IPv6 becomes IPv4).

    @raise ConfigError: naming C{key} when C{text} is neither.
    """
    candidate = text.strip()
    if candidate.startswith("["):
        candidate = candidate.replace("[", "").replace("]", "")
    try:
        network = ipaddress.ip_network(candidate, strict=False)
    except ValueError:
        raise ConfigError(key, text, "not an IP address or CIDR network") from None
    if network.version == 6 and network.prefixlen >= 96:
        mapped = network.network_address.ipv4_mapped  # type: ignore[union-attr]
        if mapped is not None:
            network = ipaddress.IPv4Network((mapped, network.prefixlen - 96))
    return network


class NetworkIndex(Generic[V]):
    """
    A map from networks to values answering "which network holds this
    address" with one dictionary probe per distinct prefix length, most
    specific first.
    """

    def __init__(self) -> None:
        # version -> prefix length -> network integer -> value
        self._tables: dict[int, dict[int, dict[int, V]]] = {4: {}, 6: {}}
        self._order: dict[int, list[int]] = {4: [], 6: []}
        self._size = 0

    def __len__(self) -> int:
        return self._size

    def _reorder(self, version: int) -> None:
        self._order[version] = sorted(self._tables[version], reverse=True)

    def add(self, network: Network, value: V) -> None:
        table = self._tables[network.version]
        if network.prefixlen not in table:
            table[network.prefixlen] = {}
            self._reorder(network.version)
        bucket = table[network.prefixlen]
        number = int(network.network_address)
        if number not in bucket:
            self._size += 1
        bucket[number] = value

    def remove(self, network: Network) -> bool:
        table = self._tables[network.version]
        bucket = table.get(network.prefixlen)
        if bucket is None or bucket.pop(int(network.network_address), None) is None:
            return False
        self._size -= 1
        if not bucket:
            del table[network.prefixlen]
            self._reorder(network.version)
        return True

    def get(self, network: Network) -> V | None:
        bucket = self._tables[network.version].get(network.prefixlen)
        if bucket is None:
            return None
        return bucket.get(int(network.network_address))

    def lookup(self, version: int, value: int) -> V | None:
        """The value of the most specific network holding the address."""
        width = 32 if version == 4 else 128
        table = self._tables[version]
        for prefix in self._order[version]:
            shift = width - prefix
            found = table[prefix].get((value >> shift) << shift)
            if found is not None:
                return found
        return None

    def clear(self) -> None:
        self.__init__()  # type: ignore[misc]

    def values(self) -> Iterator[V]:
        for table in self._tables.values():
            for bucket in table.values():
                yield from bucket.values()


def _wildcard_regex(entry: str, key: str) -> str:
    parts = entry.split(".")
    if len(parts) < 4 and parts[-1] == "*":
        parts += ["*"] * (4 - len(parts))
    if len(parts) != 4:
        raise ConfigError(key, entry, "a wildcard pattern needs four octets (192.168.*.*)")
    pieces = []
    for part in parts:
        if not _OCTET_PATTERN.match(part):
            raise ConfigError(key, entry, f"bad wildcard octet {part!r}")
        if part.isdigit() and int(part) > 255:
            raise ConfigError(key, entry, f"octet {part} is above 255")
        pieces.append("".join(r"\d*" if c == "*" else r"\d" if c in "?#" else c
                              for c in part))
    return r"\.".join(pieces)


class NetMatcher:
    """
    A parsed white list: answers whether an address is on it.

    @ivar entries: the entries as written, in order.
    """

    def __init__(self, entries: Iterable[str], key: str = "whitelist") -> None:
        self.entries: tuple[str, ...] = tuple(entries)
        self._index: NetworkIndex[bool] = NetworkIndex()
        patterns: list[str] = []
        for entry in self.entries:
            text = entry.strip()
            if not text:
                raise ConfigError(key, entry, "empty entry")
            if _WILDCARD_CHARS.intersection(text):
                patterns.append(_wildcard_regex(text, key))
            elif "-" in text:
                for network in _parse_range(text, key):
                    self._index.add(network, True)
            else:
                self._index.add(parse_network(text, key), True)
        self._wildcards = re.compile("(?:" + "|".join(patterns) + r")\Z") if patterns else None

    def __bool__(self) -> bool:
        return bool(self.entries)

    def matches(self, host: str) -> bool:
        """Whether the textual address C{host} is on the list."""
        parsed = parse_host(host)
        return parsed is not None and self.matches_parsed(*parsed)

    def matches_parsed(self, version: int, value: int) -> bool:
        """Whether an address parsed by L{parse_host} is on the list."""
        if self._index.lookup(version, value):
            return True
        if self._wildcards is not None and version == 4:
            dotted = socket.inet_ntop(socket.AF_INET, value.to_bytes(4, "big"))
            return self._wildcards.match(dotted) is not None
        return False


def _parse_range(text: str, key: str) -> list[Network]:
    first, _, last = text.partition("-")
    try:
        start = ipaddress.ip_address(first.strip())
        end = ipaddress.ip_address(last.strip())
        return list(ipaddress.summarize_address_range(start, end))  # type: ignore[arg-type]
    except (ValueError, TypeError):
        raise ConfigError(key, text, "not an address range (10.0.0.5-10.0.0.20)") from None


@functools.lru_cache(maxsize=64)
def shared_matcher(entries: tuple[str, ...], key: str = "whitelist") -> NetMatcher:
    """
    The L{NetMatcher} for C{entries}, built once per process: a matcher
    never changes after it is built, and every server of a process (the
    pytest plugin starts one a test) has the same configured white list.
    A list that is refused raises each time (errors are not cached).
    """
    return NetMatcher(entries, key)
