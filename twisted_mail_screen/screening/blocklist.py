# -*- test-case-name: tests.test_blocklist -*-
"""
The block list (C{blocklist.txt}) and the run-time white list
(C{whitelist.txt}): L{ExpiringFile}s of addresses and networks
(L{twisted_mail_screen.screening.listfile} has the file format).
"""

from __future__ import annotations

from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from twisted_mail_screen.config.base import ConfigError
from twisted_mail_screen.screening.listfile import Entry, ExpiringFile
from twisted_mail_screen.screening.netmatch import (
    NetMatcher, Network, NetworkIndex, format_network, parse_host, parse_network)


def canonical_network(text: str) -> str:
    """The canonical text of a block list entry's address or network."""
    return format_network(parse_network(text, "blocklist"))


class BlockList(ExpiringFile):
    """
    The block list: addresses and networks refused until an expiry.

    Lookups go through a L{NetworkIndex}, so a client is found whether it
    was blocked by its own key or lies inside a network blocked by hand.
    Adding or removing one entry updates the index in place (a block
    storm costs O(1) per block, not a rebuild each); only a re-read of the
    file rebuilds it.
    """

    header = (
        "# mailscreen block list: ADDRESS-OR-NETWORK  EXPIRY  # reason\n"
        "# EXPIRY: ISO 8601 UTC (2026-11-22T23:10:00Z), never, or +MINUTES\n"
        "# (converted to an absolute time when the server reads the file).\n"
        "# Edit freely; the running server picks changes up within a second.\n"
    )

    def __init__(self, path: str | None, clock: IReactorTime,
                 log: Logger | None = None) -> None:
        self._index: NetworkIndex[Entry] = NetworkIndex()
        super().__init__(path, clock, canonical_network, log, "block list")

    def _changed(self) -> None:
        self._index.clear()
        for entry in self._entries.values():
            self._index.add(parse_network(entry.name), entry)

    def _added(self, entry: Entry) -> None:
        self._index.add(parse_network(entry.name), entry)

    def _removed(self, entry: Entry) -> None:
        self._index.remove(parse_network(entry.name))

    def lookup(self, host: str) -> Entry | None:
        """The active entry that blocks the textual address C{host}, if any."""
        parsed = parse_host(host)
        return None if parsed is None else self.lookup_parsed(*parsed)

    def lookup_parsed(self, version: int, value: int) -> Entry | None:
        """L{lookup} for an address already parsed by L{parse_host}."""
        self.load()
        if not self._entries:
            return None
        entry = self._index.lookup(version, value)
        if entry is None or not entry.active(self._clock.seconds()):
            return None
        return entry

    def add(self, network: str, expires: float | None, reason: str) -> Entry:
        """Block C{network} (an address or CIDR) until C{expires}."""
        name = canonical_network(network)
        self.put(Entry(name, expires, reason))
        return self._entries[name]

    def remove(self, address: str) -> Entry | None:
        """
        Lift the entry for C{address}: the entry of that exact address or
        network, else the one that contains the address.

        @return: the entry removed, or C{None}.
        """
        self.load()
        try:
            network: Network = parse_network(address, "address")
        except ConfigError:
            return None
        name = format_network(network)
        entry = self._entries.get(name)
        if entry is None and network.prefixlen == network.max_prefixlen:
            entry = self._index.lookup(network.version, int(network.network_address))
        if entry is None:
            return None
        self.delete(entry.name)
        return entry


def canonical_pattern(text: str) -> str:
    """Check a white list entry (as L{NetMatcher} does) and return it."""
    NetMatcher([text], "whitelist")
    return text


class WhitelistFile(ExpiringFile):
    """
    Run-time white list additions (C{whitelist.txt}): one address,
    network, range or wildcard per line, optionally with an expiry and a
    C{# comment}. Entries added from the configuration file are not here.
    """

    header = (
        "# mailscreen run-time white list: ENTRY  [EXPIRY]  # comment\n"
        "# ENTRY: address, CIDR network, range (a-b) or wildcard (192.168.*.*)\n"
    )

    def __init__(self, path: str | None, clock: IReactorTime,
                 log: Logger | None = None) -> None:
        self.matcher = NetMatcher([])
        super().__init__(path, clock, canonical_pattern, log, "white list")

    def _changed(self) -> None:
        self.matcher = NetMatcher([e.name for e in self._entries.values()])

    def matches_parsed(self, version: int, value: int) -> bool:
        self.load()
        return self.matcher.matches_parsed(version, value)
