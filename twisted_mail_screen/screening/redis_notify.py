# -*- test-case-name: tests.test_redis_screening -*-
"""
The postmaster notifier's rate limit and digest shared by every node, so a
storm spread over three nodes sends the postmaster five mails and one
digest, not fifteen and three.

The period is one Redis key with a TTL (C{PREFIX notify:period}, counting
the notices in it); a notice past the first C{max_messages} of the period
goes into one shared list (C{notify:digest}, capped as the local one is).
Each node that queued a notice looks at the list when the period lapses;
the first to look takes it whole (one script: read and delete) and sends
the digest, the others find it empty. After a digest the next period sends
only its digest, as on one node. While Redis is down each node falls back
to its own limit (L{PostmasterNotifier.submit_locally}).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger

from twisted_mail_screen.screening.notify import Notice, PostmasterNotifier

# KEYS: period, digest list, digest-only flag, overflow count, channel.
# ARGV: max messages, period ms, summary, digest cap. The first notice held
# in a period is announced, so every node (not only those that held one)
# looks for the digest when the period ends.
NOTICE = """
local n = redis.call('INCR', KEYS[1])
if n == 1 then redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
local ttl = redis.call('PTTL', KEYS[1])
if n <= tonumber(ARGV[1]) and redis.call('EXISTS', KEYS[3]) == 0 then
  return {1, ttl}
end
local held = redis.call('LLEN', KEYS[2])
if held == 0 then
  redis.call('PUBLISH', KEYS[5], cjson.encode({t='held', u=ttl}))
end
if held < tonumber(ARGV[4]) then
  redis.call('RPUSH', KEYS[2], ARGV[3])
  redis.call('PEXPIRE', KEYS[2], 2 * tonumber(ARGV[2]))
else
  redis.call('INCR', KEYS[4])
  redis.call('PEXPIRE', KEYS[4], 2 * tonumber(ARGV[2]))
end
return {0, ttl}
"""
# KEYS: digest list, overflow count, digest-only flag. ARGV: period ms.
DIGEST = """
local items = redis.call('LRANGE', KEYS[1], 0, -1)
local overflow = tonumber(redis.call('GET', KEYS[2]) or '0')
redis.call('DEL', KEYS[1], KEYS[2])
if #items > 0 or overflow > 0 then
  redis.call('SET', KEYS[3], '1', 'PX', ARGV[1])
end
return {overflow, items}
"""


class SharedNotices:
    """
    Installed as C{notifier.shared}: decides, through Redis, whether a
    notice is sent now or waits for the cluster's digest.
    """

    def __init__(self, call: Callable[..., Deferred], up: Callable[[], bool], prefix: str,
                 channel: str,
                 notifier: PostmasterNotifier, clock: IReactorTime,
                 max_messages: int = 5, period_seconds: float = 600.0,
                 digest_limit: int = 500, log: Logger | None = None) -> None:
        self._call = call
        self._up = up
        self._notifier = notifier
        self._clock = clock
        self._max = max_messages
        self._period_ms = int(period_seconds * 1000)
        self._digest_limit = digest_limit
        self._log = log or Logger()
        self._keys = [f"{prefix}notify:{name}"
                      for name in ("period", "digest", "digest-only", "overflow")]
        self._channel = channel
        self._timer: IDelayedCall | None = None
        notifier.shared = self.submit

    def submit(self, notice: Notice) -> bool:
        if not self._up():
            return False
        period, digest, flag, overflow = self._keys
        d = self._call("EVAL", NOTICE, 5, period, digest, flag, overflow, self._channel,
                       self._max, self._period_ms, notice.summary, self._digest_limit)

        def answered(reply: list[int]) -> None:
            single, ttl = reply
            if single:
                self._notifier.send(notice.subject, notice.body)
            self._schedule(ttl)

        d.addCallbacks(answered, lambda _: self._notifier.submit_locally(notice))
        return True

    def held(self, ttl_ms: int) -> None:
        """Another node held a notice: the period ends in C{ttl_ms}."""
        self._schedule(ttl_ms)

    def _schedule(self, ttl_ms: int) -> None:
        if self._timer is None and ttl_ms > 0:
            # just after the period key lapses, so the period is over for every node
            self._timer = self._clock.callLater(ttl_ms / 1000.0 + 0.05, self._period_ended)

    def _period_ended(self) -> None:
        self._timer = None
        self.take_digest()

    def take_digest(self) -> Deferred:
        """Take the cluster's held notices, if no other node has, and send them as one digest."""
        if not self._up():
            return succeed(None)
        _, digest, flag, overflow = self._keys

        def got(reply: list[Any]) -> None:
            count, items = reply
            if items or count:
                self._notifier.send_digest(
                    [i.decode("utf-8", "replace") for i in items], int(count))

        return self._call("EVAL", DIGEST, 3, digest, overflow, flag, self._period_ms) \
            .addCallbacks(got, lambda f: self._log.warn(
                "screening: could not take the shared digest: {why}",
                why=f.getErrorMessage()))

    def stop(self) -> Deferred:
        """At shutdown: send what this cluster holds now (best effort)."""
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        return self.take_digest()
