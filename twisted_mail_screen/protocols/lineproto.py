# -*- test-case-name: tests.test_smtp -*-
"""
The command loop shared by the SMTP and POP3 servers.

It answers pipelined commands strictly in order: while one command's
answer is pending (a Deferred, e.g. a delivery or a password check), later
input waits in a bounded buffer, and the socket is paused if the client
keeps sending. Lines longer than the limit are discarded as they arrive,
so no input can make a session hold unbounded memory.

The protocol is its transport's only producer: when the peer stops reading
and the transport's buffer fills, no further command is answered (and the
socket stops being read) until it drains, so pipelining a million commands
at a client that never reads costs bounded memory. Subclasses that stream a
long answer wait on L{CommandProtocol.output} instead of registering a
producer of their own.

Replies are gathered while one read's pipelined commands are answered and
sent in one piece at the end of that read (or whenever C{CORK_LIMIT} octets
are pending), with L{DirectSend}: straight to the socket when nothing is
queued before it. A lock-step client costs one C{send} per reply and no
C{epoll_ctl}; 64 pipelined RETRs cost a few sends, not 64. Gathered replies
are flushed before the connection is closed and before TLS starts, so
nothing changes order or crosses the TLS boundary.

Sessions are closed by a timer on the injected clock when no complete
command (or, in raw mode, no data) arrives within C{idle_timeout}: bytes
dribbled into a command that never ends do not keep a session open.
"""

from __future__ import annotations

import socket
from contextlib import contextmanager
from typing import Any, Callable, Iterator

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import (IDelayedCall, IHandshakeListener, IPushProducer, IReactorTime,
                                         ISSLTransport, ITCPTransport)
from twisted.internet.protocol import Protocol
from twisted.internet.tcp import Server as TCPServer
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from twisted_mail_screen.runtime.sockopts import hold_output

#: Bytes of unprocessed input kept while a command is pending, before the
#: socket is paused.
PENDING_INPUT_LIMIT = 256 * 1024

#: Replies gathered while one read's commands are answered are sent once this
#: many octets are pending (Twisted's own write-buffer threshold).
CORK_LIMIT = 64 * 1024

#: Seconds a closed TLS session waits for the peer's close_notify before the
#: TCP connection is dropped anyway (Dovecot and Postfix do not wait at all).
TLS_CLOSE_GRACE = 2.0


class DirectSend:
    """
    C{transport.write}, but sent on the socket at once while nothing can be
    queued before it. Twisted's C{write} only buffers: the reactor then
    registers the socket for writability, sends on the next loop and
    unregisters it, two C{epoll_ctl} calls and a loop turn for every reply
    of a lock-step SMTP or POP3 dialogue.

    Only public APIs: the socket comes from C{getHandle()} (C{ISystemHandle})
    of a plain C{tcp.Server}, and the session is that transport's only
    writer, so Twisted's buffer is empty until the first time this object
    hands it something. From then on (the socket did not take a whole reply,
    or an error) every write goes through C{transport.write}: there is no
    public way to learn that the buffer has drained, and ordering matters
    more than the saved system calls. TLS (L{stop}) and a wrapped, UNIX or
    TLS transport also use C{write}, so back-pressure, ordering and
    connection loss are Twisted's as before.
    """

    def __init__(self, sock: socket.socket | None) -> None:
        self._socket = sock

    @classmethod
    def of(cls, transport: Any, enabled: bool = True) -> "DirectSend":
        """The writer for C{transport}: direct only on a plain TCP server connection."""
        handle = transport.getHandle() if enabled and type(transport) is TCPServer \
            and not ISSLTransport.providedBy(transport) else None
        return cls(handle if isinstance(handle, socket.socket) else None)

    @property
    def direct(self) -> bool:
        """Whether the next write may go straight to the socket."""
        return self._socket is not None

    def stop(self) -> None:
        """Write through C{transport.write} from now on (TLS is starting)."""
        self._socket = None

    def write(self, transport: Any, data: bytes) -> None:
        sock = self._socket
        if sock is None:
            transport.write(data)
            return
        try:
            sent = sock.send(data)
        except OSError:  # EAGAIN, EINTR or a lost peer: the reactor's own write path deals with it
            sent = 0
        if sent < len(data):
            self._socket = None  # Twisted's buffer now holds data: nothing may overtake it
            transport.write(data[sent:] if sent else data)


@implementer(IPushProducer)
class OutputGate:
    """
    The transport's view of a session's output: paused while the peer is
    not reading. Whoever waits for it to drain sets C{waiter}; it is called
    once when output may flow again or the connection stops.
    """

    def __init__(self, on_change: Callable[[], None]) -> None:
        self.paused = False
        self.stopped = False
        self.waiter: Callable[[], None] | None = None
        self._on_change = on_change

    def pauseProducing(self) -> None:
        self.paused = True
        self._on_change()

    def resumeProducing(self) -> None:
        self.paused = False
        self._wake()
        self._on_change()

    def stopProducing(self) -> None:
        self.stopped = True
        self._wake()

    def _wake(self) -> None:
        waiter, self.waiter = self.waiter, None
        if waiter is not None:
            waiter()


@implementer(IHandshakeListener)
class CommandProtocol(Protocol):
    """
    Splits input into CRLF (or LF) lines and feeds them one at a time to
    L{line_received}. A subclass may switch to raw mode with
    L{set_raw_handler} to consume bulk data (SMTP DATA) without per-line
    work.
    """

    log = Logger()
    max_line_length = 512
    idle_timeout: float = 300.0
    clock: IReactorTime
    #: Replies straight to the socket while nothing is queued (L{DirectSend});
    #: C{False} sends every reply through C{transport.write}.
    direct_send = True

    def __init__(self) -> None:
        self._buffer = bytearray()
        self._busy = False
        self._paused = False
        self._discarding = False
        self._closing = False
        self._in_process = False
        self._timer: IDelayedCall | None = None
        self._raw_handler: Callable[[bytearray], bool] | None = None
        self.output = OutputGate(self._output_changed)
        self._writer = DirectSend(None)
        #: Whether the session is encrypted: from the start on an implicit-TLS
        #: (C{ssl:}) listener, after L{start_tls} otherwise. Capabilities and
        #: the plaintext-password rule read it.
        self.secure = False

    # hooks for subclasses

    def line_received(self, line: bytes) -> Deferred | None:
        raise NotImplementedError

    def line_too_long(self) -> None:
        raise NotImplementedError

    def timed_out(self) -> None:
        self.close()

    def session_ended(self) -> None:
        """The connection is gone, by either side."""

    # plumbing

    def connectionMade(self) -> None:
        self.secure = ISSLTransport.providedBy(self.transport)
        # On an implicit-TLS listener the session starts before the handshake.
        self._awaiting_handshake = self.secure
        self._writer = DirectSend.of(self.transport, self.direct_send)
        set_no_delay = getattr(self.transport, "setTcpNoDelay", None)
        if set_no_delay is not None:
            try:
                set_no_delay(True)  # replies are small; Nagle would stall pipelines
            except OSError:
                pass
        register = getattr(self.transport, "registerProducer", None)
        if register is not None:
            register(self.output, True)
        self._reset_timer()

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[override]
        self._closing = True
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        self.output.stopProducing()  # a reply streaming to a gone peer stops waiting
        if self._layer is not None:
            self._layer.stop()
        self.session_ended()

    def _reset_timer(self) -> None:
        if self._closing:
            return
        if self._timer is not None and self._timer.active():
            self._timer.reset(self.idle_timeout)
        else:
            self._timer = self.clock.callLater(self.idle_timeout, self._on_timeout)

    def _on_timeout(self) -> None:
        self._timer = None
        if not self._closing:
            self.timed_out()

    _cork: list[bytes] | None = None
    _cork_len = 0

    def send(self, data: bytes) -> None:
        if self._closing:
            return
        cork = self._cork
        if cork is None:
            self._writer.write(self.transport, data)
            return
        cork.append(data)
        self._cork_len += len(data)
        if self._cork_len >= CORK_LIMIT:
            self.flush()

    def flush(self) -> None:
        """Send the gathered replies now."""
        cork = self._cork
        if cork:
            data = cork[0] if len(cork) == 1 else b"".join(cork)
            cork.clear()
            self._cork_len = 0
            if not self._closing:
                self._writer.write(self.transport, data)

    @contextmanager
    def corked(self) -> Iterator[None]:
        """Gather what is sent inside the block; send it in one piece at its end."""
        if self._cork is not None:  # nested: the outer block flushes
            yield
            return
        self._cork = []
        try:
            yield
        finally:
            self.flush()
            self._cork = None

    def start_tls(self, context: Any) -> None:
        """
        Start TLS after the reply inviting it: that reply goes out in the
        clear, and input pipelined before the handshake is void (RFC 3207
        4.2, RFC 2595 3.1), so it cannot be injected into the TLS session.
        """
        self.discard_input()
        self.flush()
        self._writer.stop()
        self.transport.startTLS(context)
        self.secure = True
        self._upgrading = True

    _upgrading = False
    _holding_tickets = False

    def handshakeCompleted(self) -> None:
        """
        After a STARTTLS handshake, TLS 1.3 session tickets would go out on
        their own while the client sends its first command. Clients that
        read and write one TLS connection from two threads (offlineimap's
        imaplib2) lose that command when a ticket is read at the same time
        (6 of 60 STARTTLS runs hung, and 2 of 60 against Dovecot 2.3). So
        the tickets are held in the kernel until the first command has
        arrived, then sent ahead of its reply. Implicit TLS needs no hold:
        there the tickets go out with the greeting, before the client writes.
        """
        self._awaiting_handshake = False
        if self._closing:  # refused (screening) before the handshake: close now it is done
            self._close_write()
        if self._upgrading:
            self._upgrading = False
            self._holding_tickets = hold_output(self.transport, True)

    _awaiting_handshake = False

    def _close_write(self) -> None:
        """Close the TCP write side behind what is queued (close_notify last)."""
        if ITCPTransport.providedBy(self.transport):
            self.transport.loseWriteConnection()

    def close(self) -> None:
        """
        Close after everything written so far has been sent (RFC 3501 7.1.5,
        RFC 1939 6, RFC 5321 4.1.1.10: the server closes after LOGOUT/QUIT).

        Over TLS, Twisted sends close_notify only once no producer is
        registered, and then waits for the peer's close_notify before it
        closes TCP; a client that waits for the close instead (mbsync) would
        wait for ever. So the session unregisters itself first, then closes
        the TCP write side behind the close_notify (what Dovecot and Postfix
        do), and drops the connection after L{TLS_CLOSE_GRACE} seconds if
        the peer keeps its side open.
        """
        if not self._closing:
            self.flush()
            self._closing = True
            self._buffer.clear()
            if self._timer is not None and self._timer.active():
                self._timer.cancel()
            self._timer = None
            transport = self.transport
            transport.unregisterProducer()
            transport.loseConnection()
            if self.secure:
                # Not before an implicit-TLS handshake is done: the reply
                # (a refusal) waits for it, and the half-close would cut it off.
                if not self._awaiting_handshake:
                    self._close_write()
                self._timer = self.clock.callLater(TLS_CLOSE_GRACE, transport.abortConnection)

    @property
    def closing(self) -> bool:
        """Whether the session is closing or gone: send nothing more, start nothing new."""
        return self._closing

    def keep_alive(self) -> None:
        """Restart the idle deadline: a long answer in progress is not idleness."""
        self._reset_timer()

    def discard_input(self) -> None:
        """Forget buffered input (after STARTTLS, against injection)."""
        self._buffer.clear()

    def set_raw_handler(self, handler: Callable[[bytearray], bool] | None) -> None:
        """
        Hand the input buffer to C{handler} instead of splitting lines. The
        handler consumes what it can (deleting it from the buffer) and
        returns C{True} while it wants more raw data.
        """
        self._raw_handler = handler

    _layer: Any = None
    _line_end = 0

    def add_layer(self, make: Callable[[Any, bytes], Any]) -> None:
        """
        Put a layer (COMPRESS) between the session and its transport, as
        L{start_tls} puts TLS: C{make(transport, input after this command)}
        builds it; it gets socket input and feeds L{received_plain}.
        """
        self.flush()
        self._writer.stop()
        cut = self._line_end if self._in_process else 0
        pending = bytes(self._buffer[cut:])
        del self._buffer[cut:]
        self.transport = self._layer = make(self.transport, pending)

    def dataReceived(self, data: bytes) -> None:
        if self._layer is not None:
            self._layer.received(data)
            return
        self.received_plain(data)

    def received_plain(self, data: bytes) -> None:
        if self._cork is not None:  # re-entered: the outer call flushes
            self._received(data)
            return
        self._cork = []  # what corked() does, without its cost on every read
        try:
            self._received(data)
        finally:
            self.flush()
            self._cork = None

    def _received(self, data: bytes) -> None:
        if self._holding_tickets:
            self._holding_tickets = False
            hold_output(self.transport, False)
        if self._closing:
            return
        if self._raw_handler is not None:
            self._reset_timer()  # bulk data (DATA, a literal) may be slow but is progress
        self._buffer += data
        self._process()
        self._update_reading()

    def _waiting(self) -> bool:
        """True while input must not be processed: an answer is pending or unsent."""
        return self._busy or self.output.paused

    def _update_reading(self) -> None:
        """Stop reading the socket while input waits and piles up; read again when it may flow."""
        if self._closing:
            return
        if self._waiting() and len(self._buffer) > PENDING_INPUT_LIMIT:
            if not self._paused:
                self._paused = True
                self.transport.pauseProducing()
        elif self._paused and not self._waiting():
            self._paused = False
            self.transport.resumeProducing()

    def _output_changed(self) -> None:
        if self._closing:
            return
        if not self.output.paused and not self._busy and not self._in_process:
            self._process()
        self._update_reading()

    def _process(self) -> None:
        buf = self._buffer
        start = 0
        self._in_process = True
        try:
            while not self._waiting() and not self._closing:
                if self._raw_handler is not None:
                    del buf[:start]
                    start = 0
                    if self._raw_handler(buf):
                        return
                    self._raw_handler = None
                    continue
                end = buf.find(b"\n", start)
                if end < 0:
                    if len(buf) - start > self.max_line_length:
                        self._discarding = True
                        start = len(buf)
                    return
                line = bytes(buf[start:end])
                start = end + 1
                if self._discarding:
                    self._discarding = False
                    self.line_too_long()
                    continue
                if len(line) > self.max_line_length:
                    self.line_too_long()
                    continue
                if line.endswith(b"\r"):
                    line = line[:-1]
                self._reset_timer()
                self._line_end = start
                self._dispatch(line)
        finally:
            self._in_process = False
            if start:
                del buf[:start]

    def _dispatch(self, line: bytes) -> None:
        try:
            result = self.line_received(line)
        except Exception:
            self.log.failure("unhandled error in command {line!r}", line=line[:80])
            self.internal_error()
            return
        if isinstance(result, Deferred):
            self.wait_for(result, line)

    def wait_for(self, result: Deferred, what: bytes = b"") -> None:
        """Process no further input until C{result} has fired."""
        self._busy = True
        result.addErrback(self._command_failed, what)
        result.addBoth(self._command_done)

    def internal_error(self) -> None:
        self.close()

    def _command_failed(self, failure: Failure, line: bytes) -> None:
        self.log.failure("error answering {line!r}", failure, line=line[:80])
        self.internal_error()

    def _command_done(self, _: object) -> None:
        self._busy = False
        self._reset_timer()  # a long answer (a slow delivery, a big FETCH) is not idleness
        if not self._closing and not self._in_process:
            self._process()
        self._update_reading()
