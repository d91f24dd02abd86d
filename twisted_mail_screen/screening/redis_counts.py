# -*- test-case-name: tests.test_redis_screening -*-
"""
The counters screening keeps in Redis, updated by one atomic script per
batch of events, sent without waiting for (or reading) a reply.

Every connection, closed connection and failed login is queued here as
three pre-encoded RESP strings (the operation, the client, a member) and
sent as one C{EVALSHA} of L{BATCH} behind C{CLIENT REPLY SKIP}: the
decision is made from the node's local copy, and what a node must learn
from the count comes by pub/sub, so nobody waits for the answer and the
node does not read, parse or dispatch one. The script publishes:

 - C{sat}/C{full}: a client at C{max_connections} in the window or at
   C{max_simultaneous} leases; every node refuses its next connection
   from memory;
 - C{over}: a connection (or failed login) that went past a limit on the
   node named in its member (it passed that node's local check before the
   news above arrived); that node blocks the client and refuses the
   session, one round trip late, as it would have with a reply.

Every event is sent at the end of its reactor turn, with the others of that
turn, so the news of a client at its limit races its next connection no
longer than a round trip, and a closed connection stops counting as soon.
Holding events longer made bigger batches but was not exact: 5 ms let the
limit+1-th connection through; closes held 50 ms made a client reconnecting
at once through three nodes look like three simultaneous connections, and
held 1 ms, one of a client's first six sequential connections was refused
twice in about 15 runs of the Redis tests on a loaded machine
(docs/performance.md, "Screening with the Redis backend").

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

import hashlib
from collections.abc import Callable

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall, IReactorTime

from twisted_mail_screen.screening.config import ScreeningConfig

# ARGV: prefix, channel, window s, limit, most, lease ms, auth window s, auth
# limit, now, lease expiry; then triples (op, client, member). op 'c' is a
# connection (member: the session), 'r' its end, 'a' .. session a failed
# login (member: the digest of its user and password).
BATCH = """
local prefix, channel = ARGV[1], ARGV[2]
local window, limit, most = tonumber(ARGV[3]), tonumber(ARGV[4]), tonumber(ARGV[5])
local lease_ms, auth_window = tonumber(ARGV[6]), tonumber(ARGV[7])
local auth_limit, now, expiry = tonumber(ARGV[8]), tonumber(ARGV[9]), tonumber(ARGV[10])
-- a sorted set's count once the members scored at or before `gone` are out
-- and `member` is in at `score` (each key expires: a dead node leaks nothing)
local function count_with(k, gone, score, member, ttl_ms)
  redis.call('ZREMRANGEBYSCORE', k, '-inf', gone)
  redis.call('ZADD', k, score, member)
  redis.call('PEXPIRE', k, ttl_ms)
  return redis.call('ZCARD', k)
end
-- past a limit: the node holding the session refuses it and blocks the client
local function over(client, member, rule, count)
  redis.call('PUBLISH', channel, cjson.encode({t='over', k=client, m=member, r=rule, c=count}))
end
local i = 11
while i <= #ARGV do
  local op, client, member = ARGV[i], ARGV[i + 1], ARGV[i + 2]
  i = i + 3
  if op == 'c' then
    if limit > 0 then
      local k = prefix .. 'conn:' .. client
      local count = count_with(k, now - window, now, member, math.ceil(window * 1000))
      if count >= limit then
        local oldest = redis.call('ZRANGE', k, 0, 0, 'WITHSCORES')
        redis.call('PUBLISH', channel, cjson.encode({t='sat', k=client,
                   u=tonumber(oldest[2]) + window}))
        if count > limit then
          over(client, member, 'connections', count)
        end
      end
    end
    if most > 0 then
      local active = count_with(prefix .. 'lease:' .. client, now, expiry, member, lease_ms)
      if active >= most then
        redis.call('PUBLISH', channel, cjson.encode({t='full', k=client, u=expiry}))
        if active > most then
          over(client, member, 'simultaneous', active)
        end
      end
    end
  elseif op == 'r' then
    local k = prefix .. 'lease:' .. client
    local before = redis.call('ZCARD', k)
    redis.call('ZREM', k, member)
    redis.call('ZREMRANGEBYSCORE', k, '-inf', now)
    local after = redis.call('ZCARD', k)
    if most > 0 and before >= most and after < most then
      redis.call('PUBLISH', channel, cjson.encode({t='full', k=client, u=0}))
    end
  elseif op:sub(1, 1) == 'a' then
    local k = prefix .. 'auth:' .. client
    redis.call('ZREMRANGEBYSCORE', k, '-inf', now - auth_window)
    local added = redis.call('ZADD', k, 'NX', now, member)
    redis.call('PEXPIRE', k, math.ceil(auth_window * 1000))
    if added == 1 and auth_limit > 0 then
      local count = redis.call('ZCARD', k)
      if count >= auth_limit then
        over(client, op:sub(2), 'auth_failures', count)
      end
    end
  end
end
return (i - 11) / 3
"""

#: The script's name in Redis (C{EVALSHA}); loaded before the first batch.
BATCH_SHA = hashlib.sha1(BATCH.encode()).hexdigest()


def bulk(data: bytes) -> bytes:
    """One RESP bulk string."""
    return b"$%d\r\n%s\r\n" % (len(data), data)


def _number(value: float) -> bytes:
    return str(value).encode()


class BatchedCounts:
    """
    Operations queued and sent as one batch without a reply.

    C{send(data)} writes one encoded command whose reply Redis skips (it
    returns C{False} while Redis is down: the batch is dropped, the node
    counts alone); C{call} sends one with a reply (the probe).

    @ivar batches: how many batches were sent (for the bench).
    """

    def __init__(self, send: Callable[[bytes], bool], call: Callable[..., Deferred],
                 clock: IReactorTime, prefix: str, channel: str, settings: ScreeningConfig,
                 lease_seconds: int) -> None:
        self._send = send
        self._call = call
        self._clock = clock
        self._lease = lease_seconds
        self._settings = (prefix, channel, settings.connection_window_minutes * 60,
                          settings.max_connections, settings.max_simultaneous,
                          lease_seconds * 1000, settings.auth_failure_window_minutes * 60,
                          settings.max_auth_failures)
        # everything up to "now" is the same for every batch
        self._head = (b"$7\r\nEVALSHA\r\n" + bulk(BATCH_SHA.encode()) + bulk(b"0")
                      + b"".join(bulk(str(v).encode()) for v in self._settings))
        self._ops: list[bytes] = []
        self._flush_call: IDelayedCall | None = None
        self.batches = 0

    def connected(self, client: str, member: str) -> None:
        self._add(b"$1\r\nc\r\n" + bulk(client.encode()) + bulk(member.encode()))

    def released(self, client: str, member: str) -> None:
        self._add(b"$1\r\nr\r\n" + bulk(client.encode()) + bulk(member.encode()))

    def auth_failed(self, client: str, digest: str, member: str) -> None:
        self._add(bulk(b"a" + member.encode()) + bulk(client.encode()) + bulk(digest.encode()))

    def _add(self, op: bytes) -> None:
        if self._flush_call is None:
            self._flush_call = self._clock.callLater(0, self.flush)
        self._ops.append(op)

    def encoded(self, now: float) -> bytes:
        """The queued operations as one C{EVALSHA} command (and the queue emptied)."""
        ops, self._ops = self._ops, []
        return b"".join((b"*%d\r\n" % (13 + 3 * len(ops)), self._head,
                         bulk(_number(now)), bulk(_number(now + self._lease)), *ops))

    def flush(self) -> None:
        """Send what is queued now."""
        call, self._flush_call = self._flush_call, None
        if call is not None and call.active():
            call.cancel()
        if not self._ops:
            return
        self.batches += 1
        self._send(self.encoded(self._clock.seconds()))

    def drop(self) -> None:
        """Forget what is queued (Redis went away: the leases lapse on their own)."""
        self._ops = []

    def probe(self) -> Deferred:
        """
        The batch script with no operations, answered: Redis is alive and
        has the script (a restarted or flushed Redis gets it again by
        C{EVAL}, as the link falls back on C{NOSCRIPT}).
        """
        now = self._clock.seconds()
        return self._call("EVAL", BATCH, 0, *self._settings, now, now + self._lease)
