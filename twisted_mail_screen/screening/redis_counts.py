# -*- test-case-name: tests.test_redis_screening -*-
"""
The counters screening keeps in Redis, updated by one atomic script per
reactor turn.

Every connection, closed connection and failed login of a turn is queued
here as three short strings (the operation, the client, a member) and sent
at the end of the turn as one C{EVALSHA} of L{BATCH}; the settings every
operation shares go once per batch. The first version sent one script per
event, with its keys and settings: the node then accepted 0.64x the
connections of the in-memory backend; batched per turn, a node's CPU per
connection is 0.79x-0.88x the in-memory one's (bench/screening_redis.py,
docs/performance.md). Holding events for 5 ms made bigger batches (0.88x)
but let a client's next connection reach a node before the news that it
was at its limit: per turn keeps the cluster's count exact.

Keys (all with a TTL, so a node that dies leaves nothing behind past it):
C{PREFIX conn:CLIENT} the sliding connection window (a sorted set of
times, lapsing with the window), C{lease:CLIENT} the simultaneous
connections (a sorted set of leases by expiry, lapsing after
C{lease_seconds} unless renewed), C{auth:CLIENT} the distinct failed
(user, password) digests in the authentication window.

The script names its keys in ARGV, not KEYS: it is for one Redis server
(or a primary with replicas), not Redis Cluster.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall, IReactorTime

from twisted_mail_screen.screening.config import ScreeningConfig

Answer = Callable[[Any], None]

# ARGV: prefix, channel, now, window s, limit, most, lease expiry, lease ms,
# auth window s; then triples (op, client, member). Answers one per op.
# A client at its limit is announced on the channel ('sat': connections,
# 'full': simultaneous), so every node refuses its next connection from memory.
BATCH = """
local prefix, channel = ARGV[1], ARGV[2]
local now, window, limit = tonumber(ARGV[3]), tonumber(ARGV[4]), tonumber(ARGV[5])
local most, expiry, lease_ms = tonumber(ARGV[6]), tonumber(ARGV[7]), tonumber(ARGV[8])
local auth_window = tonumber(ARGV[9])
local out = {}
local i = 10
while i <= #ARGV do
  local op, client, member = ARGV[i], ARGV[i + 1], ARGV[i + 2]
  i = i + 3
  if op == 'c' then
    local count, active = 0, 0
    if limit > 0 then
      local k = prefix .. 'conn:' .. client
      redis.call('ZREMRANGEBYSCORE', k, '-inf', now - window)
      redis.call('ZADD', k, now, member)
      redis.call('PEXPIRE', k, math.ceil(window * 1000))
      count = redis.call('ZCARD', k)
      if count >= limit then
        local oldest = redis.call('ZRANGE', k, 0, 0, 'WITHSCORES')
        redis.call('PUBLISH', channel, cjson.encode({t='sat', k=client,
                   u=tonumber(oldest[2]) + window}))
      end
    end
    if most > 0 then
      local k = prefix .. 'lease:' .. client
      redis.call('ZREMRANGEBYSCORE', k, '-inf', now)
      redis.call('ZADD', k, expiry, member)
      redis.call('PEXPIRE', k, lease_ms)
      active = redis.call('ZCARD', k)
      if active >= most then
        redis.call('PUBLISH', channel, cjson.encode({t='full', k=client, u=expiry}))
      end
    end
    out[#out + 1] = {count, active}
  elseif op == 'r' then
    local k = prefix .. 'lease:' .. client
    local before = redis.call('ZCARD', k)
    redis.call('ZREM', k, member)
    redis.call('ZREMRANGEBYSCORE', k, '-inf', now)
    local after = redis.call('ZCARD', k)
    if most > 0 and before >= most and after < most then
      redis.call('PUBLISH', channel, cjson.encode({t='full', k=client, u=0}))
    end
    out[#out + 1] = after
  elseif op == 'a' then
    local k = prefix .. 'auth:' .. client
    redis.call('ZREMRANGEBYSCORE', k, '-inf', now - auth_window)
    local added = redis.call('ZADD', k, 'NX', now, member)
    redis.call('PEXPIRE', k, math.ceil(auth_window * 1000))
    out[#out + 1] = {added, redis.call('ZCARD', k)}
  else
    out[#out + 1] = 0
  end
end
return out
"""


class BatchedCounts:
    """
    Operations queued during one reactor turn and sent as one batch.

    @ivar batches: how many batches were sent (for the bench).
    """

    def __init__(self, call: Callable[..., Deferred], clock: IReactorTime, prefix: str,
                 channel: str, settings: ScreeningConfig, lease_seconds: int) -> None:
        self._call = call
        self._clock = clock
        self._prefix = prefix
        self._channel = channel
        self._window = settings.connection_window_minutes * 60
        self._limit = settings.max_connections
        self._most = settings.max_simultaneous
        self._auth_window = settings.auth_failure_window_minutes * 60
        self._lease = lease_seconds
        self._ops: list[str] = []
        self._answers: list[Answer | None] = []
        self._flush_call: IDelayedCall | None = None
        self.batches = 0

    def connected(self, client: str, member: str, answer: Answer) -> None:
        """A connection: answers C{[count in window, active leases]}."""
        self._add("c", client, member, answer)

    def released(self, client: str, member: str) -> None:
        self._add("r", client, member, None)

    def auth_failed(self, client: str, digest: str, answer: Answer) -> None:
        """A failed login: answers C{[1 if the pair is new, distinct pairs in window]}."""
        self._add("a", client, digest, answer)

    def _add(self, op: str, client: str, member: str, answer: Answer | None) -> None:
        if self._flush_call is None:
            self._flush_call = self._clock.callLater(0, self.flush)
        self._ops += (op, client, member)
        self._answers.append(answer)

    def flush(self) -> None:
        """Send what is queued now (the end of the turn)."""
        if self._flush_call is not None and self._flush_call.active():
            self._flush_call.cancel()
        self._flush_call = None
        if not self._ops:
            return
        ops, self._ops = self._ops, []
        answers, self._answers = self._answers, []
        now = self._clock.seconds()
        self.batches += 1
        d = self._call("EVAL", BATCH, 0, self._prefix, self._channel, now, self._window,
                       self._limit, self._most, now + self._lease, self._lease * 1000,
                       self._auth_window, *ops)

        def answered(results: list[Any]) -> None:
            for answer, result in zip(answers, results):
                if answer is not None:
                    answer(result)

        d.addCallbacks(answered, lambda _: None)
