# -*- test-case-name: tests.test_redis_screening -*-
"""
A minimal Redis client on the server's reactor: RESP2 framing, pipelined
commands answered in order, one subscriber connection for pub/sub.

Why not C{txredisapi}: version 1.6.0 runs on this Python and Twisted (on
loopback it gave 15,000 pipelined EVALs a second and a 120 us round trip),
but it schedules its timeouts on the global reactor rather than the clock
the server is handed, subclasses a private Twisted class
(C{twisted.protocols.basic._PauseableMixin}) and, while the server is
unreachable, holds commands in a queue until a connection comes back.
Screening must fail open at once when Redis is down, so a command sent
while the link is down fails immediately (L{RedisDown}) and an unanswered
one is cut off by a watchdog on the injected clock. Screening needs six
commands (EVAL, PUBLISH, SUBSCRIBE, HSET, HDEL, HGETALL), which is what this
module is sized for (docs/screening.md, "Several nodes").

Counting is sent with no reply (L{RedisLink.send_quiet}: C{CLIENT REPLY
SKIP}, Redis 3.2 and later), which says nothing of Redis's health; so while
such commands go out, the watchdog asks a question every tick (the probe)
and a Redis that stops answering it is down as before.
"""

from __future__ import annotations

import hashlib
from collections import deque
from collections.abc import Callable
from typing import Any

from twisted.internet.defer import Deferred, fail, gatherResults
from twisted.internet.endpoints import clientFromString
from twisted.internet.interfaces import IDelayedCall, IReactorTime, ISystemHandle
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure

Reply = Any
#: A reply bigger than this is a broken server, not data: drop the connection.
MAX_REPLY = 64 * 1024 * 1024


class RedisError(Exception):
    """An error reply from Redis (C{-ERR ...})."""


class RedisDown(RedisError):
    """Redis is not reachable now (never connected, lost, or too slow to answer)."""


def encode(args: tuple[object, ...]) -> bytes:
    """A command as a RESP array of bulk strings."""
    parts = [b"*%d" % len(args)]
    for arg in args:
        data = arg if isinstance(arg, bytes) else str(arg).encode("utf-8")
        parts += (b"$%d" % len(data), data)
    parts.append(b"")
    return b"\r\n".join(parts)


#: Put before a command whose reply nobody reads: Redis then sends none.
SKIP = encode(("CLIENT", "REPLY", "SKIP"))


class _Incomplete(Exception):
    pass


def parse(buf: bytes, pos: int) -> tuple[Reply, int]:
    """One reply from C{buf} at C{pos}: C{(value, next position)}; L{_Incomplete} if cut short."""
    end = buf.find(b"\r\n", pos)
    if end < 0:
        raise _Incomplete()
    kind, line = buf[pos:pos + 1], buf[pos + 1:end]
    pos = end + 2
    if kind == b"+":
        return line.decode("utf-8", "replace"), pos
    if kind == b"-":
        return RedisError(line.decode("utf-8", "replace")), pos
    if kind == b":":
        return int(line), pos
    if kind == b"$":
        size = int(line)
        if size < 0:
            return None, pos
        if size > MAX_REPLY:
            raise ValueError(f"reply of {size} bytes")
        if len(buf) < pos + size + 2:
            raise _Incomplete()
        return buf[pos:pos + size], pos + size + 2
    if kind == b"*":
        count = int(line)
        if count < 0:
            return None, pos
        items = []
        for _ in range(count):
            item, pos = parse(buf, pos)
            items.append(item)
        return items, pos
    raise ValueError(f"unknown reply type {kind!r}")


class RESPProtocol(Protocol):
    """
    One connection. Replies come in the order commands were sent, so each
    command's Deferred waits in a queue with the time it was sent (for the
    watchdog). On a subscriber connection, pushed messages go to
    C{on_message(channel, data)}.
    """

    def __init__(self, clock: IReactorTime,
                 on_message: Callable[[bytes, bytes], None] | None = None) -> None:
        self._clock = clock
        self._buf = b""
        # (time sent, answer, writes through the transport when it was sent)
        self._pending: deque[tuple[float, Deferred, int]] = deque()
        self.on_message = on_message
        self.on_lost: Callable[[], None] | None = None
        self.connected_ok = False
        self._socket: Any = None
        #: Writes handed to the transport since it last held nothing of ours.
        self._queued = 0

    def connectionMade(self) -> None:
        self.connected_ok = True
        if ISystemHandle.providedBy(self.transport):
            self._socket = self.transport.getHandle()  # type: ignore[union-attr]

    def _write(self, data: bytes) -> int:
        """
        Send C{data} now, straight to the socket, while nothing of ours waits
        in the transport (else behind it, to keep the order). Why not always
        C{transport.write}: it sends on the next reactor turn (arm the socket
        for writing, wake, send, disarm), and a node sends two counting
        batches a connection: sending at once took the redis node's CPU a
        connection in the accept bench from 1/0.85 to 1/0.91 of the
        in-memory node's (docs/performance.md, "Session 12").
        Returns how many writes wait in the transport.
        """
        assert self.transport is not None
        if self._queued == 0 and self._socket is not None:
            try:
                sent = self._socket.send(data)
            except BlockingIOError:
                sent = 0
            except OSError:  # the reactor sees the connection lost on its own
                return 0
            if sent == len(data):
                return 0
            data = data[sent:]
        self._queued += 1
        self.transport.write(data)
        return self._queued

    def call(self, *args: object) -> Deferred:
        d: Deferred = Deferred()
        queued = self._write(encode(args))
        self._pending.append((self._clock.seconds(), d, queued))
        return d

    def send_quiet(self, data: bytes) -> None:
        """Write one encoded command whose reply Redis skips."""
        self._write(SKIP + data)

    def oldest_pending(self) -> float | None:
        return self._pending[0][0] if self._pending else None

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abortConnection()  # type: ignore[attr-defined]

    def dataReceived(self, data: bytes) -> None:
        self._buf += data
        pos = 0
        try:
            while pos < len(self._buf):
                try:
                    reply, pos = parse(self._buf, pos)
                except _Incomplete:
                    break
                self._reply(reply)
        except ValueError:
            self._buf = b""
            self.abort()
            return
        self._buf = self._buf[pos:]

    def _reply(self, reply: Reply) -> None:
        if (self.on_message is not None and isinstance(reply, list) and len(reply) == 3
                and reply[0] == b"message"):
            self.on_message(reply[1], reply[2])
            return
        if not self._pending:
            return
        _, d, queued = self._pending.popleft()
        if queued and queued == self._queued:
            # Redis read this command, the last write handed to the
            # transport: the transport holds nothing of ours any more.
            self._queued = 0
        if isinstance(reply, RedisError):
            d.errback(Failure(reply))
        else:
            d.callback(reply)

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        pending, self._pending = self._pending, deque()
        for _, d, _ in pending:
            d.errback(Failure(RedisDown("connection lost")))
        if self.on_lost is not None:
            self.on_lost()


class RedisLink:
    """
    The connections to one Redis server: one for commands, one subscribed
    to C{channel}. Both up: L{up} is C{True} and C{on_up} is called; either
    lost (or a command left unanswered for C{timeout} seconds): both are
    closed, C{on_down} is called, and a new attempt follows after a growing
    pause (0.25 s doubling up to 5 s).
    """

    watchdog_seconds = 0.25

    def __init__(self, reactor: Any, clock: IReactorTime, endpoint: str, password: str | None,
                 channel: str, on_message: Callable[[bytes, bytes], None],
                 on_up: Callable[[], None], on_down: Callable[[str], None],
                 timeout: float = 1.0, log: Logger | None = None) -> None:
        self._reactor = reactor
        self._clock = clock
        self._endpoint = endpoint
        self._password = password
        self._channel = channel
        self._on_message = on_message
        self._on_up = on_up
        self._on_down = on_down
        self._timeout = timeout
        self._log = log or Logger()
        self._command: RESPProtocol | None = None
        self._subscriber: RESPProtocol | None = None
        self._retry: IDelayedCall | None = None
        self._watch: IDelayedCall | None = None
        self._pause = 0.25
        self._running = False
        self._attempt = 0
        self._shas: dict[str, str] = {}
        self._tick = 0.0
        self._quiet = False
        self.up = False
        #: What the watchdog asks when only quiet commands went out (default C{PING}).
        self.probe: Callable[[], Deferred] = lambda: self.call("PING")

    def start(self) -> None:
        self._running = True
        self._connect()
        self._watch = self._clock.callLater(self.watchdog_seconds, self._watchdog)

    def stop(self) -> None:
        self._running = False
        for call in (self._retry, self._watch):
            if call is not None and call.active():
                call.cancel()
        self._retry = self._watch = None
        self._drop()

    def call(self, *args: object) -> Deferred:
        """
        Send one command; fails at once with L{RedisDown} while the link is down.
        C{EVAL script ...} goes as C{EVALSHA}: a connection decision's script
        is 1 kB that Redis would otherwise hash at every call (docs/performance.md).
        """
        command = self._command
        if not self.up or command is None:
            return fail(RedisDown("redis is down"))
        if args[0] != "EVAL":
            return command.call(*args)
        script = args[1]
        sha = self._shas.get(script)  # type: ignore[arg-type]
        if sha is None:
            sha = self._shas[script] = hashlib.sha1(str(script).encode()).hexdigest()  # type: ignore[index]

        def unknown(failure: Failure) -> Any:
            # a new or restarted Redis has not seen the script yet: EVAL loads it
            if failure.check(RedisError) and str(failure.value).startswith("NOSCRIPT"):
                return self.call_plain(*args)
            return failure

        return command.call("EVALSHA", sha, *args[2:]).addErrback(unknown)

    def send_quiet(self, data: bytes) -> bool:
        """
        Send one encoded command (L{encode}) without a reply; C{False}
        (nothing sent) while the link is down.
        """
        command = self._command
        if not self.up or command is None:
            return False
        command.send_quiet(data)
        self._quiet = True
        return True

    def call_plain(self, *args: object) -> Deferred:
        if not self.up or self._command is None:
            return fail(RedisDown("redis is down"))
        return self._command.call(*args)

    def _connect(self) -> None:
        self._retry = None
        if not self._running:
            return
        self._attempt += 1
        attempt = self._attempt
        command = RESPProtocol(self._clock)
        subscriber = RESPProtocol(self._clock, self._on_message)
        endpoint = clientFromString(self._reactor, self._endpoint)

        def connect(protocol: RESPProtocol) -> Deferred:
            return endpoint.connect(_OneFactory(protocol))

        def both(_: object) -> Deferred:
            if attempt != self._attempt:
                raise RedisDown("superseded")
            self._command, self._subscriber = command, subscriber
            command.on_lost = subscriber.on_lost = self._lost
            calls = []
            if self._password is not None:
                calls = [command.call("AUTH", self._password),
                         subscriber.call("AUTH", self._password)]
            calls.append(subscriber.call("SUBSCRIBE", self._channel))
            return gatherResults(calls, consumeErrors=True)

        def ready(_: object) -> None:
            self.up = True
            self._pause = 0.25
            self._on_up()

        def failed(failure: Failure) -> None:
            for protocol in (command, subscriber):
                protocol.on_lost = None
                if protocol.connected_ok:
                    protocol.abort()
            if self._command is command:
                self._command = self._subscriber = None
            self._schedule(failure.getErrorMessage())

        d = connect(command)
        d.addCallback(lambda _: connect(subscriber))
        d.addCallback(both)
        d.addCallbacks(ready, failed)

    def _schedule(self, why: str) -> None:
        if self.up:
            self.up = False
            self._on_down(why)
        elif self._attempt == 1:
            self._on_down(why)
        if self._running and self._retry is None:
            self._retry = self._clock.callLater(self._pause, self._connect)
            self._pause = min(5.0, self._pause * 2)

    def _drop(self) -> None:
        for protocol in (self._command, self._subscriber):
            if protocol is not None:
                protocol.on_lost = None
                protocol.abort()
        self._command = self._subscriber = None
        self._quiet = False

    def _lost(self) -> None:
        self._drop()
        self._schedule("connection lost")

    def _watchdog(self) -> None:
        now = self._clock.seconds()
        previous, self._tick = self._tick, now
        self._watch = self._clock.callLater(self.watchdog_seconds, self._watchdog)
        command = self._command
        if command is None or not self.up:
            return
        if now - previous > 2 * self.watchdog_seconds:
            # This tick is late: the reactor itself was busy and has not yet
            # read what may be waiting; that says nothing about Redis.
            return
        oldest = command.oldest_pending()
        if oldest is None:
            if self._quiet:
                # only unanswered commands since the last tick: ask something
                self._quiet = False
                self.probe().addErrback(lambda _: None)
            return
        if oldest < previous and now - oldest > self._timeout:
            self._drop()
            self._schedule(f"no reply in {self._timeout:g} s")


class _OneFactory(Factory):
    """Hands out one prepared protocol (the link builds both of its own)."""

    def __init__(self, protocol: RESPProtocol) -> None:
        self._protocol = protocol

    def buildProtocol(self, addr: Any) -> RESPProtocol:
        return self._protocol
