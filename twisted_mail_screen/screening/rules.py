# -*- test-case-name: tests.test_screening -*-
"""
The screening rules: what each client did, counted, and the decisions
(serve, refuse, close, block, freeze) that follow.

L{ScreeningRules.open} screens a new connection and returns the
L{ClientScreen} protocol code reports events to. This module knows nothing
of sockets, reply codes or files (L{twisted_mail_screen.screening.state}
keeps the block list and white list files); its only source of time is the
injected clock, so every rule can be tested to the second with
L{twisted.internet.task.Clock}.

Rules (C{docs/screening.md} has the full statement):

  - a blocked client is refused at connect; the refusal neither counts
    nor extends the block; white-listed clients are never counted or
    blocked, and the white list beats the block list;
  - connection rate: more than C{max_connections} in a sliding window of
    C{connection_window_minutes}, counted across all protocols;
  - simultaneous connections above C{max_simultaneous} are refused (and
    blocked with C{block_on_simultaneous});
  - authentication failures: C{max_auth_failures} within a window, across
    protocols, a repeated (user, password) pair counting once;
  - unknown recipients and RSETs per connection;
  - blocks grow for repeat offenders, up to a cap.

Memory is bounded. Clients are kept in one dict (clients.py) keyed by
their address as an integer, not its text: a client seen once costs the
time it was seen, an int of milliseconds (100 to 150 bytes with its key
and dict slot); a client that did more gets a record packed into one bytes
value (record.py) whose lists are capped by the limits themselves. Idle
records are pruned from the front of the dict, which is kept in
least-recently-moved order by re-inserting a key seen a minute or more
after its last move (clients.py says why not on every event), and the
number of records is capped by evicting the least recently moved.
"""

from __future__ import annotations

import hmac
import math
import os
from collections.abc import Callable

from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from twisted_mail_screen.screening.config import FreezeConfig, ScreeningConfig
from twisted_mail_screen.screening.interfaces import (
    AdminFreezeStore, ClientScreen, Notifier, OpenScreen)
from twisted_mail_screen.screening.listfile import Entry, format_expiry
from twisted_mail_screen.screening.netmatch import key_for_parsed, parse_host, shared_matcher
from twisted_mail_screen.screening import record as packed
from twisted_mail_screen.screening.clients import ClientCounts, ClientTable, slot_for
from twisted_mail_screen.screening.state import StateFiles

RULES = ("connections", "simultaneous", "auth_failures", "failed_rcpts", "rsets",
         "session_auth", "manual")
SMTP_PROTOCOLS = frozenset(("smtp", "submission"))


def rule_of(reason: str) -> str:
    """The rule named at the start of a block reason, else C{manual}."""
    head = reason.split(":", 1)[0].strip()
    return head if head in RULES else "manual"


def refusal_text(address: str, entry: Entry) -> str:
    """The reason given to a blocked client (the protocol wraps it)."""
    until = ("until removed" if entry.expires is None
             else f"until {format_expiry(entry.expires)}")
    return f"{address} blocked {until} ({rule_of(entry.reason)})"


class RefusedScreen(OpenScreen):
    """A connection refused at connect (here or by the cluster): every event says close."""

    __slots__ = ("refusal",)

    def __init__(self, refusal: str) -> None:
        self.refusal = refusal  # type: ignore[misc]

    def auth_failed(self, username: str, secret: bytes) -> bool:
        return True

    def rcpt_unknown(self) -> bool:
        return True

    def rset(self) -> bool:
        return True


class _Session:
    """The L{ClientScreen} of one served connection."""

    __slots__ = ("_service", "key", "slot", "host", "protocol", "refusal", "authenticated",
                 "rcpts", "rsets", "auth_failures", "blocked", "_open")

    def __init__(self, service: "ScreeningRules", key: str, slot: int, host: str,
                 protocol: str) -> None:
        self._service = service
        self.key = key
        self.slot = slot
        self.host = host
        self.protocol = protocol
        self.refusal: str | None = None
        self.blocked = False
        self.authenticated = False
        self.rcpts = 0
        self.rsets = 0
        self.auth_failures = 0
        self._open = True

    def auth_failed(self, username: str, secret: bytes) -> bool:
        return self._service._auth_failed(self, username, secret)

    def auth_succeeded(self, username: str) -> None:
        self.authenticated = True

    def rcpt_unknown(self) -> bool:
        self.rcpts += 1
        return self._service._session_count(
            self, "failed_rcpts", self.rcpts, self._service.config.max_failed_rcpts,
            "rcpt unknown")

    def rset(self) -> bool:
        self.rsets += 1
        return self._service._session_count(
            self, "rsets", self.rsets, self._service.config.max_rsets, "rset")

    def closed(self) -> None:
        if self._open:
            self._open = False
            self._service._closed(self.key)


class ScreeningRules:
    """
    The counters and decisions of the screening service
    (L{twisted_mail_screen.screening.interfaces.Screening}).

    @ivar config: the settings.
    """

    on_decision: Callable[[str, str, str, dict[str, object]], None] | None = None

    def __init__(self, config: ScreeningConfig, clock: IReactorTime, state: StateFiles,
                 freeze_store: AdminFreezeStore | None = None,
                 notifier: Notifier | None = None,
                 freeze_config: FreezeConfig = FreezeConfig(),
                 log: Logger | None = None,
                 known_account: Callable[[str], bool] | None = None) -> None:
        self.config = config
        self._clock = clock
        self._state = state
        self._blocklist = state.blocklist
        self._runtime_whitelist = state.whitelist
        self._freeze_store = freeze_store
        self._notifier = notifier
        self._freeze_config = freeze_config
        self._log = log or Logger()
        self._known_account = known_account
        self.whitelist = shared_matcher(tuple(config.whitelist), "screening.whitelist")
        self._open_screen = OpenScreen()
        self._secret = os.urandom(32)
        #: The counted clients (clients.py); the hot path below reads its dict.
        self.table = ClientTable(config, clock, self._log)
        self._clients = self.table.clients
        self._active: dict[str, int] = {}
        self._offences: dict[str, tuple[float, int, int]] = {}
        self._cap = config.max_tracked_clients

    def prune(self) -> tuple[int, bool]:
        """
        Forget clients idle for longer than every window (a slice of them:
        L{ClientTable.prune}), and offences older than the repeat memory.

        @return: how many client records were dropped, and whether the
            clients were looked at to the end (else call again).
        """
        stale, through = self.table.prune()
        if not through:
            return stale, through
        memory = self.config.repeat_memory_hours * 3600.0
        now = self._clock.seconds()
        for key in [k for k, (expires, _, _) in self._offences.items()
                    if expires + memory <= now]:
            del self._offences[key]
        return stale, through

    # Screening

    def open(self, host: str, protocol: str) -> ClientScreen:
        """Screen a new connection from C{host} to C{protocol}."""
        config = self.config
        if not config.enabled:
            return self._open_screen
        parsed = parse_host(host)
        if parsed is None:
            return self._open_screen
        version, value = parsed
        runtime = self._runtime_whitelist.matcher
        if ((self.whitelist.entries and self.whitelist.matches_parsed(version, value))
                or (runtime.entries and runtime.matches_parsed(version, value))):
            return self._open_screen
        entry = self._blocklist.lookup_parsed(version, value)
        if entry is not None:
            return self._refuse(host, protocol, entry)
        if version == 4:
            slot = value
            key = host if ":" not in host else key_for_parsed(4, value, config.ipv6_prefix)
        else:
            slot = slot_for(6, value, config.ipv6_prefix)
            key = key_for_parsed(6, value, config.ipv6_prefix)
        table = self.table
        now = table.now()
        limit = config.max_connections
        clients = self._clients
        record = clients.get(slot)
        if record is None:
            clients[slot] = now
            if len(clients) > self._cap:
                table.evict()
        elif type(record) is int and (not limit or record <= now - table.conn_ms):
            # seen once: its time is its place in the order, so a new time moves it
            del clients[slot]
            clients[slot] = now
        elif not limit:
            table.store(slot, packed.touch(record, now), packed.moved_of(record),  # type: ignore
                        now)
        elif type(record) is int and limit > 1:
            table.store(slot, packed.pair(record, now), record, now)  # seen once, in the window
        else:
            if type(record) is int:
                moved = record
                record = packed.pack(record, (record,))
            else:
                moved = packed.moved_of(record)  # type: ignore[arg-type]
            counted = packed.connect(record, now, now - table.conn_ms, limit)  # type: ignore[arg-type]
            if type(counted) is int:
                entry = self._block(key, "connections", counted + 1, limit,
                                    config.connection_window_minutes, protocol, slot)
                return RefusedScreen(refusal_text(key, entry))
            table.store(slot, counted, moved, now)  # type: ignore[arg-type]
        active = self._active.get(key, 0)
        most = config.max_simultaneous
        if most and active >= most:
            if config.block_on_simultaneous:
                entry = self._block(key, "simultaneous", active + 1, most, None, protocol,
                                    slot)
                return RefusedScreen(refusal_text(key, entry))
            self.decision("refuse", key, "simultaneous", count=f"{active + 1}/{most}",
                           protocol=protocol)
            table.note(slot, now, protocol, f"refused: simultaneous {active + 1}/{most}")
            return RefusedScreen(
                f"{key} has too many simultaneous connections ({most}) (simultaneous)")
        self._active[key] = active + 1
        return _Session(self, key, slot, host, protocol)

    def _refuse(self, host: str, protocol: str, entry: Entry) -> ClientScreen:
        self.decision("refuse", host, rule_of(entry.reason), blocked=entry.name,
                       until=format_expiry(entry.expires), protocol=protocol)
        return RefusedScreen(refusal_text(host, entry))

    def _closed(self, key: str) -> None:
        active = self._active.get(key, 0) - 1
        if active > 0:
            self._active[key] = active
        else:
            self._active.pop(key, None)

    def _counting(self, session: _Session) -> bool:
        """Whether events of C{session} may still lead to a block."""
        if session.authenticated and self.config.exempt_authenticated:
            return False
        return self._blocklist.get(session.key) is None

    def _closes_on_block(self, session: _Session) -> bool:
        return session.protocol not in SMTP_PROTOCOLS or self.config.close_smtp_after_block

    def _digest(self, username: str, secret: bytes) -> bytes:
        """A keyed, truncated hash of the pair; the secret is never stored."""
        message = username.encode("utf-8", "surrogatepass") + b"\0" + secret
        return hmac.digest(self._secret, message, "sha256")[:8]

    def _auth_failed(self, session: _Session, username: str, secret: bytes) -> bool:
        config = self.config
        session.auth_failures += 1
        close = False
        limit = config.max_auth_failures
        if limit and self._counting(session):
            table = self.table
            now = table.now()
            slot = session.slot
            record = packed.note(table.record(slot, now), now, session.protocol,
                                 f"auth failed user={username}")
            # stored before a block reads the events, and the block drops it
            record, failures, repeated = packed.failed(
                record, now, now - table.auth_ms, self._digest(username, secret))
            self._clients[slot] = record
            if repeated:
                self.decision("ignore", session.key, "auth_failures", count=f"{failures}/{limit}",
                               protocol=session.protocol, repeat="same-credentials")
            elif failures >= limit:
                self._block(session.key, "auth_failures", failures, limit,
                            config.auth_failure_window_minutes, session.protocol, slot)
                session.blocked = True
                close = self._closes_on_block(session)
        per_session = config.session_auth
        if (per_session.max_failures and session.protocol in per_session.protocols
                and session.auth_failures >= per_session.max_failures):
            close = True
            if session.auth_failures == per_session.max_failures:
                self._session_auth_limit(session, username)
        return close

    def _session_count(self, session: _Session, rule: str, count: int, limit: int,
                       what: str) -> bool:
        if not limit or not self._counting(session):
            return False
        self.table.note(session.slot, self.table.now(), session.protocol,
                         f"{what} ({count} in this session)")
        if count < limit:
            return False
        self._block(session.key, rule, count, limit, None, session.protocol, session.slot)
        session.blocked = True
        return self._closes_on_block(session)

    def _session_auth_limit(self, session: _Session, username: str) -> None:
        per_session = self.config.session_auth
        failures = session.auth_failures
        frozen = False
        expires: float | None = None
        if (per_session.freeze_account and self._freeze_store is not None
                and (self._known_account is None or self._known_account(username))):
            try:
                entry = self._freeze_store.freeze(
                    username, self._freeze_config.minutes or None,
                    f"session_auth: {failures}/{per_session.max_failures} failures in one "
                    f"{session.protocol} session from {session.host}", log=False)
            except ValueError:
                pass
            else:
                frozen, expires = True, entry.expires
        if frozen:
            self.decision("freeze", session.key, "session_auth",
                           count=f"{failures}/{per_session.max_failures}",
                           protocol=session.protocol, account=username,
                           until=format_expiry(expires))
        else:
            self.decision("close", session.key, "session_auth",
                           count=f"{failures}/{per_session.max_failures}",
                           protocol=session.protocol, account=username)
        if per_session.notify_postmaster and self._notifier is not None:
            self._notifier.notify_freeze(username, session.host, session.protocol,
                                         failures, per_session.max_failures, frozen,
                                         expires, self.table.events(session.slot))

    # Blocking

    def _duration(self, key: str, now: float) -> tuple[int, int]:
        """The block length for a new offence of C{key}, and its number."""
        config = self.config
        previous = self._offences.get(key)
        if previous is None or now >= previous[0] + config.repeat_memory_hours * 3600.0:
            return config.block_minutes, 1
        minutes = round(previous[1] * config.repeat_multiplier)
        return min(config.max_block_minutes, max(config.block_minutes, minutes)), previous[2] + 1

    def _block(self, key: str, rule: str, count: int, limit: int,
               window_minutes: int | None, protocol: str, slot: int | None = None) -> Entry:
        if slot is None:
            slot = self.table.slot_of(key)
        now = self._clock.seconds()
        minutes, offence = self._duration(key, now)
        expires = float(math.ceil(now + minutes * 60))
        scope = f" in {window_minutes}m" if window_minutes else (
            " at once" if rule == "simultaneous" else " in one session")
        entry = self._blocklist.add(key, expires, f"{rule}: {count}/{limit}{scope} ({protocol})")
        self._offences.pop(key, None)
        self._offences[key] = (expires, minutes, offence)
        if len(self._offences) > self._cap:
            del self._offences[next(iter(self._offences))]
        events = self.table.events(slot)
        if slot is not None:
            self._clients.pop(slot, None)
        self._state.block_added()
        self.decision("block", key, rule, count=f"{count}/{limit}",
                       window=f"{window_minutes}m" if window_minutes else "session",
                       minutes=minutes, offence=offence, protocol=protocol,
                       until=format_expiry(expires))
        if self.config.notify_on_block and self._notifier is not None:
            self._notifier.notify_block(key, rule, count, limit, window_minutes, protocol,
                                        expires, minutes, events, offence)
        return entry

    #: Another node's finding (screening/redis_backend.py) blocks like this node's own.
    block_client = _block

    def forget_counts(self, key: str) -> None:
        """Drop what is counted against C{key} here (another node blocked it)."""
        self.table.forget(key)

    def counts(self, key: str) -> ClientCounts | None:
        """What is counted against the client C{key} (for tests and inspection)."""
        return self.table.counts(key)

    def decision(self, action: str, client: str, rule: str, **fields: object) -> None:
        """One structured log line per decision (who, rule, counts, action)."""
        text = "screening: action={action} client={client} rule={rule}" + "".join(
            f" {name}={{{name}}}" for name in fields)
        self._log.info(text, action=action, client=client, rule=rule, **fields)
        if self.on_decision is not None:  # the event bus (screening/publish.py)
            self.on_decision(action, client, rule, fields)

    def is_whitelisted(self, host: str) -> bool:
        parsed = parse_host(host)
        return parsed is not None and (
            self.whitelist.matches_parsed(*parsed)
            or self._runtime_whitelist.matches_parsed(*parsed))

    def offence(self, key: str, expires: float | None) -> int | None:
        """The offence number of C{key}'s block lapsing at C{expires}, if remembered."""
        known = self._offences.get(key)
        return known[2] if known is not None and known[0] == expires else None

    def forget(self, key: str) -> None:
        """Drop what is counted against C{key} and its past offences (it was unblocked)."""
        self._offences.pop(key, None)
        self.forget_counts(key)

    def stats(self) -> dict[str, int]:
        """Sizes for the control channel: tracked, active, offences, evicted."""
        return {"tracked": len(self._clients), "active": sum(self._active.values()),
                "offences": len(self._offences), "evicted": self.table.evicted}
