# -*- test-case-name: tests.test_imap_compress -*-
"""
COMPRESS=DEFLATE (RFC 4978): a raw deflate layer between a session and its
transport, put in place the way STARTTLS puts TLS there. Over TLS the TLS
layer carries the compressed octets.

Both directions are bounded. Input is inflated a slice at a time and
handed to the session like octets read from a socket, so the session's own
line and literal limits and its pause while a command is pending apply to
what comes out: a small decompression bomb (deflate inflates up to about
1000 times) cannot grow memory. Output is deflated a slice at a time, with
a sync flush once what was written has all been deflated, so the client
can read each reply as soon as it is sent. Neither direction works for
more than C{TURN} octets in one reactor turn: the rest waits for the next
turn, the socket is not read and the session's output stays paused
meanwhile, so one huge literal or FETCH never holds the reactor.
"""

from __future__ import annotations

import zlib
from collections import deque
from typing import Any, Callable

from twisted.internet.interfaces import IDelayedCall, IPushProducer, IReactorTime
from zope.interface import directlyProvides, implementer, providedBy

#: Octets inflated or deflated by one zlib call.
SLICE = 32 * 1024
#: Octets inflated or deflated in one reactor turn before the layer yields
#: (4 ms of level-1 deflate of mail text on a loaded 2-core test machine).
TURN = 64 * 1024
#: zlib level: 1 deflates text to about 45% at twice the speed of level 6
#: (40%): the reactor's time matters more than the last few percent.
LEVEL = 1


class CompressionError(Exception):
    """The client's deflate stream is corrupt or was ended."""


@implementer(IPushProducer)
class _PeerReading:
    """What the inner transport pauses and resumes while the peer does not read."""

    def __init__(self, layer: "DeflateTransport") -> None:
        self.layer = layer

    def pauseProducing(self) -> None:
        self.layer.peer_reading(False)

    def resumeProducing(self) -> None:
        self.layer.peer_reading(True)

    def stopProducing(self) -> None:
        self.layer.peer_gone()


class DeflateTransport:
    """
    The session's transport once compression is on: C{write} deflates,
    C{received} inflates, C{pauseProducing}/C{resumeProducing} (the session
    stopping and restarting its reading) reach the socket through it, and
    everything else is the inner transport's. C{output} is the session's
    output producer: paused while the peer is not reading or deflated
    output is still being made.
    """

    def __init__(self, inner: Any, pending_input: bytes, deliver: Callable[[bytes], None],
                 output: IPushProducer, clock: IReactorTime,
                 broken: Callable[[CompressionError], None]) -> None:
        self._inner = inner
        self._deliver = deliver
        self._output = output
        self._clock = clock
        self._broken = broken
        self._deflate = zlib.compressobj(LEVEL, zlib.DEFLATED, -15)
        self._inflate = zlib.decompressobj(-15)
        self._incoming = pending_input
        self._outgoing: deque[memoryview] = deque()
        self._session_reading = True
        self._socket_reading = True
        self._peer_reading = True
        self._output_paused = False
        self._running = False
        self._gone = False
        self._call: IDelayedCall | None = None
        self._budget = TURN
        # Whatever the session asks of its transport's interfaces
        # (ITCPTransport for the half-close, ISSLTransport) stays true.
        directlyProvides(self, providedBy(inner))
        inner.unregisterProducer()
        inner.registerProducer(_PeerReading(self), True)
        if pending_input:  # the client did not wait for the OK: not inside the command that started us
            self._schedule()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    # the session's side

    def write(self, data: bytes) -> None:
        if self._gone or not data:
            return
        self._outgoing.append(memoryview(data))
        self._run()

    def writeSequence(self, data: list[bytes]) -> None:
        self.write(b"".join(data))

    def received(self, data: bytes) -> None:
        """Compressed octets from the socket."""
        self._incoming = self._incoming + data if self._incoming else data
        self._run()

    def pauseProducing(self) -> None:
        self._session_reading = False
        self._update()

    def resumeProducing(self) -> None:
        self._session_reading = True
        self._run()

    def registerProducer(self, producer: IPushProducer, streaming: bool) -> None:
        self._output = producer

    def unregisterProducer(self) -> None:
        self._output = None  # type: ignore[assignment]

    def loseConnection(self) -> None:
        # Closing: what is left to deflate is at most one reply or piece.
        self._drain()
        self.stop()
        self._inner.unregisterProducer()
        self._inner.loseConnection()

    def stop(self) -> None:
        """The connection is gone: no more work."""
        self._gone = True
        if self._call is not None and self._call.active():
            self._call.cancel()
        self._call = None

    # the inner transport's side

    def peer_reading(self, reading: bool) -> None:
        self._peer_reading = reading
        self._update()

    def peer_gone(self) -> None:
        if self._output is not None:
            self._output.stopProducing()

    # the work

    def _drain(self) -> None:
        if self._outgoing and not self._gone:
            data = b"".join(bytes(view) for view in self._outgoing)
            self._outgoing.clear()
            self._inner.write(self._deflate.compress(data) + self._deflate.flush(zlib.Z_SYNC_FLUSH))

    def _schedule(self) -> None:
        if self._call is None and not self._gone:
            self._call = self._clock.callLater(0, self._turn)

    def _turn(self) -> None:
        self._call = None
        self._budget = TURN
        self._run()

    def _run(self) -> None:
        if self._running or self._gone:  # re-entered: a reply written while input is delivered
            return
        if self._call is None:  # no turn scheduled: no work was left over, this is new work
            self._budget = TURN
        self._running = True
        try:
            while self._budget > 0 and not self._gone:
                if self._outgoing:
                    self._budget -= self._deflate_slice()
                elif self._incoming and self._session_reading:
                    self._budget -= self._inflate_slice()
                else:
                    break
        except CompressionError as e:
            self._incoming = b""
            self._running = False
            self._broken(e)
            return
        finally:
            self._running = False
        if self._outgoing or (self._incoming and self._session_reading):
            self._schedule()
        self._update()

    def _deflate_slice(self) -> int:
        view = self._outgoing.popleft()
        if len(view) > SLICE:
            self._outgoing.appendleft(view[SLICE:])
            view = view[:SLICE]
        out = self._deflate.compress(view)
        if not self._outgoing:  # all written so far is deflated: let the client read it now
            out += self._deflate.flush(zlib.Z_SYNC_FLUSH)
        if out:
            self._inner.write(out)
        return len(view)

    def _inflate_slice(self) -> int:
        try:
            plain = self._inflate.decompress(self._incoming, SLICE)
        except zlib.error as e:
            raise CompressionError(f"corrupt deflate data ({e})") from None
        if self._inflate.eof:
            raise CompressionError("the client ended its deflate stream")
        self._incoming = self._inflate.unconsumed_tail
        if plain:
            self._deliver(plain)
        return max(len(plain), 1024)

    def _update(self) -> None:
        """Read the socket only while nothing waits to be inflated; pause output while it piles up."""
        if self._gone:
            return
        reading = self._session_reading and not self._incoming
        if reading != self._socket_reading:
            self._socket_reading = reading
            if reading:
                self._inner.resumeProducing()
            else:
                self._inner.pauseProducing()
        paused = not self._peer_reading or bool(self._outgoing)
        if paused != self._output_paused and self._output is not None:
            self._output_paused = paused
            if paused:
                self._output.pauseProducing()
            else:
                self._output.resumeProducing()
