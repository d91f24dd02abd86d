# -*- test-case-name: tests.test_screening_clients -*-
"""
The clients screening counts (L{ClientTable}): one dict, kept in
least-recently-moved order, from a client's slot to what it did.

A slot is the client's address as an integer: an IPv4 address as is, an
IPv6 network at the configured prefix plus 2^128, so the two ranges never
meet. Its text (the key the rules, the block list and the logs use) is
made again only when needed. A client seen once is the time it was seen;
one that did more is a record packed into one bytes value (record.py).

Why a client is moved to the end at most once a minute (L{MOVE_MS}), not
on every event: a move is a pop and an insert, and CPython grows a dict
under that churn to three times its entries (2^22 slots for 10^6
clients, 84 MB, where the same dict filled once is 42 MB: 88 bytes a
client against 44). The bench's hostile client, three events within a
second or two, now never moves: 10^6 of them took 236.7 MB of RSS with a
move on every event and take 196.5 MB so (docs/performance.md).

The order is by move time: a client seen once is its time, which is
when it took its place; a record keeps its move time (record.py, to the
second, never after the real one), and a client seen again a minute or
more after its move goes to the end.
So prune reads the front until the first client moved inside the
horizon (every later one moved later, and was seen since), removes
those whose last-seen is past it and keeps those seen since their move;
eviction drops the least recently moved, which is least recently seen
to within a minute. Turnover (new clients in, idle ones pruned) churns
the dict too: a table that keeps 10^6 clients while others come and go
is still 84 MB of dict after its next growth.

Times are whole milliseconds since the table's epoch (the injected
clock's reading when it was made), rounded; every window is compared in
the same milliseconds, so a rule decides as it would on the clock's
seconds, to the millisecond.
"""

from __future__ import annotations

from itertools import islice
from typing import NamedTuple

from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from twisted_mail_screen.screening import record as packed
from twisted_mail_screen.screening.config import ScreeningConfig
from twisted_mail_screen.screening.netmatch import key_for_parsed, parse_host
from twisted_mail_screen.screening.notify import Event

_IPV6_SLOTS = 1 << 128  # IPv6 networks' slots start here, past every IPv4 address

#: A client seen again this long after its move goes to the end again
#: (the windows are whole minutes, so never longer than the shortest).
MOVE_MS = 60_000

#: Clients a prune looks at in one call: a few ms on the reactor; the
#: service calls again a second later until it is through.
PRUNE_SLICE = 20_000


def slot_for(version: int, value: int, ipv6_prefix: int) -> int:
    """The integer a client is kept under (an address parsed by C{parse_host})."""
    if version == 4:
        return value
    shift = 128 - ipv6_prefix
    return _IPV6_SLOTS | (value >> shift) << shift


class ClientCounts(NamedTuple):
    """What is counted against a client (L{ClientTable.counts}), times in seconds."""

    last: float
    times: list[float]
    auth: list[tuple[float, bytes]]
    events: list[Event]


class ClientTable:
    """
    The counted clients, their clock in milliseconds and their bounds.

    @ivar clients: slot -> when last seen (ms, a client seen once) or its
        packed record; the rules' hot path reads and writes it directly.
    @ivar evicted: how many were dropped to respect C{max_tracked_clients}.
    """

    def __init__(self, config: ScreeningConfig, clock: IReactorTime, log: Logger) -> None:
        self.clients: dict[int, int | bytes] = {}
        self._clock = clock
        self._epoch = clock.seconds()
        self._log = log
        self._ipv6_prefix = config.ipv6_prefix
        self.conn_ms = config.connection_window_minutes * 60_000
        self.auth_ms = config.auth_failure_window_minutes * 60_000
        self._horizon_ms = max(self.conn_ms, self.auth_ms)
        self.move_ms = min(MOVE_MS, self.conn_ms, self.auth_ms)
        self.cap = config.max_tracked_clients
        self.evicted = 0

    def now(self) -> int:
        """The clock now, in whole milliseconds since the epoch of this table."""
        return round((self._clock.seconds() - self._epoch) * 1000)

    def seconds(self, ms: int) -> float:
        return self._epoch + ms / 1000

    def slot_of(self, key: str) -> int | None:
        """The slot of a client's key, if it is one (the canonical text only, as with text keys)."""
        parsed = parse_host(key.partition("/")[0])
        if parsed is None:
            return None
        prefix = self._ipv6_prefix
        if key_for_parsed(parsed[0], parsed[1], prefix) != key:
            return None
        return slot_for(parsed[0], parsed[1], prefix)

    def prune(self, most: int = PRUNE_SLICE) -> tuple[int, bool]:
        """
        Forget clients idle for longer than every window, looking at no
        more than C{most}; how many went, and whether it got through.
        """
        cutoff = self.now() - self._horizon_ms
        clients = self.clients
        stale = []
        seen = 0
        through = True
        for slot, record in islice(clients.items(), most):
            seen += 1
            if type(record) is int:
                if record > cutoff:
                    break
                stale.append(slot)
            elif packed.moved_of(record) > cutoff:  # type: ignore[arg-type]
                break  # every later client moved later, so was seen since the cutoff
            elif packed.last_of(record) <= cutoff:  # type: ignore[arg-type]
                stale.append(slot)
        else:
            through = seen < most  # the end of the dict, else more to look at
        for slot in stale:
            del clients[slot]
        return len(stale), through

    def evict(self) -> None:
        clients = self.clients
        count = max(1, len(clients) - self.cap + self.cap // 100)
        for slot in list(islice(clients, count)):
            del clients[slot]
        self.evicted += count
        self._log.info("screening: action=evict count={count} tracked={tracked} "
                       "cap={cap}", count=count, tracked=len(clients), cap=self.cap)

    def store(self, slot: int, record: bytes, moved: int, now: int) -> None:
        """
        Keep C{slot}'s new C{record} (seen at C{now}; its place taken at
        C{moved}): where it is, or at the end if that was a minute ago.
        """
        if moved <= now - self.move_ms:
            clients = self.clients
            del clients[slot]
            clients[slot] = packed.moved(record, now)
        else:
            self.clients[slot] = record

    def record(self, slot: int, now: int) -> bytes:
        """
        The full record of C{slot}, created or upgraded, moved to the end
        if due (L{store}); the caller stores it back seen at C{now}, in place.
        """
        clients = self.clients
        record = clients.get(slot)
        if record is None:
            record = packed.pack(now, ())
            clients[slot] = record
            if len(clients) > self.cap:
                self.evict()
            return record
        if type(record) is int:
            moved = record
            record = packed.pack(record, (record,) if record > now - self.conn_ms else ())
        else:
            moved = packed.moved_of(record)  # type: ignore[arg-type]
        self.store(slot, record, moved, now)  # type: ignore[arg-type]
        return self.clients[slot]  # type: ignore[return-value]

    def note(self, slot: int, now: int, protocol: str, what: str) -> None:
        """Keep a notable event of C{slot}, seen at C{now}."""
        self.clients[slot] = packed.note(self.record(slot, now), now, protocol, what)

    def forget(self, key: str) -> None:
        slot = self.slot_of(key)
        if slot is not None:
            self.clients.pop(slot, None)

    def counts(self, key: str) -> ClientCounts | None:
        """What is counted against the client C{key}, if anything."""
        slot = self.slot_of(key)
        record = None if slot is None else self.clients.get(slot)
        if record is None:
            return None
        seconds = self.seconds
        if type(record) is int:
            return ClientCounts(seconds(record), [seconds(record)], [], [])
        r = packed.unpack(record)  # type: ignore[arg-type]
        return ClientCounts(seconds(r.last), [seconds(t) for t in r.times],
                            [(seconds(t), d) for t, d in r.auth],
                            [(seconds(t), p, w) for t, p, w in r.events])

    def events(self, slot: int | None) -> list[Event]:
        """The last connections and notable events of C{slot}, for the postmaster."""
        record = None if slot is None else self.clients.get(slot)
        if record is None:
            return []
        seconds = self.seconds
        if type(record) is int:
            return [(seconds(record), "-", "connect")]
        r = packed.unpack(record)  # type: ignore[arg-type]
        events: list[Event] = [(seconds(t), "-", "connect")
                               for t in r.times[-packed.EVENTS_KEPT:]]
        events += [(seconds(t), p, w) for t, p, w in r.events]
        events.sort(key=lambda e: e[0])
        return events[-2 * packed.EVENTS_KEPT:]
