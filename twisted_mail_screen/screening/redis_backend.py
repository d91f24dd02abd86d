# -*- test-case-name: tests.test_redis_screening -*-
"""
Screening shared by several nodes through Redis (C{[screening] backend =
"redis"}).

The connection decision stays in memory: each node keeps its own copy of
the block list, white list and freezes (L{SharedLists}, updated by
pub/sub), and its own set of clients the cluster has already seen
C{max_connections} times in the window (or C{max_simultaneous} times at
once). A connection is decided from those, then counted in Redis by the
atomic batch script of its reactor turn (L{BatchedCounts}), sent without a
reply; when that finds a client at its limit it publishes that, so the next
connection, on whichever node, is refused (and blocked) without a round
trip; a connection past a limit (one that raced that news) is published
too, for the node that holds it to refuse. Authentication failures are
counted the same way.

Every counter key has a TTL: connection windows live as long as the window,
simultaneous connections are leases that each node renews for its open
sessions every third of C{lease_seconds}, so a node killed mid-session
leaves nothing once its leases lapse.

Redis down: the node goes on deciding from its local copy and counting
locally with the in-memory rules (which run on every node all the time),
says so once in the log and in the metric, and re-syncs on reconnect (fail
open: docs/screening.md says why that is right for mail).
"""

from __future__ import annotations

import hmac
import json
import os
from collections.abc import Callable
from typing import Any

from twisted.application.service import Service
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger

from twisted_mail_screen.screening.config import RedisConfig
from twisted_mail_screen.screening.interfaces import ClientScreen
from twisted_mail_screen.screening.notify import PostmasterNotifier
from twisted_mail_screen.screening.redis_counts import BATCH, BatchedCounts
from twisted_mail_screen.screening.redis_notify import SharedNotices
from twisted_mail_screen.screening.redis_state import SharedLists
from twisted_mail_screen.screening.resp import RedisLink
from twisted_mail_screen.screening.rules import RefusedScreen, ScreeningRules, refusal_text
from twisted_mail_screen.screening.service import ScreeningService

# KEYS: the lease sets. ARGV: expiry, ttl ms, then one member per key.
RENEW = """
for i = 1, #KEYS do
  redis.call('ZADD', KEYS[i], ARGV[1], ARGV[i + 2])
  redis.call('PEXPIRE', KEYS[i], ARGV[2])
end
return #KEYS
"""


class _ClusterSession:
    """The node's session screen, with its lease and failures also counted in Redis."""

    __slots__ = ("_inner", "_owner", "member", "key", "leased", "refuse", "open")
    refusal = None

    def __init__(self, inner: Any, owner: "RedisScreening", member: str) -> None:
        self._inner = inner
        self._owner = owner
        self.member = member
        self.key: str = inner.key
        self.leased = False
        self.refuse: Callable[[str], None] | None = None
        self.open = True

    def watch(self, refuse: Callable[[str], None]) -> None:
        """The session's way to refuse after its greeting (a raced connection)."""
        self.refuse = refuse

    @property
    def blocked(self) -> bool:
        return bool(self._inner.blocked)

    @blocked.setter
    def blocked(self, value: bool) -> None:
        self._inner.blocked = value

    @property
    def inner(self) -> Any:
        return self._inner

    def auth_failed(self, username: str, secret: bytes) -> bool:
        close = self._inner.auth_failed(username, secret)
        self._owner.auth_failed(self, username, secret)
        return bool(close)

    def auth_succeeded(self, username: str) -> None:
        self._inner.auth_succeeded(username)

    def rcpt_unknown(self) -> bool:
        return bool(self._inner.rcpt_unknown())

    def rset(self) -> bool:
        return bool(self._inner.rset())

    def closed(self) -> None:
        if self.open:
            self.open = False
            self._inner.closed()
            self._owner.released(self)


class RedisScreening(Service):
    """
    The cluster front of a L{ScreeningService}: installed as its C{front},
    so every listener's C{open} comes here first.

    @ivar up: whether Redis is reachable now.
    @ivar outages: how many times it became unreachable.
    """

    def __init__(self, screening: ScreeningService, config: RedisConfig, reactor: Any,
                 clock: IReactorTime, log: Logger | None = None,
                 link_factory: Callable[..., RedisLink] = RedisLink) -> None:
        self._screening = screening
        self._rules: ScreeningRules = screening.rules
        self._settings = screening.config
        self.config = config
        self._clock = clock
        self._log = log or Logger()
        self.node = os.urandom(6).hex()
        self._prefix = config.key_prefix
        self._channel = f"{config.key_prefix}changes"
        self._serial = 0
        self._sessions: dict[str, _ClusterSession] = {}
        self._saturated: dict[str, float] = {}
        self._full: dict[str, float] = {}
        self._secret = b""
        self._renewal: IDelayedCall | None = None
        self.up = False
        self.outages = 0
        password = None
        if config.password_file is not None:
            with open(config.password_file, encoding="utf-8") as f:
                password = f.readline().strip()
        self._link = link_factory(reactor, clock, config.endpoint, password, self._channel,
                                  self._message, self._link_up, self._link_down,
                                  config.timeout_seconds, self._log)
        state = screening.state
        tables = {"block": state.blocklist, "white": state.whitelist}
        if screening.freeze_store is not None:
            tables["freeze"] = screening.freeze_store.table
        self.lists = SharedLists(self._link.call, self._prefix, self._channel, self.node,
                                 tables, clock, self._log)
        self.lists.on_block = self._forget
        self.counts = BatchedCounts(self._link.send_quiet, self._link.call, clock,
                                    self._prefix, self._channel, self._settings,
                                    config.lease_seconds)
        self._link.probe = self.counts.probe
        notifier = screening.notifier
        self.notices = (SharedNotices(self._link.call, lambda: self.up, self._prefix,
                                      self._channel, notifier, clock,
                                      period_seconds=self._settings.notify_period_minutes * 60,
                                      log=self._log)
                        if isinstance(notifier, PostmasterNotifier) else None)
        screening.front = self.open

    # lifecycle

    def startService(self) -> None:
        super().startService()
        self._link.start()
        self._renewal = self._clock.callLater(self._renew_every(), self._renew)

    def stopService(self) -> Any:
        super().stopService()
        if self._renewal is not None and self._renewal.active():
            self._renewal.cancel()
        self._renewal = None
        self.counts.flush()
        if self.notices is None:
            self._link.stop()
            return None
        return self.notices.stop().addBoth(lambda _: self._link.stop())

    def _renew_every(self) -> float:
        return self.config.lease_seconds / 3.0

    def _link_up(self) -> None:
        def secret(reply: Any) -> Any:
            self._secret = reply if isinstance(reply, bytes) else b""
            # counting is sent without replies: the script must be there first
            return self._link.call("SCRIPT", "LOAD", BATCH)

        def loaded(_: object) -> Any:
            return self.lists.resync()

        def done(_: object) -> None:
            self.lists.seeded()
            self.up = True
            self._log.info("screening: redis {endpoint} reachable, node {node} shares screening",
                           endpoint=self.config.endpoint, node=self.node)
            self._renew_now()

        # One secret for the whole cluster, so a (user, password) pair tried
        # on two nodes is the same failure; it never leaves Redis otherwise.
        d = self._link.call("SET", f"{self._prefix}secret", os.urandom(32).hex(), "NX")
        d.addCallback(lambda _: self._link.call("GET", f"{self._prefix}secret"))
        d.addCallback(secret)
        d.addCallback(loaded)
        d.addCallbacks(done, lambda f: self._log.warn(
            "screening: redis re-sync failed: {why}", why=f.getErrorMessage()))

    def _link_down(self, why: str) -> None:
        was_up, self.up = self.up, False
        self.counts.drop()
        self.outages += 1
        if was_up or self.outages == 1:
            self._log.warn("screening: redis {endpoint} unreachable ({why}): deciding and "
                           "counting on this node alone until it is back",
                           endpoint=self.config.endpoint, why=why)

    # the decision

    def open(self, host: str, protocol: str) -> ClientScreen:
        screen = self._rules.open(host, protocol)
        if screen.refusal is not None or not hasattr(screen, "key"):
            return screen
        key: str = screen.key  # type: ignore[attr-defined]
        now = self._clock.seconds()
        settings = self._settings
        if self._saturated and self._saturated.get(key, 0.0) > now:
            screen.closed()
            limit = settings.max_connections
            entry = self._rules.block_client(key, "connections", limit + 1, limit,
                                             settings.connection_window_minutes, protocol)
            return RefusedScreen(refusal_text(key, entry))
        if self._full and self._full.get(key, 0.0) > now:
            screen.closed()
            most = settings.max_simultaneous
            if settings.block_on_simultaneous:
                entry = self._rules.block_client(key, "simultaneous", most + 1, most, None,
                                                 protocol)
                return RefusedScreen(refusal_text(key, entry))
            self._rules.decision("refuse", key, "simultaneous", count=f"{most + 1}/{most}",
                                 protocol=protocol, scope="cluster")
            return RefusedScreen(f"{key} has too many simultaneous connections ({most}) "
                            "(simultaneous)")
        self._serial += 1
        # the protocol rides in the member, for a refusal that comes after the session
        session = _ClusterSession(screen, self, f"{self.node}:{self._serial}:{protocol}")
        self._sessions[session.member] = session
        if self.up and (settings.max_connections or settings.max_simultaneous):
            session.leased = True
            self.counts.connected(session.key, session.member)
        return session

    def _blockable(self, session: _ClusterSession) -> bool:
        return self._screening.state.blocklist.get(session.key) is None

    def released(self, session: _ClusterSession) -> None:
        self._sessions.pop(session.member, None)
        if not (self.up and session.leased and self._settings.max_simultaneous):
            return
        self.counts.released(session.key, session.member)

    def auth_failed(self, session: _ClusterSession, username: str, secret: bytes) -> None:
        settings = self._settings
        limit = settings.max_auth_failures
        inner = session.inner
        if (not limit or not self.up or not self._secret
                or (inner.authenticated and settings.exempt_authenticated)
                or not self._blockable(session)):
            return
        digest = hmac.digest(self._secret, username.encode("utf-8", "surrogatepass")
                             + b"\0" + secret, "sha256")[:8].hex()
        self.counts.auth_failed(session.key, digest, session.member)

    def _over(self, message: dict[str, Any]) -> None:
        """
        Redis counted one of this node's sessions past a limit: it passed
        the local check before the news of its client's limit arrived. It
        is refused now (if still open), one round trip late, and its client
        blocked as it would have been.
        """
        member, key, rule, count = (message.get("m"), message.get("k"), message.get("r"),
                                    message.get("c"))
        if not (isinstance(member, str) and member.startswith(self.node + ":")
                and isinstance(key, str) and isinstance(count, int)):
            return
        if self._screening.state.blocklist.get(key) is not None:
            return
        settings = self._settings
        session = self._sessions.get(member)
        protocol = member.rsplit(":", 1)[1]
        if rule == "connections" and settings.max_connections:
            entry = self._rules.block_client(key, "connections", count,
                                             settings.max_connections,
                                             settings.connection_window_minutes, protocol)
            if session is not None and session.refuse is not None:
                session.refuse(refusal_text(key, entry))
        elif rule == "simultaneous" and settings.max_simultaneous \
                and settings.block_on_simultaneous:
            self._rules.block_client(key, "simultaneous", count, settings.max_simultaneous,
                                     None, protocol)
        elif rule == "auth_failures" and settings.max_auth_failures:
            self._rules.block_client(key, "auth_failures", count, settings.max_auth_failures,
                                     settings.auth_failure_window_minutes, protocol)
        else:
            return
        if session is not None:
            session.blocked = True

    # what the other nodes say

    def _message(self, channel: bytes, data: bytes) -> None:
        try:
            message = json.loads(data)
        except ValueError:
            return
        if not isinstance(message, dict):
            return
        kind = message.get("t")
        if kind == "over":
            self._over(message)
            return
        if kind == "held":
            if self.notices is not None and isinstance(message.get("u"), int):
                self.notices.held(message["u"])
            return
        if kind in ("sat", "full"):
            key, until = message.get("k"), message.get("u")
            if isinstance(key, str) and isinstance(until, (int, float)):
                table = self._saturated if kind == "sat" else self._full
                if until > self._clock.seconds():
                    table[key] = float(until)
                else:
                    table.pop(key, None)
            return
        self.lists.apply_message(message)

    def _forget(self, key: str) -> None:
        """A block reached this node: its client's flags and local counts go."""
        self._saturated.pop(key, None)
        self._full.pop(key, None)
        self._rules.forget_counts(key)

    # leases

    def _renew(self) -> None:
        self._renewal = self._clock.callLater(self._renew_every(), self._renew)
        now = self._clock.seconds()
        for table in (self._saturated, self._full):
            for key in [k for k, until in table.items() if until <= now]:
                del table[key]
        self._renew_now()

    def _renew_now(self) -> None:
        """Extend the leases of this node's open sessions (and re-create them after an outage)."""
        if not self.up or not self._settings.max_simultaneous or not self._sessions:
            return
        lease = self.config.lease_seconds
        sessions = list(self._sessions.values())
        keys = [f"{self._prefix}lease:{s.key}" for s in sessions]
        for session in sessions:
            session.leased = True
        self._link.call("EVAL", RENEW, len(keys), *keys, self._clock.seconds() + lease,
                        lease * 1000, *[s.member for s in sessions]).addErrback(lambda _: None)

    def settled(self) -> Deferred:
        """Fires once Redis has answered everything sent so far (the bench's barrier)."""
        self.counts.flush()
        return self._link.call("PING")

    def status(self) -> dict[str, object]:
        """For the control channel and the web API."""
        return {"backend": "redis", "redis": self.config.endpoint, "up": self.up,
                "node": self.node, "outages": self.outages,
                "saturated": len(self._saturated), "full": len(self._full)}

